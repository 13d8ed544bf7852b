//! `vggctl eval`: top-1/top-5, loss, per-class accuracy and the confusion
//! matrix of a checkpoint on a dataset's test split.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use tch::Device;
use vggctl::checkpoint::{ModelFile, ModelMeta, meta_for_weights, read_weights};
use vggctl::data::augment::Preprocess;
use vggctl::data::{Dataset, dtd, imagenet, is_image_folder};
use vggctl::dist::World;
use vggctl::eval::{AmongClasses, EvalGraph, Scoring, evaluate};
use vggctl::infer::{Inference, Logits};
use vggctl::model::{Head, ModelSpec, Vgg};
use vggctl::numerics::{Activity, Numerics};
use vggctl::{hub, shim};

use super::data_opts::DataOpts;
use super::eval_data::{EvalData, load_data};
use super::eval_report::{Report, SubsetOf, predictions_csv, render};
use super::launch::run_local_ranks;
use super::opts::{
    DeviceOpts, DistOpts, GraphOpts, InferenceOpts, LoadOpts, ModelOpts, NumericsOpts, ReadOpts,
    checkpoint_in,
};
use super::output::{note, print_json, print_out, usage, warn, whole};
use super::progress::download_bar;

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("model_file").required(true).args(["checkpoint", "weights"])))]
pub struct Args {
    /// A vggctl checkpoint (last/best.safetensors; a run directory means its
    /// best), or a torchvision state dict (.pth or safetensors: its
    /// architecture, head and classes inferred; with the ImageNet head,
    /// torchvision's evaluation transform).
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// `imagenet`: torchvision's published weights for --arch/--bn (found
    /// or downloaded as predict's are), evaluated with torchvision's
    /// evaluation transform on ImageNet's layout by default; or a weights
    /// file, as --checkpoint takes it.
    #[arg(long, value_parser = clap::builder::NonEmptyStringValueParser::new())]
    weights: Option<String>,
    /// The weights file evaluated: --checkpoint's or --weights'.
    #[arg(skip)]
    file: PathBuf,
    #[command(flatten)]
    model: ModelOpts,
    #[command(flatten)]
    load: LoadOpts,
    #[command(flatten)]
    device: DeviceOpts,
    #[command(flatten)]
    data: DataOpts,
    /// Images per evaluation batch.
    #[arg(short, long, default_value_t = 100, value_parser = whole::<i64>)]
    batch_size: i64,
    /// Evaluate on the first N test images only.
    #[arg(long, value_parser = whole::<i64>)]
    limit_test: Option<i64>,
    /// folder datasets split by --val-split: the training run's --seed
    /// [default: the run's, from the config.json beside --checkpoint;
    /// else 0].
    #[arg(long, value_parser = whole::<u64>)]
    seed: Option<u64>,
    #[command(flatten)]
    read: ReadOpts,
    /// Data with some of the model's classes (by name; ImageNet's layout by
    /// WordNet id): predict among those classes only, the others' logits
    /// left out (ImageNet-A/-R's protocol), instead of among all the model's.
    #[arg(long)]
    only_data_classes: bool,
    /// Write each image's prediction to FILE as CSV: the image (its file,
    /// or its index in the test split), the label's and the prediction's
    /// class, both classes' probabilities, and whether they agree (`-`:
    /// on stdout, instead of the report).
    #[arg(long, value_name = "FILE")]
    predictions: Option<PathBuf>,
    /// Overwrite an existing --predictions file.
    #[arg(long, requires = "predictions")]
    force: bool,
    #[command(flatten)]
    numerics: NumericsOpts,
    #[command(flatten)]
    inference: InferenceOpts,
    #[command(flatten)]
    graphs: GraphOpts,
    #[command(flatten)]
    dist: DistOpts,
}

/// Values no evaluation can use.
fn check(args: &Args) -> Result<()> {
    if args.batch_size < 1 {
        return Err(usage("--batch-size must be at least 1"));
    }
    if args.model.json && args.predictions.as_deref() == Some(Path::new("-")) {
        return Err(usage(
            "--predictions - and --json both write to stdout: give --predictions a file",
        ));
    }
    if let Some(n) = args.limit_test
        && n < 1
    {
        return Err(usage(format!("--limit-test {n} must be at least 1")));
    }
    // A restarted evaluation starts again from its first image.
    args.dist.validate(true)
}

pub fn run(mut args: Args) -> Result<()> {
    check(&args)?;
    args.file = weights_file(&args)?;
    if let Some(n) = args.dist.nproc_per_node {
        // What the ranks would all refuse is said once here.
        if let Some(path) = to_file(&args) {
            vggctl::fsutil::check_target(path, args.force)?;
        }
        return run_local_ranks(n, args.dist.max_restarts);
    }
    // Under torchrun, each rank evaluates its part and rank 0 reports the sums.
    let (world, device) = args.dist.join(args.device.get()?)?;
    if let Some(path) = to_file(&args).filter(|_| world.is_main()) {
        vggctl::fsutil::check_target(path, args.force)?;
    }
    let file = read_weights(&args.file)?;
    let (spec, meta) = model_of(&args, &file, &world)?;
    let (dataset, pre) = test_data(&args, meta.as_ref(), device)?;
    let scoring = Scoring {
        each_image: args.predictions.is_some(),
        ..match_classes(&args.file, spec.classes, meta.as_ref(), &dataset)?
    };
    warn_unused(&args, &dataset, &scoring);
    let source = args.file.display().to_string();
    let model = Vgg::from_state_dict(spec, device, &source, &file.tensors, args.load.values())?;
    let test = dataset.test.to_device(device);
    // The training run's precision and layout choices, for the same speed.
    let request = args.numerics.request(Some(&args.graphs), true);
    let numerics = Numerics::decide(&request, device, Activity::Evaluating, &mut warn)?;
    let net = Inference::new(model, numerics.clone(), args.inference.layerwise);
    let form = net.form();
    let (net, scored) = scored_as(net, &scoring, args.only_data_classes, device);
    let mut graph = match numerics.cuda_graphs {
        true => Some(EvalGraph::new(device, &scored)?),
        false => None,
    };
    shim::peak_memory(device, true)?;
    let result = evaluate(
        &*net,
        &scored,
        &test,
        args.batch_size,
        &pre,
        graph.as_mut(),
        &world,
    )?;
    if !world.is_main() {
        return Ok(());
    }
    let report = Report {
        ran_as: numerics.ran_as(form),
        subset_of_model: scoring.subset.map(|indices| SubsetOf {
            model_classes: spec.classes,
            indices,
            predicted_among: if args.only_data_classes {
                "data"
            } else {
                "model"
            },
        }),
        peak_gpu_bytes: shim::peak_memory(device, false)?,
        checkpoint: args.file.clone(),
        model: spec.model_name(),
        dataset: dataset.name.clone(),
        split: if args.data.own_val() { "val" } else { "test" },
        classes: dataset.classes.clone(),
        top1_ci95: result.top1_interval(),
        result,
    };
    let names = meta.as_ref().map(|m| m.class_names.as_slice());
    write_report(&args, &report, &dataset, names)
}

/// The report on stdout (text or `--json`), and with `--predictions` each
/// image's row: to its file, or on stdout in the report's place.
fn write_report(
    args: &Args,
    report: &Report,
    dataset: &Dataset,
    names: Option<&[String]>,
) -> Result<()> {
    if args.predictions.is_some() {
        let csv = predictions_csv(&report.result.each, dataset, names);
        match to_file(args) {
            Some(path) => vggctl::fsutil::write_atomic_bytes(path, csv.as_bytes())?,
            None => return print_out(&csv),
        }
    }
    if args.model.json {
        print_json(report)
    } else {
        print_out(&render(report))
    }
}

/// The file to evaluate: `--checkpoint`'s (a run directory's best), or
/// `--weights`' (`imagenet`: torchvision's file for the model, found or
/// downloaded once, before any rank starts).
fn weights_file(args: &Args) -> Result<PathBuf> {
    match (&args.checkpoint, args.weights.as_deref()) {
        (Some(path), _) => checkpoint_in(path),
        (None, Some("imagenet")) => {
            let spec = args.model.spec(Head::Imagenet)?;
            hub::weights_file("imagenet", spec.arch, spec.bn, &mut download_bar(false))
        }
        (None, Some(path)) => checkpoint_in(Path::new(path)),
        (None, None) => Err(usage("give --checkpoint PATH or --weights imagenet|PATH")),
    }
}

/// The data to evaluate on, as [`load_data`] reads it for the model: its
/// first `--limit-test` test images.
fn test_data(
    args: &Args,
    meta: Option<&ModelMeta>,
    device: Device,
) -> Result<(Dataset, Preprocess)> {
    let how = EvalData {
        data: &args.data,
        read: &args.read,
        file: Some(&args.file),
        seed: args.seed,
        train: false,
        fold: None,
    };
    let (dataset, pre) = load_data(&how, meta, device)?;
    let test = dataset.test.limit(args.limit_test);
    Ok((Dataset { test, ..dataset }, pre))
}

/// The file `--predictions` names (not `-`, stdout).
fn to_file(args: &Args) -> Option<&Path> {
    args.predictions.as_deref().filter(|p| *p != Path::new("-"))
}

/// The model a weights file holds and how to feed it: from vggctl's
/// metadata, or for a plain state dict, inferred from its weights, with
/// torchvision's evaluation transform for torchvision's ImageNet head
/// (resize 256, crop 224, ImageNet's mean and std).
fn model_of(
    args: &Args,
    file: &ModelFile,
    world: &World,
) -> Result<(ModelSpec, Option<ModelMeta>)> {
    let source = args.file.display().to_string();
    let request = args.model.request()?;
    if let Some(meta) = &file.meta {
        request.check_against(&source, meta.spec())?;
        return Ok((meta.spec(), Some(meta.clone())));
    }
    let resolved = request.resolve(&source, &file.tensors, Head::Cifar)?;
    if let Some(line) = resolved.inferred.filter(|_| world.is_main()) {
        note(line);
    }
    let spec = resolved.spec;
    Ok((
        spec,
        (spec.head == Head::Imagenet).then(|| meta_for_weights(spec)),
    ))
}

/// How the model's outputs meet the data's classes: the same classes (by
/// count; for an image folder, by name where the model names its classes:
/// a checkpoint, or torchvision's 1,000 ImageNet classes), or some of the
/// model's classes by name (ImageNet's layout: by WordNet id). Anything
/// else is refused: the scores would be counted against the wrong labels.
fn match_classes(
    checkpoint: &Path,
    classes: i64,
    meta: Option<&ModelMeta>,
    dataset: &Dataset,
) -> Result<Scoring> {
    // A folder's labels are its class names' places in sorted order (a
    // CIFAR file stores its labels; its names are only shown).
    let by_name = is_image_folder(&dataset.name);
    let unnamed = |names: &[String]| {
        names
            .iter()
            .enumerate()
            .all(|(i, n)| *n == format!("class {i}"))
    };
    let names = meta
        .map(|m| m.class_names.as_slice())
        .filter(|n| by_name && !unnamed(n));
    let Some(names) = names else {
        if dataset.classes.len() as i64 != classes {
            bail!(
                "{}: the model has {} classes but {} has {}",
                checkpoint.display(),
                classes,
                dataset.name,
                dataset.classes.len()
            );
        }
        return Ok(classes.into());
    };
    let indices = model_indices(checkpoint, names, dataset)?;
    let same =
        indices.len() == names.len() && indices.iter().enumerate().all(|(i, &m)| m == i as i64);
    Ok(Scoring {
        outputs: classes,
        subset: (!same).then_some(indices),
        each_image: false,
    })
}

/// The model's index of each of the data's classes: by WordNet id for
/// ImageNet's layout and torchvision's 1,000 classes (the ids are what the
/// indices are sorted by), else by name, which must name one of the
/// model's classes, and only one (a checkpoint's names could repeat).
fn model_indices(checkpoint: &Path, names: &[String], dataset: &Dataset) -> Result<Vec<i64>> {
    if let Some(wnids) = &dataset.wnids
        && names == imagenet::classes()
    {
        let all = imagenet::wnids();
        return Ok(wnids
            .iter()
            .filter_map(|w| all.binary_search(&w.as_str()).ok())
            .map(|i| i as i64)
            .collect());
    }
    let shown = match names.len() {
        0..=6 => names.join(", "),
        n => format!("{}, … {n} in all", names[..4].join(", ")),
    };
    let mut indices = Vec::new();
    for class in &dataset.classes {
        let mut at = names.iter().enumerate().filter(|(_, n)| *n == class);
        let why = match (at.next(), at.next()) {
            (Some((i, _)), None) => {
                indices.push(i as i64);
                continue;
            }
            (Some(_), Some(_)) => "names two of the model's classes".to_string(),
            // WordNet-id folders beside torchvision's names: the layout says how.
            (None, _)
                if names == imagenet::classes() && imagenet::wnids().contains(&class.as_str()) =>
            {
                "is a WordNet id: read ImageNet's layout with --dataset imagenet".to_string()
            }
            (None, _) => format!("is not one of the model's classes ({shown})"),
        };
        bail!(
            "{}: class {class:?} of {} {why}",
            checkpoint.display(),
            dataset.source
        );
    }
    Ok(indices)
}

/// The model as scored: among the data's classes only (`only_data`, over
/// some of the model's classes), their logits alone, scored as a model of
/// its own; else the model's every output.
fn scored_as(
    net: Inference,
    scoring: &Scoring,
    only_data: bool,
    device: Device,
) -> (Box<dyn Logits>, Scoring) {
    match &scoring.subset {
        Some(s) if only_data => (
            Box::new(AmongClasses::new(net, s, device)),
            Scoring {
                each_image: scoring.each_image,
                ..scoring.classes().into()
            },
        ),
        _ => (Box::new(net), scoring.clone()),
    }
}

/// Options that change nothing for this data: an interpolation where no
/// image is resized, a download's source where nothing is downloaded, a
/// class subset the data does not make.
fn warn_unused(args: &Args, dataset: &Dataset, scoring: &Scoring) {
    if args.data.fold.is_some() && dataset.name != dtd::NAME {
        warn("--fold is ignored: evaluation reads the test split, which has no folds".into());
    }
    if args.read.interpolation.is_some() && !is_image_folder(&dataset.name) {
        warn(format!(
            "--interpolation is ignored: it applies to image folders only, and {} images are not resized",
            dataset.name
        ));
    }
    args.data
        .unused_source(&dataset.name)
        .into_iter()
        .for_each(warn);
    if args.only_data_classes && scoring.subset.is_none() {
        warn(
            "--only-data-classes: the data has all the model's classes; it changes nothing".into(),
        );
    }
}
