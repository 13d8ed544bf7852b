//! `vggctl predict`: top-k classes for images, with torchvision's eval
//! preprocessing.

use std::path::PathBuf;

use anyhow::Result;
use serde::Serialize;
use tch::{Device, Kind, Tensor};
use vggctl::checkpoint::ModelMeta;
use vggctl::infer::{Inference, Logits};

use super::images::{ImagesIn, Opened};
use super::opts::InferenceOpts;
use super::output::{print_json, print_out, usage, whole};

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("inputs").required(true).args(["images"])))]
pub struct Args {
    #[command(flatten)]
    input: ImagesIn,
    /// How many classes to list per image.
    #[arg(long, default_value_t = 5, value_parser = whole::<i64>)]
    topk: i64,
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

pub fn run(args: Args) -> Result<()> {
    if args.topk < 1 {
        return Err(usage("--topk must be at least 1"));
    }
    let opened = args.input.open()?;
    let k = args.topk.min(opened.model.spec.classes);
    let Opened {
        files,
        model,
        meta,
        numerics,
        reader,
        ..
    } = opened;
    let net = Inference::new(model, numerics, args.inference.layerwise);
    let mut preds = Vec::with_capacity(files.len());
    for chunk in files.chunks(args.input.batch_size) {
        let x = reader.read(chunk)?;
        preds.extend(classify(chunk, &x, &meta, &net, k)?);
    }
    if args.input.model.json {
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

/// The top `k` classes of each image in `chunk`, read as `x`.
fn classify(
    chunk: &[PathBuf],
    x: &Tensor,
    meta: &ModelMeta,
    net: &Inference,
    k: i64,
) -> Result<Vec<Prediction>> {
    let probs = tch::no_grad(|| net.logits(x).softmax(-1, Kind::Float));
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
