//! `vggctl features`: the outputs of named modules for images, saved as
//! rows (torchvision's `create_feature_extractor` with `return_nodes`):
//! embeddings for retrieval, clustering or a linear probe.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Result, bail};
use serde::Serialize;
use tch::Tensor;
use vggctl::data::augment::Preprocess;
use vggctl::data::{Split, dtd};
use vggctl::formats::rows::{RowArray, RowFormat, RowWriter};
use vggctl::fsutil::check_target;
use vggctl::model::{ModelSpec, Pool, Vgg};
use vggctl::numerics::Numerics;

use super::data_opts::DataOpts;
use super::eval_data::{EvalData, load_data};
use super::images::{ClassFolders, ImagesIn, Reader};
use super::opts::{choice, module_position};
use super::output::{print_json, print_out, say, usage, warn, whole};

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("inputs").required(true).args(["images", "dataset"])))]
pub struct Args {
    #[command(flatten)]
    input: ImagesIn,
    #[command(flatten)]
    data: DataOpts,
    /// With --dataset: the split whose images are read, in the dataset's
    /// order (torchvision's `train=True`/`False`, `split=`; oxford-pets:
    /// train is its trainval list; flowers102, dtd, fgvc-aircraft*,
    /// country211: its train split, then val),
    /// as eval reads images (the rows with the split's `labels`).
    #[arg(long, value_parser = ["train", "test"])]
    split: Option<String>,
    /// The file to write, row i for the i-th image (the order stdout lists
    /// them in; with --dataset, the split's image i): .npy (NumPy, one
    /// --layer) or .safetensors (an array per --layer, named by it; the
    /// images in its metadata; for one directory of class folders or a
    /// dataset's split, `labels`: ImageFolder's or the dataset's targets).
    #[arg(short, long, help_heading = "Output")]
    out: PathBuf,
    /// The modules whose outputs are saved, by torchvision's names
    /// (`features.N`, `avgpool`, `flatten`, `classifier.N`: what
    /// create_feature_extractor's return_nodes take), comma-separated or
    /// repeated [default: what the last linear layer reads: `classifier.4`
    /// (VGG's fc7) with the ImageNet head].
    #[arg(
        long,
        value_name = "NAME",
        value_delimiter = ',',
        help_heading = "Output"
    )]
    layer: Vec<String>,
    /// Pool each feature map over its height and width, one value per
    /// channel: avg (global average pooling) or max.
    #[arg(long, value_name = "POOL", value_parser = choice::<Pool>(), help_heading = "Output")]
    pool: Option<Pool>,
    /// Overwrite an existing --out.
    #[arg(long, help_heading = "Output")]
    force: bool,
    /// Read the first N images only (of those listed, or of the split).
    #[arg(long, value_name = "N", value_parser = whole::<usize>)]
    limit: Option<usize>,
}

#[derive(Serialize)]
struct Written {
    path: PathBuf,
    model: String,
    /// Each saved module and the shape of its array (rows first).
    arrays: serde_json::Map<String, serde_json::Value>,
    pool: Option<Pool>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    images: Vec<PathBuf>,
    /// With --dataset: which dataset and split the rows are.
    #[serde(skip_serializing_if = "Option::is_none")]
    dataset: Option<DatasetSplit>,
    /// Class folders or a dataset: the classes' names, and each image's class.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    labels: Option<Labels>,
}

#[derive(Serialize)]
struct DatasetSplit {
    name: String,
    split: String,
}

/// Where the rows' images come from: files, read as the model reads
/// them, or a split of a dataset held in memory, read as eval reads it.
enum Source<'a> {
    Files(&'a [PathBuf], &'a Reader),
    Split(&'a Split, &'a Preprocess),
}

impl Source<'_> {
    fn len(&self) -> usize {
        match self {
            Source::Files(files, _) => files.len(),
            Source::Split(split, _) => split.len() as usize,
        }
    }

    /// The model's inputs for rows `start..start + len`.
    fn inputs(&self, start: usize, len: usize) -> Result<Tensor> {
        match self {
            Source::Files(files, reader) => reader.read(&files[start..start + len]),
            Source::Split(split, pre) => {
                let x = split.images.narrow(0, start as i64, len as i64);
                Ok(pre.eval(&x.to_device(pre.device()), None))
            }
        }
    }
}

/// The classes of images read from class folders, as ImageFolder gives
/// them (`classes`: the folders, sorted; each image's index in them), or
/// a dataset's split's.
#[derive(Serialize)]
struct Labels {
    classes: Vec<String>,
    labels: Vec<i64>,
}

/// The labels to save from what the image arguments said of their
/// classes; a class-folder layout without them said in a warning.
fn class_labels(classes: &mut ClassFolders) -> Option<Labels> {
    match std::mem::replace(classes, ClassFolders::None) {
        ClassFolders::Labeled { classes, labels } => Some(Labels { classes, labels }),
        ClassFolders::Unlabeled(e) => {
            warn(format!("no labels saved: {e:#}"));
            None
        }
        ClassFolders::None => None,
    }
}

/// Each of `names` as its position in `spec.layers()`.
fn positions(spec: &ModelSpec, names: &[String]) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    for (i, name) in names.iter().enumerate() {
        if names[..i].contains(name) {
            return Err(usage(format!("--layer {name} is named twice")));
        }
        let p = module_position(spec, name)?;
        out.push(p);
    }
    Ok(out)
}

/// `y` pooled over its height and width as `pool` asks.
fn pooled(y: Tensor, pool: Option<Pool>) -> Tensor {
    match pool {
        None => y,
        Some(p) => p.apply(&y),
    }
}

/// The modules `args` names (the default if none) and their positions.
fn requested(
    args: &Args,
    spec: &ModelSpec,
    format: RowFormat,
) -> Result<(Vec<String>, Vec<usize>)> {
    let names = match args.layer.is_empty() {
        true => vec![spec.penultimate()],
        false => args.layer.clone(),
    };
    if format == RowFormat::Npy && names.len() > 1 {
        return Err(usage(format!(
            "--out {}: a .npy file holds one array; save {} layers to a .safetensors file",
            args.out.display(),
            names.len()
        )));
    }
    let wanted = positions(spec, &names)?;
    // Modules from `flatten` on give vectors.
    let maps = spec.feature_layers().len() + 1;
    if let (Some(_), Some(k)) = (args.pool, wanted.iter().position(|&p| p >= maps)) {
        return Err(usage(format!(
            "--pool: {} gives a vector per image, with no height and width to pool",
            names[k]
        )));
    }
    Ok((names, wanted))
}

pub fn run(args: Args) -> Result<()> {
    let Some(format) = RowFormat::of(&args.out) else {
        return Err(usage(format!(
            "--out {}: the extension names the format: .npy or .safetensors",
            args.out.display()
        )));
    };
    check_target(&args.out, args.force)?;
    if args.limit == Some(0) {
        return Err(usage("--limit must be at least 1"));
    }
    if args.data.dataset.is_some() {
        return run_on_dataset(&args, format);
    }
    if args.split.is_some() {
        return Err(usage(
            "--split reads a split of a --dataset, not image files",
        ));
    }
    let mut opened = args.input.open()?;
    let mut labels = class_labels(&mut opened.classes);
    if let Some(n) = args.limit {
        opened.files.truncate(n);
        if let Some(l) = labels.as_mut() {
            l.labels.truncate(n);
        }
    }
    let spec = opened.model.spec;
    let (names, wanted) = requested(&args, &spec, format)?;
    if opened.numerics.channels_last {
        opened.model.to_channels_last();
    }
    let images: Vec<String> = (opened.files.iter())
        .map(|f| f.display().to_string())
        .collect();
    let rows = Rows {
        source: Source::Files(&opened.files, &opened.reader),
        labels: labels.as_ref(),
        metadata: BTreeMap::from([("images".into(), serde_json::to_string(&images)?)]),
    };
    let model = (&opened.model, &opened.numerics);
    let arrays = save(&args, format, model, &rows, (&names, &wanted))?;
    let written = Written {
        path: args.out.clone(),
        model: spec.model_name(),
        arrays,
        pool: args.pool,
        images: opened.files,
        dataset: None,
        labels,
    };
    report(&written, args.input.model.json)
}

/// The fold `--fold` selects for `--dataset NAME --split SPLIT`: STL-10's
/// training fold, or DTD's partition (else ignored, with a warning).
fn split_fold(args: &Args, name: &str, split: &str) -> Result<Option<usize>> {
    args.data.check_fold()?;
    if args.data.val_on.is_some() {
        return Err(usage(
            "--val-on: features reads the split --split names (the train split of flowers102, dtd, fgvc-aircraft* and country211 is train then val)",
        ));
    }
    let fold = args
        .data
        .fold
        .filter(|_| name == "stl10" && split == "train" || name == dtd::NAME);
    if args.data.fold.is_some() && fold.is_none() {
        warn(
            "--fold is ignored: it selects a fold of --dataset stl10's training split, or dtd's partition"
                .into(),
        );
    }
    Ok(fold)
}

/// `--dataset NAME --split S`: the rows of the split's images, read as
/// eval reads them, with the split's labels.
fn run_on_dataset(args: &Args, format: RowFormat) -> Result<()> {
    let name = args.data.dataset().to_string();
    if matches!(name.as_str(), "folder" | "imagenet") {
        return Err(usage(format!(
            "--dataset {name}: give the folder itself as the images argument (its class folders give ImageFolder's labels)"
        )));
    }
    let Some(split) = args.split.clone() else {
        return Err(usage(format!(
            "--dataset {name}: name the split to read with --split train or --split test"
        )));
    };
    let fold = split_fold(args, &name, &split)?;
    args.data.unused_source(&name).into_iter().for_each(warn);
    let mut loaded = args.input.open_model()?;
    let spec = loaded.model.spec;
    let (names, wanted) = requested(args, &spec, format)?;
    let how = EvalData {
        data: &args.data,
        read: &args.input.read,
        file: loaded.file.as_deref(),
        seed: None,
        train: split == "train",
        fold,
    };
    let meta = loaded.described.then_some(&loaded.meta);
    let (dataset, pre) = load_data(&how, meta, loaded.device)?;
    let images = match split.as_str() {
        "train" => dataset.train,
        _ => dataset.test,
    };
    let images = images.limit(args.limit.map(|n| n as i64));
    let Some(images) = images.as_resident() else {
        bail!(
            "{}: features reads a split held in memory, and the {split} split is streamed (a prepared file always is; a folder is where its images need more than --cache-mem)",
            dataset.source
        );
    };
    let labels = Labels {
        classes: dataset.classes.clone(),
        labels: Vec::<i64>::try_from(&images.labels)?,
    };
    if loaded.numerics.channels_last {
        loaded.model.to_channels_last();
    }
    let rows = Rows {
        source: Source::Split(images, &pre),
        labels: Some(&labels),
        metadata: BTreeMap::from([
            ("dataset".into(), dataset.name.clone()),
            ("split".into(), split.clone()),
        ]),
    };
    let model = (&loaded.model, &loaded.numerics);
    let arrays = save(args, format, model, &rows, (&names, &wanted))?;
    let written = Written {
        path: args.out.clone(),
        model: spec.model_name(),
        arrays,
        pool: args.pool,
        images: Vec::new(),
        dataset: Some(DatasetSplit {
            name: dataset.name,
            split,
        }),
        labels: Some(labels),
    };
    report(&written, args.input.model.json)
}

/// The rows to save: where their images come from, their labels, and
/// what the file's metadata says of them.
struct Rows<'a> {
    source: Source<'a>,
    labels: Option<&'a Labels>,
    metadata: BTreeMap<String, String>,
}

/// Writes the outputs of the modules `names` (at positions `wanted`) for
/// every row, a batch at a time, and into safetensors the `labels`
/// (int64) and their classes (metadata); the arrays' shapes by name.
fn save(
    args: &Args,
    format: RowFormat,
    (model, numerics): (&Vgg, &Numerics),
    rows: &Rows,
    (names, wanted): (&[String], &[usize]),
) -> Result<serde_json::Map<String, serde_json::Value>> {
    let total = rows.source.len();
    let mut metadata = BTreeMap::from([
        ("format".to_string(), "pt".to_string()),
        ("model".to_string(), model.spec.model_name()),
    ]);
    metadata.extend(rows.metadata.clone());
    let labels = rows.labels.filter(|_| format == RowFormat::Safetensors);
    if let Some(l) = labels {
        metadata.insert("classes".into(), serde_json::to_string(&l.classes)?);
    }
    let mut writer = None;
    let mut shapes = serde_json::Map::new();
    for start in (0..total).step_by(args.input.batch_size) {
        let x = (rows.source).inputs(start, args.input.batch_size.min(total - start))?;
        let ys = tch::no_grad(|| numerics.within(&x, |x| model.forward_to(x, wanted)));
        let ys: Vec<Tensor> = ys.into_iter().map(|y| pooled(y, args.pool)).collect();
        if writer.is_none() {
            let mut arrays: Vec<RowArray> = (ys.iter().zip(names))
                .map(|(y, name)| RowArray::float(name.clone(), y.size()[1..].to_vec()))
                .collect();
            if labels.is_some() {
                arrays.push(RowArray {
                    name: "labels".into(),
                    row_shape: vec![],
                    int64: true,
                });
            }
            for a in &arrays {
                let shape = [&[total as i64], &a.row_shape[..]].concat();
                shapes.insert(a.name.clone(), shape.into());
            }
            let mut w = RowWriter::create(&args.out, format, &arrays, total, &metadata)?;
            if let Some(l) = labels {
                w.write_array(names.len(), 0, &Tensor::from_slice(&l.labels), &args.out)?;
            }
            writer = Some(w);
        }
        if let Some(w) = writer.as_mut() {
            w.write(start, &ys, &args.out)?;
        }
    }
    let Some(w) = writer else {
        bail!("no images given");
    };
    w.commit(&args.out)?;
    Ok(shapes)
}

/// The summary on stderr and the images in row order on stdout (none for
/// a dataset's split), or all of it as JSON.
fn report(written: &Written, json: bool) -> Result<()> {
    if json {
        return print_json(written);
    }
    let arrays: Vec<String> = (written.arrays.iter())
        .filter(|(name, _)| *name != "labels")
        .map(|(name, shape)| {
            let dims: Vec<String> = (shape.as_array().into_iter().flatten())
                .map(|d| d.to_string())
                .collect();
            format!("{name} {}", dims.join("x"))
        })
        .collect();
    let (of, rows) = match &written.dataset {
        Some(d) => (
            "classes",
            format!("image i of the {} split of {}", d.split, d.name),
        ),
        None => ("class folders", "the i-th image listed on stdout".into()),
    };
    let labels = match (&written.labels, written.arrays.contains_key("labels")) {
        (Some(l), true) => format!(", and the labels of {} {of}", l.classes.len()),
        _ => String::new(),
    };
    say(&format!(
        "wrote {} ({} of {}{labels}; row i is {rows})",
        written.path.display(),
        arrays.join(", "),
        written.model
    ));
    let mut s = String::new();
    for image in &written.images {
        s += &format!("{}\n", image.display());
    }
    print_out(&s)
}
