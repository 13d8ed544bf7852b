//! `vggctl eval`: top-1/top-5, loss, per-class accuracy and the confusion
//! matrix of a checkpoint on a dataset's test split.

use std::path::PathBuf;

use anyhow::{Result, bail};
use serde::Serialize;
use tch::Device;
use vggctl::checkpoint::{ModelMeta, read_model_file};
use vggctl::data::Dataset;
use vggctl::data::augment::{Augment, Normalizer, Preprocess};
use vggctl::eval::{EvalGraph, EvalResult, evaluate};
use vggctl::infer::Inference;
use vggctl::model::{Head, Vgg, check_input};
use vggctl::numerics::{Activity, Numerics};
use vggctl::shim;
use vggctl::train::run_dir::config_beside;

use super::data_opts::DataOpts;
use super::opts::{GraphOpts, InferenceOpts, ModelOpts, NumericsOpts};
use super::output::{print_json, print_out, warn};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A vggctl checkpoint (last/best.safetensors), or a torchvision-named
    /// safetensors state dict together with --arch/--bn/--head/--classes.
    #[arg(long)]
    checkpoint: PathBuf,
    #[command(flatten)]
    model: ModelOpts,
    #[command(flatten)]
    data: DataOpts,
    #[arg(long, default_value_t = 100)]
    batch_size: i64,
    /// Evaluate on the first N test images only.
    #[arg(long)]
    limit_test: Option<i64>,
    /// folder datasets split by --val-split: the training run's --seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Input side for the model [default: the checkpoint's, else 32].
    #[arg(long)]
    input: Option<i64>,
    #[command(flatten)]
    numerics: NumericsOpts,
    #[command(flatten)]
    inference: InferenceOpts,
    #[command(flatten)]
    graphs: GraphOpts,
}

#[derive(Serialize)]
struct Report {
    checkpoint: PathBuf,
    model: String,
    dataset: String,
    classes: Vec<String>,
    #[serde(flatten)]
    result: EvalResult,
    /// What ran: precision, layout, the model's form, CUDA graph.
    ran_as: String,
    /// CUDA: the most memory tensors held during the evaluation.
    #[serde(skip_serializing_if = "Option::is_none")]
    peak_gpu_bytes: Option<i64>,
}

pub fn run(args: Args) -> Result<()> {
    if args.batch_size < 1 {
        bail!("--batch-size must be at least 1");
    }
    if let Some(n) = args.limit_test
        && n < 1
    {
        bail!("--limit-test {n} must be at least 1");
    }
    let device = args.model.device()?;
    let file = read_model_file(&args.checkpoint)?;
    let spec = match &file.meta {
        Some(meta) => meta.spec(),
        None => args.model.spec(Head::Cifar)?,
    };
    let (dataset, pre) = load_data(&args, file.meta.as_ref(), device)?;
    if dataset.classes.len() as i64 != spec.classes {
        bail!(
            "{}: the model has {} classes but {} has {}",
            args.checkpoint.display(),
            spec.classes,
            dataset.name,
            dataset.classes.len()
        );
    }
    let mut model = Vgg::new(spec, device);
    model.load_state_dict(
        &args.checkpoint.display().to_string(),
        &file.tensors,
        args.model.values(),
    )?;
    let test = dataset.test.limit(args.limit_test).to_device(device);
    // The training run's precision and layout choices, for the same speed.
    let request = args.numerics.request(Some(&args.graphs), true);
    let numerics = Numerics::decide(&request, device, Activity::Evaluating, &mut warn)?;
    let mut graph = match numerics.cuda_graphs {
        true => Some(EvalGraph::new(device, spec.classes)?),
        false => None,
    };
    let net = Inference::new(model, numerics.clone(), args.inference.layerwise);
    shim::peak_memory(device, true)?;
    let result = evaluate(
        &net,
        spec.classes,
        &test,
        args.batch_size,
        &pre,
        graph.as_mut(),
    )?;
    let report = Report {
        ran_as: numerics.ran_as(net.form()),
        peak_gpu_bytes: shim::peak_memory(device, false)?,
        checkpoint: args.checkpoint.clone(),
        model: spec.model_name(),
        dataset: dataset.name.clone(),
        classes: dataset.classes.clone(),
        result,
    };
    if args.model.json {
        print_json(&report)
    } else {
        print_out(&render(&report))
    }
}

/// The dataset to evaluate on (`--dataset`, else the checkpoint's),
/// and its evaluation transform at the model's input size.
fn load_data(
    args: &Args,
    meta: Option<&ModelMeta>,
    device: Device,
) -> Result<(Dataset, Preprocess)> {
    let mut data = args.data.clone();
    if data.dataset.is_none() {
        data.dataset = meta.map(|m| m.dataset.clone());
    }
    // A checkpoint in its run directory: the data the run trained on, from
    // wherever eval is started (unless --data-dir says otherwise).
    if data.data_dir.is_none()
        && let Some(run) = config_beside(&args.checkpoint)
        && run.dataset == data.dataset()
    {
        data.data_dir = Some(PathBuf::from(run.data_dir));
        if data.val_dir.is_none() {
            data.val_dir = run.val_dir.map(PathBuf::from);
            data.val_split = run.val_split;
        }
    }
    if let Some(input) = args.input {
        check_input(input)?;
    }
    let input = args
        .input
        .unwrap_or_else(|| meta.map_or(32, |m| m.input_size));
    let resize = meta.and_then(|m| m.resize);
    let dataset = data.load(false, args.seed, resize.unwrap_or(input * 256 / 224))?;
    let (mean, std) = meta.map_or((dataset.mean, dataset.std), |m| (m.mean, m.std));
    let augment = match resize {
        Some(_) => Augment::ResizedCrop,
        None => Augment::CropFlip { padding: 4 },
    };
    let pre = Preprocess::new(augment, input, Normalizer::new(mean, std, device));
    Ok((dataset, pre))
}

fn render(r: &Report) -> String {
    let e = &r.result;
    let mut s = format!(
        "{} on {} test ({} images): top-1 {:.2}%  top-5 {:.2}%  loss {:.4}  ({:.0} img/s; {})\n\nper-class accuracy:\n",
        r.model, r.dataset, e.images, e.top1, e.top5, e.loss, e.images_per_s, r.ran_as
    );
    let w = r.classes.iter().map(|c| c.len()).max().unwrap_or(5).max(5);
    for (name, acc) in r.classes.iter().zip(&e.per_class) {
        s += &format!("  {name:<w$}  {acc:6.2}%\n");
    }
    s += "\nconfusion matrix (rows: true class, columns: predicted):\n";
    let cw = e
        .confusion
        .iter()
        .flatten()
        .map(|v| v.to_string().len())
        .max()
        .unwrap_or(1)
        .max(3);
    s += &format!("  {:<w$} ", "");
    for i in 0..r.classes.len() {
        s += &format!(" {i:>cw$}");
    }
    s.push('\n');
    for (i, (name, row)) in r.classes.iter().zip(&e.confusion).enumerate() {
        s += &format!("  {:<w$} ", format!("{i} {name}"));
        for v in row {
            s += &format!(" {v:>cw$}");
        }
        s.push('\n');
    }
    s
}
