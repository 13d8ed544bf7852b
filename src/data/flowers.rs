//! Oxford 102 Flowers, as torchvision's `Flowers102` reads it:
//! `ROOT/flowers-102/jpg/image_NNNNN.jpg`, each image's class (1 to 102)
//! in `imagelabels.mat` and the splits' image numbers in `setid.mat`
//! (`trnid`, `valid`, `tstid`). vggctl trains on the train and val
//! splits together (2,040 images, as transfer-learning benchmarks do)
//! and validates on the test split (6,149); the photographs are read as
//! an image folder's. This module only lists them, and downloads the
//! three files torchvision downloads.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::archive::{Archive, jpg_files};
use super::download::Published;
use super::folder::Listed;
use super::folder_scan::LabeledFiles;
use crate::formats::mat::{MatArray, Values, read_mat};

/// The dataset's name on the command line and in a run's files.
pub const NAME: &str = "flowers102";
/// The folder under `--data-dir` torchvision downloads into and reads.
pub const FOLDER: &str = "flowers-102";
/// The three files, in the order of [`MD5S`].
pub const FILES: [&str; 3] = ["102flowers.tgz", "imagelabels.mat", "setid.mat"];
pub const MD5S: [&str; 3] = [
    "52808999861908f626f3c1f4e79d11fa",
    "e0620be6f572b9609742df49c70aed4d",
    "a5357ecc9cb78c4bef273ce3793fc85c",
];
pub const MIRROR: &str = "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/";
/// The classes: the labels run from 1 to this.
pub const CLASSES: i64 = 102;
/// The most values a MAT-file's array may hold (8,189 images).
const MAX_VALUES: u64 = 1 << 20;
/// The folder the archive holds.
const IMAGES: &str = "jpg";

/// torchvision's names of the classes (`Flowers102.classes`), label by label.
pub fn class_names() -> Vec<String> {
    include_str!("flowers102_classes.txt")
        .lines()
        .map(String::from)
        .collect()
}

/// Where the dataset comes from, as torchvision downloads it.
pub const PUBLISHED: Published<'static> = Published {
    title: "Oxford 102 Flowers",
    folder: FOLDER,
    files: &FILES,
    md5s: &MD5S,
    archives: &[Archive {
        file: FILES[0],
        folder: IMAGES,
        members: &[],
        also: jpg_files,
    }],
    mirror: MIRROR,
};

/// The dataset in `base` (`ROOT/flowers-102`), read as torchvision reads
/// it: the folder of its images, and its classes with the images of train
/// and val (to train on) and of test (to validate on), in `setid.mat`'s order.
pub fn listing(base: &Path) -> Result<(PathBuf, Listed)> {
    let labels_file = base.join(FILES[1]);
    let [labels] = whole_numbers(&labels_file, ["labels"], 1..=CLASSES)?;
    let n = labels.len() as i64;
    let setid = base.join(FILES[2]);
    let [train, val, test] = whole_numbers(&setid, ["trnid", "valid", "tstid"], 1..=n)?;
    let images = base.join(IMAGES);
    let files = |ids: &[i64]| -> LabeledFiles {
        (ids.iter())
            .map(|&id| {
                let file = images.join(format!("image_{id:05}.jpg"));
                (file, labels[id as usize - 1] - 1)
            })
            .collect()
    };
    let listed = Listed {
        classes: class_names(),
        wnids: None,
        train: [files(&train), files(&val)].concat(),
        val: Some(files(&test)),
        partition: None,
        own_val: val.len(),
    };
    Ok((images, listed))
}

/// The arrays `names` of the MAT-file `path`, read in one pass: whole
/// numbers in `range`, as many as each one's one dimension other than 1 says.
fn whole_numbers<const N: usize>(
    path: &Path,
    names: [&str; N],
    range: std::ops::RangeInclusive<i64>,
) -> Result<[Vec<i64>; N]> {
    let what = || {
        format!(
            "{}: not Oxford 102 Flowers' {}",
            path.display(),
            names.join(", ")
        )
    };
    // Checked before opening: a FIFO would block the open.
    let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    if !meta.is_file() {
        bail!("{}: not a regular file", path.display());
    }
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let vars = read_mat(&mut BufReader::new(file), &names, MAX_VALUES).with_context(what)?;
    let one = |name: &str| -> Result<Vec<i64>> {
        let Some((_, array)) = vars.iter().find(|(n, _)| n == name) else {
            bail!("{}: no '{name}' array", path.display());
        };
        numbers(array, range.clone()).with_context(|| format!("{}: '{name}'", path.display()))
    };
    let out = names.iter().map(|n| one(n)).collect::<Result<Vec<_>>>()?;
    Ok(out.try_into().expect("one array per name"))
}

/// A vector's values (a 1 x N or N x 1 array), each a whole number in `range`.
fn numbers(array: &MatArray, range: std::ops::RangeInclusive<i64>) -> Result<Vec<i64>> {
    if array.is_empty() || array.dims.iter().filter(|&&d| d != 1).count() > 1 {
        bail!("dimensions {:?}, expected a vector", array.dims);
    }
    let values: Vec<f64> = match &array.values {
        Values::Bytes(b) => b.iter().map(|&v| v as f64).collect(),
        Values::Numbers(v) => v.clone(),
    };
    let (low, high) = (*range.start(), *range.end());
    (values.iter().enumerate())
        .map(|(i, &v)| match v {
            v if v.fract() == 0.0 && (low as f64..=high as f64).contains(&v) => Ok(v as i64),
            v => bail!("value {i} is {v}, not a whole number from {low} to {high}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// torchvision's 102 names, the first and the last where it has them.
    #[test]
    fn the_classes_are_torchvisions() {
        let names = class_names();
        assert_eq!(names.len(), CLASSES as usize);
        assert_eq!(names[0], "pink primrose");
        assert_eq!(names[101], "blackberry lily");
    }
}
