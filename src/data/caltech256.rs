//! Caltech-256 (Griffin et al., 2007), as torchvision's `Caltech256` reads
//! it: `ROOT/caltech256/256_ObjectCategories/<NNN.name>/`, 30,607 images of
//! 256 object classes and a clutter class (257 in all: `001.ak47` …
//! `257.clutter`, sorted). torchvision counts the `.jpg` entries of each
//! class folder and reads `NNN_0001.jpg` up to that count (`NNN` the
//! class's position, from 1), so a class folder's subfolders (`056.dog/
//! greg/`) and other files are not read; vggctl lists the same files in the
//! same order. It has no splits: as a folder without `--val-dir`, the part
//! `--val-split` draws by `--seed` is validated on. The photographs are
//! read as an image folder's: this module only lists them, and downloads
//! the archive torchvision downloads.

use std::path::{Path, PathBuf};

use anyhow::Result;

use super::archive::{Archive, class_jpgs};
use super::download::Published;
use super::folder::Listed;
use super::folder_scan::counted_classes;

/// The dataset's name on the command line and in a run's files.
pub const NAME: &str = "caltech256";
/// The folder under `--data-dir` its archive goes into (torchvision's).
pub const FOLDER: &str = "caltech256";
const IMAGES: &str = "256_ObjectCategories";
pub const FILES: [&str; 1] = ["256_ObjectCategories.tar"];
pub const MD5S: [&str; 1] = ["67b4f42ca05d46448c6bb8ecd2220f6d"];
pub const MIRROR: &str = "https://data.caltech.edu/records/nyy15-4j048/files/";
/// Its 256 object classes and the clutter class.
pub const CLASSES: i64 = 257;

/// Where the dataset comes from, as torchvision downloads it.
pub const PUBLISHED: Published<'static> = Published {
    title: "Caltech-256",
    folder: FOLDER,
    files: &FILES,
    md5s: &MD5S,
    archives: &[Archive {
        file: FILES[0],
        folder: IMAGES,
        members: &[],
        also: class_jpgs,
    }],
    mirror: MIRROR,
};

/// The dataset in `base` (`ROOT/caltech256`), read as torchvision reads
/// it: the folder of its images, and its classes with every image, to be
/// held out from.
pub fn listing(base: &Path) -> Result<(PathBuf, Listed)> {
    let dir = base.join(IMAGES);
    let found = counted_classes(
        &dir,
        "",
        |f| f.ends_with(".jpg"),
        |c, k| format!("{:03}_{k:04}.jpg", c + 1),
    )?;
    Listed::unsplit_in(dir, found, ("Caltech-256", CLASSES), "class folders")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_jpgs_of_the_class_folders_are_taken() {
        assert!(class_jpgs("001.ak47/001_0001.jpg"));
        assert!(!class_jpgs("056.dog/greg/a.jpg") && !class_jpgs("198.spider/RENAME2"));
        assert!(!class_jpgs("a.jpg") && !class_jpgs("001.ak47/001_0001.JPG"));
    }
}
