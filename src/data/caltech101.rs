//! Caltech-101 (Fei-Fei et al., 2004), as torchvision's `Caltech101` reads
//! it at its default target (the category): `ROOT/caltech101/
//! 101_ObjectCategories/<class>/image_KKKK.jpg`, 8,677 photographs of 101
//! object classes (the sorted class folders but `BACKGROUND_Google`, which
//! is no class). torchvision counts the entries of each class folder and
//! reads `image_0001.jpg` up to that count; vggctl lists the same files in
//! the same order. It has no splits: as a folder without `--val-dir`, the
//! part `--val-split` draws by `--seed` is validated on. It is published
//! as a zip holding `caltech-101/101_ObjectCategories.tar.gz` (and the
//! annotations, not read): that archive is taken from the zip, then the
//! class folders' `.jpg` files from it.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::archive::{Archive, class_jpgs, unpack};
use super::download::{DownloadSource, Published};
use super::folder::Listed;
use super::folder_scan::counted_classes;

/// The dataset's name on the command line and in a run's files.
pub const NAME: &str = "caltech101";
/// The folder under `--data-dir` its files go into (torchvision's).
pub const FOLDER: &str = "caltech101";
const IMAGES: &str = "101_ObjectCategories";
/// The folder of images that is no class.
const BACKGROUND: &str = "BACKGROUND_Google";
pub const FILES: [&str; 1] = ["caltech-101.zip"];
pub const MD5S: [&str; 1] = ["3138e1922a9193bfa496528edbbc45d0"];
pub const MIRROR: &str = "https://data.caltech.edu/records/mzrjq-6wc02/files/";
/// Its object classes.
pub const CLASSES: i64 = 101;

/// Where the dataset comes from, as torchvision downloads it: the zip,
/// of which only the archive of the images is taken.
pub const PUBLISHED: Published<'static> = Published {
    title: "Caltech-101",
    folder: FOLDER,
    files: &FILES,
    md5s: &MD5S,
    archives: &[Archive {
        file: FILES[0],
        folder: "caltech-101",
        members: &["101_ObjectCategories.tar.gz"],
        also: super::archive::none_else,
    }],
    mirror: MIRROR,
};

/// The archive of the images, as the zip gives it.
const IMAGES_ARCHIVE: Archive<'static> = Archive {
    file: "caltech-101/101_ObjectCategories.tar.gz",
    folder: IMAGES,
    members: &[],
    also: class_jpgs,
};

/// `root/caltech101`, where its `101_ObjectCategories/` is (as torchvision
/// leaves it), else downloaded from the mirrors `src` names (None:
/// downloading is off) and extracted.
pub fn fetch(
    root: &Path,
    src: Option<&DownloadSource>,
    progress: &mut dyn FnMut(u64, Option<u64>),
) -> Result<PathBuf> {
    let base = root.join(FOLDER);
    if base.join(IMAGES).exists() {
        return Ok(base);
    }
    if src.is_none() {
        bail!(
            "no Caltech-101 in {}: expected {} and downloading is off; put torchvision's {FOLDER}/ ({IMAGES}/ of {}, from {MIRROR}) into {} by hand, or point --data-dir at a copy (--data-url names a mirror)",
            root.display(),
            base.join(IMAGES).display(),
            FILES[0],
            root.display()
        );
    }
    PUBLISHED.fetch_missing(root, src, progress)?;
    let taken = unpack(&base, &IMAGES_ARCHIVE);
    // The archive taken from the zip goes: the next run takes it again.
    let _ = fs::remove_dir_all(base.join("caltech-101"));
    taken.with_context(|| format!("could not extract Caltech-101's images from {}", FILES[0]))?;
    Ok(base)
}

/// The dataset in `base` (`ROOT/caltech101`), read as torchvision reads
/// it: the folder of its images, and its classes with every image, to be
/// held out from.
pub fn listing(base: &Path) -> Result<(PathBuf, Listed)> {
    let dir = base.join(IMAGES);
    let found = counted_classes(
        &dir,
        BACKGROUND,
        |_| true,
        |_, k| format!("image_{k:04}.jpg"),
    )?;
    let counted = format!("class folders (but {BACKGROUND})");
    Listed::unsplit_in(dir, found, ("Caltech-101", CLASSES), &counted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_jpgs_of_the_class_folders_are_taken() {
        assert!(class_jpgs("accordion/image_0001.jpg"));
        assert!(!class_jpgs("accordion/sub/image_0001.jpg") && !class_jpgs("image_0001.jpg"));
        assert!(!class_jpgs("accordion/Thumbs.db"));
    }
}
