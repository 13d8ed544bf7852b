//! Imagenette (fast.ai's), as torchvision's `Imagenette` reads it: ten
//! easily told ImageNet classes, in ImageNet's layout: `ROOT/imagenette2/
//! {train,val}/<wnid>/<image>.JPEG` (ImageFolder's order, `.jpeg` files
//! only), 9,469 images to train on and 3,925 to validate on. Its three
//! sizes are three datasets: `imagenette` (the photographs as ImageNet has
//! them), `imagenette-320px` and `imagenette-160px` (shorter side resized
//! to 320 or 160), in `imagenette2/`, `imagenette2-320/` and
//! `imagenette2-160/`. The classes are torchvision's ImageNet class names
//! of the WordNet ids, whose ids the dataset keeps: a model with
//! ImageNet's 1,000 classes is evaluated on it over those ten. The
//! photographs are read as an image folder's: this module only lists them,
//! and downloads the archive torchvision downloads.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

use super::archive::Archive;
use super::download::Published;
use super::folder::Listed;
use super::folder_scan::scan_only;
use super::imagenet;

/// One of Imagenette's sizes.
pub struct Size {
    /// Its name on the command line and in a run's files.
    pub name: &'static str,
    /// The folder under `--data-dir` the archive holds and torchvision
    /// reads.
    pub folder: &'static str,
    pub published: Published<'static>,
}

/// The classes' WordNet ids (sorted: the classes' order).
pub const WNIDS: [&str; 10] = [
    "n01440764",
    "n02102040",
    "n02979186",
    "n03000684",
    "n03028079",
    "n03394916",
    "n03417042",
    "n03425413",
    "n03445777",
    "n03888257",
];
pub const CLASSES: i64 = WNIDS.len() as i64;
pub const MIRROR: &str = "https://s3.amazonaws.com/fast-ai-imageclas/";

/// The sizes, as torchvision names them (`size="full"`, `"320px"`,
/// `"160px"`) and downloads them.
pub const SIZES: [Size; 3] = [
    Size {
        name: "imagenette",
        folder: "imagenette2",
        published: Published {
            title: "Imagenette",
            // The archive holds the folder itself.
            folder: "",
            files: &["imagenette2.tgz"],
            md5s: &["fe2fc210e6bb7c5664d602c3cd71e612"],
            archives: &[Archive {
                file: "imagenette2.tgz",
                folder: "imagenette2",
                members: &[],
                also: split_class_jpegs,
            }],
            mirror: MIRROR,
        },
    },
    Size {
        name: "imagenette-320px",
        folder: "imagenette2-320",
        published: Published {
            title: "Imagenette (320px)",
            folder: "",
            files: &["imagenette2-320.tgz"],
            md5s: &["3df6f0d01a2c9592104656642f5e78a3"],
            archives: &[Archive {
                file: "imagenette2-320.tgz",
                folder: "imagenette2-320",
                members: &[],
                also: split_class_jpegs,
            }],
            mirror: MIRROR,
        },
    },
    Size {
        name: "imagenette-160px",
        folder: "imagenette2-160",
        published: Published {
            title: "Imagenette (160px)",
            folder: "",
            files: &["imagenette2-160.tgz"],
            md5s: &["e793b78cc4c9e9a4ccc0c1155377a412"],
            archives: &[Archive {
                file: "imagenette2-160.tgz",
                folder: "imagenette2-160",
                members: &[],
                also: split_class_jpegs,
            }],
            mirror: MIRROR,
        },
    },
];

/// The size `--dataset` names, if it is one of Imagenette's.
pub fn named(name: &str) -> Option<&'static Size> {
    SIZES.iter().find(|s| s.name == name)
}

/// The names of Imagenette's sizes, for messages.
pub fn names() -> String {
    SIZES.map(|s| s.name).join(", ")
}

/// For [`Archive::also`]: the `.jpeg` files (any case) of the class
/// folders of `train/` and `val/`.
fn split_class_jpegs(path: &str) -> bool {
    let parts: Vec<&str> = path.split('/').collect();
    matches!(parts[..], ["train" | "val", _, file] if file.to_ascii_lowercase().ends_with(".jpeg"))
}

impl Size {
    /// The size in `root` (`ROOT/imagenette2-320`), read as torchvision
    /// reads it: the folder of its images, and its classes (ImageNet's
    /// names of its WordNet ids) with the images of train (to train on)
    /// and of val (to validate on).
    pub fn listing(&self, root: &Path) -> Result<(PathBuf, Listed)> {
        let base = root.join(self.folder);
        let (train_dir, val_dir) = (base.join("train"), base.join("val"));
        let (wnids, train) = scan_only(&train_dir, "jpeg")?;
        if let Some(odd) = wnids.iter().find(|w| !WNIDS.contains(&w.as_str())) {
            bail!(
                "{}: '{odd}' is not one of Imagenette's {CLASSES} classes (other ImageNet class folders: --dataset imagenet)",
                train_dir.display()
            );
        }
        let (val_wnids, val) = scan_only(&val_dir, "jpeg")?;
        if val_wnids != wnids {
            bail!(
                "{}: class folders {}, where train/ has {}",
                val_dir.display(),
                val_wnids.join(", "),
                wnids.join(", ")
            );
        }
        let listed = Listed {
            classes: imagenet::names(&train_dir, &wnids)?,
            wnids: Some(wnids),
            train,
            val: Some(val),
            partition: None,
            own_val: 0,
        };
        Ok((base, listed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_photographs_of_the_class_folders_are_taken() {
        assert!(split_class_jpegs(
            "train/n01440764/ILSVRC2012_val_00000293.JPEG"
        ));
        assert!(split_class_jpegs("val/n03888257/n03888257_1.jpeg"));
        assert!(!split_class_jpegs("noisy_imagenette.csv") && !split_class_jpegs("train/a.JPEG"));
        assert!(
            !split_class_jpegs("test/n01440764/a.JPEG")
                && !split_class_jpegs("train/n01440764/a.png")
        );
    }

    /// The ids are ImageNet's, sorted, and torchvision's names for them.
    #[test]
    fn the_classes_are_imagenets() {
        assert!(WNIDS.windows(2).all(|w| w[0] < w[1]));
        let names = imagenet::names(Path::new("x"), &WNIDS.map(String::from)).unwrap();
        assert_eq!(
            (names[0].as_str(), names[9].as_str()),
            ("tench", "parachute")
        );
        assert_eq!(names[1], "English springer");
    }
}
