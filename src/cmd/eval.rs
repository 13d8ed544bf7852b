//! `vggctl eval`: top-1/top-5, loss, per-class accuracy and the confusion
//! matrix of a checkpoint on a dataset's test split.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use serde::Serialize;
use tch::Device;
use vggctl::checkpoint::{ModelFile, ModelMeta, meta_for_weights, read_weights};
use vggctl::data::Dataset;
use vggctl::data::augment::{Augment, Normalizer, Preprocess};
use vggctl::data::imagenet;
use vggctl::dist::World;
use vggctl::eval::{AmongClasses, EvalGraph, EvalResult, Scoring, evaluate};
use vggctl::infer::{Inference, Logits};
use vggctl::model::{Head, ModelSpec, Vgg, check_input};
use vggctl::numerics::{Activity, Numerics};
use vggctl::shim;
use vggctl::train::run_dir::config_beside;

use super::data_opts::DataOpts;
use super::opts::{DistOpts, GraphOpts, InferenceOpts, ModelOpts, NumericsOpts};
use super::output::{as_usage, note, print_json, print_out, usage, warn, whole};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A vggctl checkpoint (last/best.safetensors), or a torchvision state
    /// dict (.pth or safetensors: its architecture, head and classes
    /// inferred; with the ImageNet head, torchvision's evaluation transform).
    #[arg(long)]
    checkpoint: PathBuf,
    #[command(flatten)]
    model: ModelOpts,
    #[command(flatten)]
    data: DataOpts,
    #[arg(long, default_value_t = 100, value_parser = whole::<i64>)]
    batch_size: i64,
    /// Evaluate on the first N test images only.
    #[arg(long, value_parser = whole::<i64>)]
    limit_test: Option<i64>,
    /// folder datasets split by --val-split: the training run's --seed.
    #[arg(long, default_value_t = 0, value_parser = whole::<u64>)]
    seed: u64,
    /// Input side for the model; a centre crop's resize keeps its ratio to
    /// it (256/224) [default: the checkpoint's, else 32].
    #[arg(long, value_parser = whole::<i64>)]
    input: Option<i64>,
    /// Data with some of the model's classes (by name; ImageNet's layout by
    /// WordNet id): predict among those classes only, the others' logits
    /// left out (ImageNet-A/-R's protocol), instead of among all the model's.
    #[arg(long)]
    only_data_classes: bool,
    #[command(flatten)]
    numerics: NumericsOpts,
    #[command(flatten)]
    inference: InferenceOpts,
    #[command(flatten)]
    graphs: GraphOpts,
    #[command(flatten)]
    dist: DistOpts,
}

#[derive(Serialize, Clone)]
struct Report {
    checkpoint: PathBuf,
    model: String,
    dataset: String,
    classes: Vec<String>,
    /// Data with some of the model's classes: which, and how scored.
    #[serde(skip_serializing_if = "Option::is_none")]
    subset_of_model: Option<SubsetOf>,
    #[serde(flatten)]
    result: EvalResult,
    /// What ran: precision, layout, the model's form, CUDA graph.
    ran_as: String,
    /// CUDA: the most memory tensors held during the evaluation.
    #[serde(skip_serializing_if = "Option::is_none")]
    peak_gpu_bytes: Option<i64>,
}

/// The data's classes as some of the model's.
#[derive(Serialize, Clone)]
struct SubsetOf {
    model_classes: i64,
    /// The model's index of each of the data's classes.
    indices: Vec<i64>,
    /// "model": among all the model's classes (the confusion matrix's last
    /// column: predicted as a class the data lacks); "data": among the
    /// data's classes only (--only-data-classes).
    predicted_among: &'static str,
}

pub fn run(args: Args) -> Result<()> {
    if args.batch_size < 1 {
        return Err(usage("--batch-size must be at least 1"));
    }
    if let Some(n) = args.limit_test
        && n < 1
    {
        return Err(usage(format!("--limit-test {n} must be at least 1")));
    }
    // Under torchrun, each rank evaluates its part and rank 0 reports the sums.
    let (world, device) = args.dist.join(args.model.device()?)?;
    let file = read_weights(&args.checkpoint)?;
    let (spec, meta) = model_of(&args, &file, &world)?;
    let (dataset, pre) = load_data(&args, meta.as_ref(), device)?;
    let scoring = match_classes(&args.checkpoint, spec.classes, meta.as_ref(), &dataset)?;
    if args.only_data_classes && scoring.subset.is_none() {
        warn(
            "--only-data-classes: the data has all the model's classes; it changes nothing".into(),
        );
    }
    let source = args.checkpoint.display().to_string();
    let model = Vgg::from_state_dict(spec, device, &source, &file.tensors, args.model.values())?;
    let test = dataset.test.limit(args.limit_test).to_device(device);
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

/// The model a weights file holds and how to feed it: from vggctl's
/// metadata, or for a plain state dict, inferred from its weights, with
/// torchvision's evaluation transform for torchvision's ImageNet head
/// (resize 256, crop 224, ImageNet's mean and std).
fn model_of(
    args: &Args,
    file: &ModelFile,
    world: &World,
) -> Result<(ModelSpec, Option<ModelMeta>)> {
    if let Some(meta) = &file.meta {
        return Ok((meta.spec(), Some(meta.clone())));
    }
    let source = args.checkpoint.display().to_string();
    let resolved = args
        .model
        .request()?
        .resolve(&source, &file.tensors, Head::Cifar)?;
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
    let by_name = matches!(dataset.name.as_str(), "folder" | "imagenet");
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
            scoring.classes().into(),
        ),
        _ => (Box::new(net), scoring.clone()),
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
        check_input(input).map_err(as_usage)?;
    }
    let input = args
        .input
        .unwrap_or_else(|| meta.map_or(32, |m| m.input_size));
    let resize = meta.and_then(|m| m.clone().at_input(input).resize);
    let dataset = data.load_test(args.seed, resize.unwrap_or(input * 256 / 224))?;
    let (mean, std) = meta.map_or((dataset.mean, dataset.std), |m| (m.mean, m.std));
    let augment = match resize {
        Some(_) => Augment::ResizedCrop,
        None => Augment::CropFlip { padding: 4 },
    };
    let pre = Preprocess::new(augment, input, Normalizer::new(mean, std, device));
    Ok((dataset, pre))
}

/// More classes than this get no text matrix (it would be wider than any
/// terminal); more label characters than this, rows labelled by index.
const MATRIX_CLASSES: usize = 40;
const MATRIX_LABEL: usize = 24;
/// The confusion matrix's column of the model's classes the data lacks.
const OTHER: &str = "other";

fn render(r: &Report) -> String {
    let e = &r.result;
    // The classes predicted among: the data's, or all the model's.
    let among = match &r.subset_of_model {
        Some(s) if s.predicted_among == "model" => s.model_classes as usize,
        _ => r.classes.len(),
    };
    let top5 = if among > 5 {
        format!("top-5 {:.2}%", e.top5)
    } else {
        // With five classes or fewer, top-5 says nothing.
        format!("top-{among} —")
    };
    // Throughput is measured after the first batch: one batch has none.
    let speed = match e.images_per_s > 0.0 {
        true => format!("{:.0} img/s; ", e.images_per_s),
        false => String::new(),
    };
    let mut s = format!(
        "{} on {} test ({} images): top-1 {:.2}%  {top5}  loss {:.4}  ({speed}{})\n\n",
        r.model, r.dataset, e.images, e.top1, e.loss, r.ran_as
    );
    if let Some(sub) = &r.subset_of_model {
        s += &match sub.predicted_among {
            "model" => format!(
                "The data has {} of the model's {} classes; predicted among all {} (column `other`: predicted as a class the data lacks).\n\n",
                r.classes.len(),
                sub.model_classes,
                sub.model_classes
            ),
            _ => format!(
                "The data has {} of the model's {} classes; predicted among those {} only (--only-data-classes).\n\n",
                r.classes.len(),
                sub.model_classes,
                r.classes.len()
            ),
        };
    }
    let labels: Vec<String> = r
        .classes
        .iter()
        .enumerate()
        .map(|(i, name)| {
            if *name == i.to_string() {
                name.clone()
            } else {
                format!("{i} {name}")
            }
        })
        .collect();
    let w = labels
        .iter()
        .map(|l| l.chars().count())
        .max()
        .unwrap_or(5)
        .max(5);
    let pct = |v: Option<f64>| v.map_or("—".to_string(), |v| format!("{v:.2}%"));
    s += &format!(
        "  {:<w$}  {:>7}  {:>9}  {:>9}  {:>9}\n",
        "class", "images", "recall", "precision", "F1"
    );
    for (i, label) in labels.iter().enumerate() {
        s += &format!(
            "  {label:<w$}  {:>7}  {:>9}  {:>9}  {:>9}\n",
            e.support[i],
            pct(e.per_class[i]),
            pct(e.precision[i]),
            pct(e.f1.get(i).copied().flatten())
        );
    }
    s + &matrix(r, labels, w)
}

/// The confusion matrix, rows labelled as the class table's (`labels`,
/// `w` wide) or, for long names, by index; too many classes, a line.
fn matrix(r: &Report, labels: Vec<String>, w: usize) -> String {
    let e = &r.result;
    let mut s = String::new();
    if r.classes.len() > MATRIX_CLASSES {
        s += &format!(
            "\nconfusion matrix: {} classes are too many to print here; --json holds it (`confusion`)\n",
            r.classes.len()
        );
        return s;
    }
    // Long names: the rows go by index too, the table above is the legend.
    let (labels, w) = match w > MATRIX_LABEL {
        true => {
            let ids: Vec<String> = (0..labels.len()).map(|i| i.to_string()).collect();
            let w = ids.last().map_or(1, |l| l.len()).max(5);
            (ids, w)
        }
        false => (labels, w),
    };
    s += "\nconfusion matrix (rows: true class, columns: predicted class index):\n";
    let cw = e
        .confusion
        .iter()
        .flatten()
        .map(|v| v.to_string().len())
        .chain([(r.classes.len().saturating_sub(1)).to_string().len()])
        .max()
        .unwrap_or(1);
    // Over some of the model's classes: a last column, the others.
    let other = e
        .confusion
        .first()
        .is_some_and(|row| row.len() > r.classes.len());
    let cw = cw.max(if other { OTHER.len() } else { 0 });
    s += &format!("  {:<w$}", "");
    for i in 0..r.classes.len() {
        s += &format!(" {i:>cw$}");
    }
    if other {
        s += &format!(" {OTHER:>cw$}");
    }
    s.push('\n');
    for (label, row) in labels.iter().zip(&e.confusion) {
        s += &format!("  {label:<w$}");
        for v in row {
            s += &format!(" {v:>cw$}");
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three classes, one of them without images, one never predicted.
    fn report() -> Report {
        Report {
            checkpoint: PathBuf::from("m.safetensors"),
            model: "vgg11".into(),
            dataset: "folder".into(),
            classes: vec!["cat".into(), "dog".into(), "a long name".into()],
            subset_of_model: None,
            result: EvalResult {
                images: 4,
                loss: 0.5,
                top1: 50.0,
                top5: 100.0,
                per_class: vec![Some(100.0), Some(0.0), None],
                precision: vec![Some(50.0), None, None],
                f1: vec![Some(200.0 / 3.0), Some(0.0), None],
                support: vec![2, 2, 0],
                confusion: vec![vec![2, 0, 0], vec![2, 0, 0], vec![0, 0, 0]],
                skipped: 0,
                images_per_s: 10.0,
            },
            ran_as: "fp32".into(),
            peak_gpu_bytes: None,
        }
    }

    /// Dashes for undefined figures, not 0.00%; no top-5 with five classes
    /// or fewer; aligned columns.
    #[test]
    fn the_table_shows_dashes_for_undefined_figures() {
        let report = report();
        let text = render(&report);
        assert!(text.contains("top-1 50.00%  top-3 —  loss"), "{text}");
        assert!(text.contains("loss 0.5000  (10 img/s; fp32)"), "{text}");
        // One batch: no throughput measured, none shown (not "0 img/s").
        let mut one_batch = report.clone();
        one_batch.result.images_per_s = 0.0;
        let text1 = render(&one_batch);
        assert!(text1.contains("loss 0.5000  (fp32)"), "{text1}");
        assert!(
            text.contains("  0 cat                2    100.00%     50.00%     66.67%\n"),
            "{text}"
        );
        assert!(
            text.contains("  1 dog                2      0.00%          —      0.00%\n"),
            "{text}"
        );
        assert!(
            text.contains("  2 a long name        0          —          —          —\n"),
            "{text}"
        );
        let matrix: Vec<&str> = text.lines().rev().take(4).collect();
        assert!(matrix.iter().all(|l| l.len() == matrix[0].len()), "{text}");

        // A name longer than the matrix can carry: rows by index, aligned.
        let mut long = report.clone();
        long.classes[2] = "a name far too long to stand before every row".into();
        let text = render(&long);
        let matrix: Vec<&str> = text.lines().rev().take(4).collect();
        assert!(matrix.iter().all(|l| l.len() == matrix[0].len()), "{text}");
        assert_eq!(matrix[0], "  2     0 0 0", "{text}");

        // Too many classes for text: said, and where the numbers are.
        let mut many = report;
        many.classes = (0..41).map(|i| format!("c{i}")).collect();
        let e = &mut many.result;
        (e.per_class, e.precision, e.f1) = (vec![None; 41], vec![None; 41], vec![None; 41]);
        (e.support, e.confusion) = (vec![0; 41], vec![vec![0; 41]; 41]);
        assert!(render(&many).contains("41 classes are too many to print here; --json holds it"));
    }

    /// Three of a model's 1,000 classes: top-5 among the 1,000, said so,
    /// and an aligned `other` column.
    #[test]
    fn a_subset_of_the_models_classes_is_said_and_has_an_other_column() {
        let mut subset = report();
        subset.subset_of_model = Some(SubsetOf {
            model_classes: 1000,
            indices: vec![3, 1, 7],
            predicted_among: "model",
        });
        let e = &mut subset.result;
        e.confusion = vec![vec![1, 0, 0, 1], vec![0, 0, 0, 2], vec![0, 0, 0, 0]];
        let text = render(&subset);
        assert!(text.contains("top-1 50.00%  top-5 100.00%  loss"), "{text}");
        assert!(
            text.contains("The data has 3 of the model's 1000 classes; predicted among all 1000"),
            "{text}"
        );
        let matrix: Vec<&str> = text.lines().rev().take(4).collect();
        assert!(matrix.iter().all(|l| l.len() == matrix[0].len()), "{text}");
        assert!(matrix[3].ends_with("  0     1     2 other"), "{text}");
        assert!(matrix[2].ends_with("  1     0     0     1"), "{text}");
    }
}
