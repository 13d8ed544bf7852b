//! Stanford Cars (Krause et al., 2013), as torchvision's `StanfordCars`
//! reads it: `ROOT/stanford_cars/` holding `devkit/cars_meta.mat` (the
//! 196 class names, a cell array `class_names`), `devkit/cars_train_annos.mat`
//! and `cars_test_annos_withlabels.mat` (struct arrays `annotations`, each
//! image's `fname` under `cars_train/` or `cars_test/` and its `class`, 1
//! to 196), 8,144 training and 8,041 test photographs. The bounding boxes
//! are not read (torchvision reads none). The dataset's site is gone and
//! torchvision no longer downloads it, so neither does vggctl: its files
//! are put in place by hand. The photographs are read as an image
//! folder's: this module only lists them.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::download::is_plain_name;
use super::folder::Listed;
use super::folder_scan::LabeledFiles;
use crate::formats::mat::{MatValue, read_mat_values};
use crate::fsutil::read_regular;

/// The dataset's name on the command line and in a run's files.
pub const NAME: &str = "stanford-cars";
/// The folder under `--data-dir` torchvision reads.
pub const FOLDER: &str = "stanford_cars";
/// Its classes (make, model and year).
pub const CLASSES: i64 = 196;
/// The files torchvision reads, besides the two folders of images.
const META: &str = "devkit/cars_meta.mat";
const TRAIN: (&str, &str) = ("devkit/cars_train_annos.mat", "cars_train");
const TEST: (&str, &str) = ("cars_test_annos_withlabels.mat", "cars_test");
/// The most bytes one of its MAT-files may have (the annotations: 0.4 MB).
const MAX_BYTES: u64 = 64 << 20;

/// `root/stanford_cars`, where every file and folder torchvision reads is
/// there; else the one line that says what is missing and where it goes.
pub fn base(root: &Path) -> Result<PathBuf> {
    let base = root.join(FOLDER);
    let needed = [META, TRAIN.0, TRAIN.1, TEST.0, TEST.1];
    if let Some(missing) = needed.iter().find(|f| !base.join(f).exists()) {
        bail!(
            "no Stanford Cars in {}: {} is not there, and the dataset cannot be downloaded (its site is gone; torchvision no longer downloads it either): put its devkit/, cars_train/, cars_test/ and cars_test_annos_withlabels.mat into {}",
            root.display(),
            base.join(missing).display(),
            base.display()
        );
    }
    Ok(base)
}

/// The dataset in `base` (`ROOT/stanford_cars`), read as torchvision reads
/// it: its classes, the training images to train on and the test images
/// to validate on, in the annotations' order.
pub fn listing(base: &Path) -> Result<(PathBuf, Listed)> {
    let classes = class_names(&base.join(META))?;
    let (train, test) = (annotations(base, TRAIN)?, annotations(base, TEST)?);
    Ok((base.to_path_buf(), Listed::split(classes, train, test)))
}

/// The variable `name` of the MAT-file at `path`.
fn variable(path: &Path, name: &str) -> Result<MatValue> {
    let bytes = read_regular(path, "a Stanford Cars MAT-file", MAX_BYTES)?;
    let vars = read_mat_values(&mut bytes.as_slice(), &[name], MAX_BYTES)
        .with_context(|| format!("{}: not a MAT-file of Stanford Cars", path.display()))?;
    match vars.into_iter().next() {
        Some((_, value)) => Ok(value),
        None => bail!("{}: no '{name}' variable", path.display()),
    }
}

/// `cars_meta.mat`'s `class_names`: 196 names, label by label.
fn class_names(path: &Path) -> Result<Vec<String>> {
    let names = match variable(path, "class_names")? {
        MatValue::Cell(_, cells) => (cells.into_iter())
            .map(|c| match c {
                MatValue::Text(t) => Some(t),
                _ => None,
            })
            .collect::<Option<Vec<_>>>(),
        _ => None,
    };
    match names {
        Some(names) if names.len() as i64 == CLASSES => Ok(names),
        Some(names) => bail!(
            "{}: 'class_names' has {} names, where Stanford Cars has {CLASSES}",
            path.display(),
            names.len()
        ),
        None => bail!(
            "{}: 'class_names' is not a cell array of text",
            path.display()
        ),
    }
}

/// A split's images: the annotations' `fname` in its folder, labelled by
/// `class` less one.
fn annotations(base: &Path, (file, folder): (&str, &str)) -> Result<LabeledFiles> {
    let path = base.join(file);
    let value = variable(&path, "annotations")?;
    let MatValue::Struct(_, _, items) = &value else {
        bail!(
            "{}: 'annotations' is {}, not a struct array",
            path.display(),
            value.kind()
        );
    };
    let mut files = Vec::with_capacity(items.len());
    for i in 0..items.len() {
        let bad = |what: &str| anyhow::anyhow!("{}: annotation {i}: {what}", path.display());
        let fname = match value.field(i, "fname") {
            Some(MatValue::Text(t)) if is_plain_name(t) => t,
            Some(MatValue::Text(t)) => return Err(bad(&format!("'{t}' is not a file name"))),
            _ => return Err(bad("no text 'fname'")),
        };
        let class = value.field(i, "class").and_then(MatValue::scalar);
        let label = match class {
            Some(c) if c.fract() == 0.0 && (1.0..=CLASSES as f64).contains(&c) => c as i64 - 1,
            Some(c) => return Err(bad(&format!("class {c} is not from 1 to {CLASSES}"))),
            None => return Err(bad("no number 'class'")),
        };
        files.push((base.join(folder).join(fname), label));
    }
    if files.is_empty() {
        bail!("{}: no annotations", path.display());
    }
    Ok(files)
}
