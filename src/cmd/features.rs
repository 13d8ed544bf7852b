//! `vggctl features`: the outputs of named modules for images, saved as
//! rows (torchvision's `create_feature_extractor` with `return_nodes`):
//! embeddings for retrieval, clustering or a linear probe.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Result, bail};
use serde::Serialize;
use tch::Tensor;
use vggctl::formats::rows::{RowArray, RowFormat, RowWriter};
use vggctl::fsutil::check_target;
use vggctl::model::{ModelSpec, Pool};

use super::images::{ClassFolders, ImagesIn, Opened};
use super::opts::{choice, module_position};
use super::output::{print_json, print_out, say, usage, warn};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    input: ImagesIn,
    /// The file to write, row i for the i-th image (the order stdout lists
    /// them in): .npy (NumPy, one --layer) or .safetensors (an array per
    /// --layer, named by it; the images in its metadata; for one directory
    /// of class folders, `labels`: ImageFolder's targets).
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
}

#[derive(Serialize)]
struct Written {
    path: PathBuf,
    model: String,
    /// Each saved module and the shape of its array (rows first).
    arrays: serde_json::Map<String, serde_json::Value>,
    pool: Option<Pool>,
    images: Vec<PathBuf>,
    /// Class folders: their names, and each image's class.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    labels: Option<Labels>,
}

/// The classes of images read from class folders, as ImageFolder gives
/// them: `classes` (the folders, sorted) and each image's index in them.
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
    let mut opened = args.input.open()?;
    let labels = class_labels(&mut opened.classes);
    let spec = opened.model.spec;
    let (names, wanted) = requested(&args, &spec, format)?;
    if opened.numerics.channels_last {
        opened.model.to_channels_last();
    }
    let arrays = save(&args, format, &opened, (&names, &wanted), labels.as_ref())?;
    let written = Written {
        path: args.out.clone(),
        model: spec.model_name(),
        arrays,
        pool: args.pool,
        images: opened.files,
        labels,
    };
    report(&written, args.input.model.json)
}

/// Writes the outputs of the modules `names` (at positions `wanted`) for
/// every image, a batch at a time, and into safetensors the `labels`
/// (int64) and their classes (metadata); the arrays' shapes by name.
fn save(
    args: &Args,
    format: RowFormat,
    opened: &Opened,
    (names, wanted): (&[String], &[usize]),
    labels: Option<&Labels>,
) -> Result<serde_json::Map<String, serde_json::Value>> {
    let Opened {
        files,
        model,
        numerics,
        reader,
        ..
    } = opened;
    let images: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    let mut metadata = BTreeMap::from([
        ("format".to_string(), "pt".to_string()),
        ("model".to_string(), model.spec.model_name()),
        ("images".to_string(), serde_json::to_string(&images)?),
    ]);
    let labels = labels.filter(|_| format == RowFormat::Safetensors);
    if let Some(l) = labels {
        metadata.insert("classes".into(), serde_json::to_string(&l.classes)?);
    }
    let mut writer = None;
    let mut shapes = serde_json::Map::new();
    for (k, chunk) in files.chunks(args.input.batch_size).enumerate() {
        let x = reader.read(chunk)?;
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
                let shape = [&[files.len() as i64], &a.row_shape[..]].concat();
                shapes.insert(a.name.clone(), shape.into());
            }
            let mut w = RowWriter::create(&args.out, format, &arrays, files.len(), &metadata)?;
            if let Some(l) = labels {
                w.write_array(names.len(), 0, &Tensor::from_slice(&l.labels), &args.out)?;
            }
            writer = Some(w);
        }
        if let Some(w) = writer.as_mut() {
            w.write(k * args.input.batch_size, &ys, &args.out)?;
        }
    }
    let Some(w) = writer else {
        bail!("no images given");
    };
    w.commit(&args.out)?;
    Ok(shapes)
}

/// The summary on stderr and the images in row order on stdout (or all
/// of it as JSON).
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
    let labels = match (&written.labels, written.arrays.contains_key("labels")) {
        (Some(l), true) => format!(", and the labels of {} class folders", l.classes.len()),
        _ => String::new(),
    };
    say(&format!(
        "wrote {} ({} of {}{labels}; row i is the i-th image listed on stdout)",
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
