//! `vggctl predict`: top-k classes for images, with torchvision's eval
//! preprocessing.

use std::path::PathBuf;

use anyhow::{Result, bail};
use rayon::prelude::*;
use serde::Serialize;
use tch::{Device, Kind, Tensor};
use vggctl::checkpoint::{Build, ModelMeta, load_checkpoint, meta_for_weights};
use vggctl::data::augment::{Augment, Normalizer, Preprocess};
use vggctl::data::folder::{extension_list, image_files};
use vggctl::data::image::{decode_rgb, eval_crop};
use vggctl::infer::{Inference, Logits};
use vggctl::model::{Vgg, check_input};
use vggctl::numerics::{Activity, Numerics};

use super::opts::{
    DeviceOpts, InferenceOpts, LoadOpts, ModelOpts, NumericsOpts, ReadOpts, checkpoint_in,
};
use super::output::{print_json, print_out, usage, warn, whole};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Images (JPEG, PNG, BMP, PPM/PGM, TIFF or WebP), or directories: the
    /// images in them and their subfolders, in ImageFolder's order.
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// A vggctl checkpoint (architecture, class names and preprocessing from
    /// its metadata; a run directory means its best.safetensors).
    #[arg(long, conflicts_with = "weights")]
    checkpoint: Option<PathBuf>,
    /// `imagenet` (torchvision's weights for --arch/--bn) or a state dict file
    /// (.pth/.pt/.safetensors; its architecture, head and classes inferred).
    #[arg(long)]
    weights: Option<String>,
    /// How many classes to list per image.
    #[arg(long, default_value_t = 5, value_parser = whole::<i64>)]
    topk: i64,
    #[command(flatten)]
    read: ReadOpts,
    /// Images read and classified at a time.
    #[arg(short, long, default_value_t = 64, value_parser = whole::<usize>)]
    batch_size: usize,
    #[command(flatten)]
    model: ModelOpts,
    #[command(flatten)]
    load: LoadOpts,
    #[command(flatten)]
    device: DeviceOpts,
    #[command(flatten)]
    numerics: NumericsOpts,
    #[command(flatten)]
    inference: InferenceOpts,
}

#[derive(Serialize)]
struct Guess {
    index: i64,
    label: String,
    probability: f64,
}

#[derive(Serialize)]
struct Prediction {
    image: PathBuf,
    top: Vec<Guess>,
}

/// The image files `paths` name: files as given, directories as their images.
fn expand_dirs(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let found = image_files(p)?;
            if found.is_empty() {
                bail!(
                    "{}: no images in this directory or its subfolders (images are {})",
                    p.display(),
                    extension_list()
                );
            }
            files.extend(found);
        } else {
            files.push(p.clone());
        }
    }
    Ok(files)
}

/// The model and its metadata from --checkpoint or --weights.
fn load_model(args: &Args, device: Device) -> Result<(Vgg, ModelMeta)> {
    let (model, meta) = match (&args.checkpoint, &args.weights) {
        (Some(path), _) => {
            load_checkpoint(path, args.model.request()?, device, args.load.values())?
        }
        (None, Some(w)) => {
            let (model, _) = args.model.load_weights(
                w,
                args.model.request()?,
                (device, args.load.values(), Build::Blank),
                false,
            )?;
            let meta = meta_for_weights(model.spec);
            (model, meta)
        }
        (None, None) => return Err(usage("give --checkpoint PATH or --weights imagenet|PATH")),
    };
    Ok((model, args.read.apply(meta)?))
}

pub fn run(mut args: Args) -> Result<()> {
    if let Some(path) = &args.checkpoint {
        args.checkpoint = Some(checkpoint_in(path)?);
    }
    let device = args.device.get()?;
    if args.topk < 1 {
        return Err(usage("--topk must be at least 1"));
    }
    if args.batch_size < 1 {
        return Err(usage("--batch-size must be at least 1"));
    }
    args.read.check()?;
    let images = expand_dirs(&args.images)?;
    let (model, meta) = load_model(&args, device)?;
    check_input(meta.input_size)?;
    let k = args.topk.min(model.spec.classes);
    // The images arrive resized and cropped (torchvision's eval transform),
    // or, for CIFAR-style models, as the squares their evaluation read,
    // which the device then resizes to the input as it did.
    let augment = match meta.host_crop().1 == meta.input_size {
        true => Augment::ResizedCrop,
        false => Augment::CropFlip { padding: 0 },
    };
    let pre = Preprocess::new(
        augment,
        meta.input_size,
        Normalizer::new(meta.mean, meta.std, device),
    );
    let request = args.numerics.request(None, false);
    let numerics = Numerics::decide(&request, device, Activity::Predicting, &mut warn)?;
    let net = Inference::new(model, numerics, args.inference.layerwise);
    let mut preds = Vec::with_capacity(images.len());
    for chunk in images.chunks(args.batch_size) {
        preds.extend(classify(chunk, &meta, &pre, &net, k, device)?);
    }
    if args.model.json {
        return print_json(&preds);
    }
    let mut s = String::new();
    for pr in &preds {
        s += &format!("{}\n", pr.image.display());
        for g in &pr.top {
            s += &format!(
                "  {:6.2}%  {:>4}  {}\n",
                100.0 * g.probability,
                g.index,
                g.label
            );
        }
    }
    print_out(&s)
}

/// The top `k` classes of each image in `chunk`.
fn classify(
    chunk: &[PathBuf],
    meta: &ModelMeta,
    pre: &Preprocess,
    net: &Inference,
    k: i64,
    device: Device,
) -> Result<Vec<Prediction>> {
    // Decoding and resizing dominate on the CPU: all cores, one image each.
    let (resize, crop) = meta.host_crop();
    let batch: Vec<Tensor> = chunk
        .par_iter()
        .map(|p| {
            decode_rgb(p).map(|img| {
                let size = (img.height() as usize, img.width() as usize);
                eval_crop(img.as_raw(), size, (resize, crop), meta.interpolation)
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .collect::<Result<_>>()?; // the first unreadable file in order
    let x = Tensor::stack(&batch, 0).to_device(device);
    let probs = tch::no_grad(|| net.logits(&pre.eval(&x, None)).softmax(-1, Kind::Float));
    let (p, idx) = probs.topk(k, -1, true, true);
    let p: Vec<f32> = Vec::try_from(p.to_device(Device::Cpu).flatten(0, -1))?;
    let idx: Vec<i64> = Vec::try_from(idx.to_device(Device::Cpu).flatten(0, -1))?;
    let names = &meta.class_names;
    Ok(chunk
        .iter()
        .enumerate()
        .map(|(i, image)| Prediction {
            image: image.clone(),
            top: (0..k as usize)
                .map(|j| {
                    let n = i * k as usize + j;
                    let index = idx[n];
                    Guess {
                        index,
                        label: names
                            .get(index as usize)
                            .cloned()
                            .unwrap_or_else(|| format!("class {index}")),
                        probability: p[n] as f64,
                    }
                })
                .collect(),
        })
        .collect())
}
