//! Country211 (OpenAI's, from YFCC100M), as torchvision's `Country211`
//! reads it: `ROOT/country211/{train,valid,test}/<country>/`, three image
//! folders of 211 countries (ISO 3166 codes, `AD` … `ZW`), 150, 50 and
//! 100 photographs a country. As Oxford 102 Flowers, vggctl trains on
//! train then valid (42,200 images) and validates on test (21,100);
//! `--val-on val` trains on train and validates on valid. The
//! photographs are read as an image folder's: this module only lists
//! them, and downloads the archive torchvision downloads.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

use super::archive::Archive;
use super::download::Published;
use super::folder::Listed;
use super::folder_scan::{LabeledFiles, scan};

/// The dataset's name on the command line and in a run's files.
pub const NAME: &str = "country211";
/// The folder under `--data-dir` the archive holds and torchvision reads.
pub const FOLDER: &str = "country211";
pub const FILES: [&str; 1] = ["country211.tgz"];
pub const MD5S: [&str; 1] = ["84988d7644798601126c29e9877aab6a"];
pub const MIRROR: &str = "https://openaipublic.azureedge.net/clip/data/";
/// Its countries.
pub const CLASSES: i64 = 211;
const SPLITS: [&str; 3] = ["train", "valid", "test"];

/// Where the dataset comes from, as torchvision downloads it.
pub const PUBLISHED: Published<'static> = Published {
    title: "Country211",
    // The archive holds the folder itself.
    folder: "",
    files: &FILES,
    md5s: &MD5S,
    archives: &[Archive {
        file: FILES[0],
        folder: FOLDER,
        members: &[],
        also: split_class_files,
    }],
    mirror: MIRROR,
};

/// For [`Archive::also`]: the files of the splits' class folders
/// (`<split>/<country>/<image>`), which the listing sorts out as
/// ImageFolder does.
fn split_class_files(path: &str) -> bool {
    let parts: Vec<&str> = path.split('/').collect();
    matches!(parts[..], [split, _, _] if SPLITS.contains(&split))
}

/// The dataset in `root/country211`, read as torchvision reads it: the
/// folder of its images, and its classes with the images of train then
/// valid (to train on) and of test (to validate on), each split in
/// ImageFolder's order.
pub fn listing(root: &Path) -> Result<(PathBuf, Listed)> {
    let base = root.join(FOLDER);
    let (classes, mut train) = split(&base, "train", None)?;
    let (_, valid) = split(&base, "valid", Some(&classes))?;
    let (_, test) = split(&base, "test", Some(&classes))?;
    let own_val = valid.len();
    train.extend(valid);
    let listed = Listed {
        classes,
        wnids: None,
        train,
        val: Some(test),
        partition: None,
        own_val,
    };
    Ok((base, listed))
}

/// One split's image folder (torchvision reads each as an ImageFolder):
/// its 211 countries, the same as train's (`like`), and its images.
fn split(base: &Path, name: &str, like: Option<&[String]>) -> Result<(Vec<String>, LabeledFiles)> {
    let dir = base.join(name);
    let (classes, files) = scan(&dir)?;
    if classes.len() as i64 != CLASSES {
        bail!(
            "{}: {} country folders, where Country211 has {CLASSES}",
            dir.display(),
            classes.len()
        );
    }
    if let Some(train) = like
        && let Some(odd) = classes.iter().find(|c| !train.contains(c))
    {
        bail!(
            "{}: '{odd}' is not one of train/'s countries",
            dir.display()
        );
    }
    Ok((classes, files))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_files_of_the_splits_class_folders_are_taken() {
        assert!(split_class_files("train/AD/1234.jpg") && split_class_files("valid/ZW/a.jpg"));
        assert!(split_class_files("test/AD/a.png"));
        assert!(!split_class_files("train/a.jpg") && !split_class_files("other/AD/a.jpg"));
        assert!(!split_class_files("train/AD/sub/a.jpg"));
    }
}
