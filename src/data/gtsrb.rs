//! The German Traffic Sign Recognition Benchmark (Stallkamp et al., 2012),
//! as torchvision's `GTSRB` reads it: `ROOT/gtsrb/GTSRB/Training/<class>/
//! <image>.ppm` (ImageFolder's order, `.ppm` files only; the class folders
//! `00000` to `00042`) to train on, and the images of
//! `GTSRB/Final_Test/Images/` that `gtsrb/GT-final_test.csv` lists (`;`
//! separated, its `Filename` and `ClassId` columns) to validate on: 39,209
//! and 12,630 photographs of 43 signs, 15 to 250 pixels a side. The
//! photographs are read as an image folder's: this module only lists
//! them, and downloads the three zips torchvision downloads.
//!
//! torchvision gives its classes no names; vggctl names them by the signs
//! they are (the benchmark's numbering), so that `predict` says "Stop"
//! rather than "14".

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

use super::archive::{Archive, none_else};
use super::download::{Published, is_plain_name};
use super::folder::Listed;
use super::folder_scan::scan_only;
use super::folder_scan::{LabeledFiles, some_listed};
use crate::fsutil::read_text;

/// The dataset's name on the command line and in a run's files.
pub const NAME: &str = "gtsrb";
/// The folder under `--data-dir` its files go into, as torchvision's.
pub const FOLDER: &str = "gtsrb";
pub const FILES: [&str; 3] = [
    "GTSRB-Training_fixed.zip",
    "GTSRB_Final_Test_Images.zip",
    "GTSRB_Final_Test_GT.zip",
];
pub const MD5S: [&str; 3] = [
    "513f3c79a4c5141765e10e952eaa2478",
    "c7e4e6327067d32654124b0fe9e82185",
    "fe31e9c9270bbcd7b84b7f21a9d9d9e5",
];
pub const MIRROR: &str = "https://sid.erda.dk/public/archives/daaeac0d7ce1152aea9b61d9f1e19370/";
/// The signs, in the benchmark's numbering (class folder `000NN`,
/// `ClassId` NN).
pub const SIGNS: [&str; 43] = [
    "Speed limit (20km/h)",
    "Speed limit (30km/h)",
    "Speed limit (50km/h)",
    "Speed limit (60km/h)",
    "Speed limit (70km/h)",
    "Speed limit (80km/h)",
    "End of speed limit (80km/h)",
    "Speed limit (100km/h)",
    "Speed limit (120km/h)",
    "No passing",
    "No passing for vehicles over 3.5 metric tons",
    "Right-of-way at the next intersection",
    "Priority road",
    "Yield",
    "Stop",
    "No vehicles",
    "Vehicles over 3.5 metric tons prohibited",
    "No entry",
    "General caution",
    "Dangerous curve to the left",
    "Dangerous curve to the right",
    "Double curve",
    "Bumpy road",
    "Slippery road",
    "Road narrows on the right",
    "Road work",
    "Traffic signals",
    "Pedestrians",
    "Children crossing",
    "Bicycles crossing",
    "Beware of ice/snow",
    "Wild animals crossing",
    "End of all speed and passing limits",
    "Turn right ahead",
    "Turn left ahead",
    "Ahead only",
    "Go straight or right",
    "Go straight or left",
    "Keep right",
    "Keep left",
    "Roundabout mandatory",
    "End of no passing",
    "End of no passing by vehicles over 3.5 metric tons",
];
pub const CLASSES: i64 = SIGNS.len() as i64;
/// The folder of the training images, and of the test images.
const TRAINING: &str = "GTSRB/Training";
const TEST: &str = "GTSRB/Final_Test/Images";
/// The list of the test images and their classes.
const TEST_LIST: &str = "GT-final_test.csv";
/// The most bytes that list may have (it has about 0.5 MB).
const MAX_LIST: u64 = 16 << 20;

/// Where the dataset comes from, as torchvision downloads it.
pub const PUBLISHED: Published<'static> = Published {
    title: "GTSRB",
    folder: FOLDER,
    files: &FILES,
    md5s: &MD5S,
    archives: &[
        Archive {
            file: FILES[0],
            folder: TRAINING,
            members: &[],
            also: class_ppms,
        },
        Archive {
            file: FILES[1],
            folder: TEST,
            members: &[],
            also: ppms,
        },
        Archive {
            file: FILES[2],
            folder: "",
            members: &[TEST_LIST],
            also: none_else,
        },
    ],
    mirror: MIRROR,
};

/// Whether a file name is a PPM image's (any case, as torchvision's
/// extension check).
fn is_ppm(name: &str) -> bool {
    name.to_ascii_lowercase().ends_with(".ppm")
}

/// For [`Archive::also`]: the images of the class folders (`<class>/
/// <image>.ppm`).
fn class_ppms(path: &str) -> bool {
    let parts: Vec<&str> = path.split('/').collect();
    matches!(parts[..], [_, file] if is_ppm(file))
}

/// For [`Archive::also`]: the images directly in the folder.
fn ppms(path: &str) -> bool {
    !path.contains('/') && is_ppm(path)
}

/// The dataset in `base` (`ROOT/gtsrb`), read as torchvision reads it:
/// the folder of its images, and its signs with the training images (to
/// train on) and the listed test images (to validate on).
pub fn listing(base: &Path) -> Result<(PathBuf, Listed)> {
    let (train, test) = (training(&base.join(TRAINING))?, test_list(base)?);
    let classes = SIGNS.map(String::from).to_vec();
    Ok((base.join("GTSRB"), Listed::split(classes, train, test)))
}

/// The `.ppm` images of the class folders `00000` to `00042` in `dir`, in
/// ImageFolder's order, each labelled by its folder.
fn training(dir: &Path) -> Result<LabeledFiles> {
    let (folders, files) = scan_only(dir, "ppm")?;
    let numbered = |f: &String| f.len() == 5 && f.parse::<usize>().is_ok_and(|n| n < SIGNS.len());
    if let Some(odd) = folders.iter().find(|f| !numbered(f)) {
        bail!(
            "{}: '{odd}' is not one of GTSRB's class folders (00000 to 00042)",
            dir.display()
        );
    }
    if folders.len() != SIGNS.len() {
        bail!(
            "{}: {} class folders, where GTSRB has {CLASSES} (00000 to 00042)",
            dir.display(),
            folders.len()
        );
    }
    Ok(files)
}

/// `GT-final_test.csv`'s images (in `GTSRB/Final_Test/Images/`) and
/// classes, in its order: `;`-separated rows under a header naming the
/// columns, of which `Filename` and `ClassId` are read (as Python's
/// `csv.DictReader` with `skipinitialspace` reads them).
pub fn test_list(base: &Path) -> Result<LabeledFiles> {
    let path = base.join(TEST_LIST);
    let text = read_text(&path, "GTSRB's list of test images", MAX_LIST)?;
    let mut lines = (text.lines().enumerate()).filter(|(_, l)| !l.trim().is_empty());
    let fields =
        |l: &'_ str| -> Vec<String> { l.split(';').map(|f| f.trim_start().into()).collect() };
    let header = lines.next().map(|(_, l)| fields(l)).unwrap_or_default();
    let column = |name: &str| header.iter().position(|h| h == name);
    let (Some(file_at), Some(class_at)) = (column("Filename"), column("ClassId")) else {
        bail!(
            "{}: its header names no Filename and ClassId columns",
            path.display()
        );
    };
    let images = base.join(TEST);
    let mut files = Vec::new();
    for (n, line) in lines {
        let at = || format!("{}: line {}", path.display(), n + 1);
        let row = fields(line);
        let (Some(file), Some(class)) = (row.get(file_at), row.get(class_at)) else {
            bail!("{}: {} fields, too few for its header's", at(), row.len());
        };
        if !is_plain_name(file) {
            bail!("{}: '{file}' is not a plain file name", at());
        }
        let label = class
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|&c| c < SIGNS.len());
        let Some(label) = label else {
            bail!("{}: ClassId '{class}' is not one of 0 to 42", at());
        };
        files.push((images.join(file), label as i64));
    }
    some_listed(&path, files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_images_of_the_folders_are_taken() {
        assert!(class_ppms("00000/00000_00000.ppm") && class_ppms("00042/a.PPM"));
        assert!(!class_ppms("00000/GT-00000.csv") && !class_ppms("a.ppm"));
        assert!(!class_ppms("00000/sub/a.ppm"));
        assert!(ppms("00000.ppm") && !ppms("GT-final_test.test.csv") && !ppms("sub/00000.ppm"));
    }
}
