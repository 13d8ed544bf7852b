//! `vggctl predict`: top-k classes for images, with torchvision's eval
//! preprocessing.

use std::path::PathBuf;

use anyhow::{Result, bail};
use serde::Serialize;
use tch::{Kind, Tensor};
use vggctl::checkpoint::{imagenet_classes, read_model_file};
use vggctl::data::augment::Normalizer;
use vggctl::data::folder::{IMAGENET_MEAN, IMAGENET_STD};
use vggctl::data::image::{eval_transform, read_image};
use vggctl::model::{Head, Vgg};

use super::finetune::{load_pretrained, weights_path};
use super::{ModelOpts, print_json, print_out};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Images (JPEG or PNG).
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// A vggctl checkpoint (architecture, class names and preprocessing from its metadata).
    #[arg(long, conflicts_with = "weights")]
    checkpoint: Option<PathBuf>,
    /// `imagenet` (torchvision's weights for --arch/--bn) or a state dict file (imagenet head).
    #[arg(long)]
    weights: Option<String>,
    /// How many classes to list per image.
    #[arg(long, default_value_t = 5)]
    topk: i64,
    /// Input side for --weights [default: 224].
    #[arg(long)]
    input: Option<i64>,
    #[command(flatten)]
    model: ModelOpts,
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

pub fn run(args: Args) -> Result<()> {
    let device = args.model.device()?;
    if args.topk < 1 {
        bail!("--topk must be at least 1");
    }
    let (model, names, mean, std, input, resize) = match (&args.checkpoint, &args.weights) {
        (Some(path), _) => {
            let file = read_model_file(path)?;
            let Some(meta) = file.meta else {
                bail!(
                    "{}: no vggctl metadata; use --weights {} --arch ... for a plain state dict",
                    path.display(),
                    path.display()
                );
            };
            let mut model = Vgg::new(meta.spec(), device);
            model.load_state_dict(&path.display().to_string(), &file.tensors)?;
            (
                model,
                meta.class_names.clone(),
                meta.mean,
                meta.std,
                meta.input_size,
                meta.resize,
            )
        }
        (None, Some(w)) => {
            let spec = args.model.spec(Head::Imagenet)?;
            let path = weights_path(w, spec.arch, spec.bn, false)?;
            let model = load_pretrained(&path, spec.arch, spec.bn, device)?;
            let classes = model.spec.classes;
            let names = if classes == 1000 {
                imagenet_classes()
            } else {
                (0..classes).map(|i| format!("class {i}")).collect()
            };
            let input = args.input.unwrap_or(224);
            (
                model,
                names,
                IMAGENET_MEAN,
                IMAGENET_STD,
                input,
                Some(input * 256 / 224),
            )
        }
        (None, None) => bail!("give --checkpoint PATH or --weights imagenet|PATH"),
    };
    let batch: Vec<Tensor> = args
        .images
        .iter()
        .map(|p| read_image(p).map(|img| eval_transform(&img, resize, input)))
        .collect::<Result<_>>()?;
    let x = Normalizer::new(mean, std, device).apply(&Tensor::stack(&batch, 0).to_device(device));
    let probs = tch::no_grad(|| model.forward_t(&x, false).softmax(-1, Kind::Float));
    let k = args.topk.min(model.spec.classes);
    let (p, idx) = probs.topk(k, -1, true, true);
    let p: Vec<f32> = Vec::try_from(p.to_device(tch::Device::Cpu).flatten(0, -1))?;
    let idx: Vec<i64> = Vec::try_from(idx.to_device(tch::Device::Cpu).flatten(0, -1))?;
    let preds: Vec<Prediction> = args
        .images
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
        .collect();
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
