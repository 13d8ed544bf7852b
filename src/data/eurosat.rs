//! EuroSAT (Helber et al., 2019), RGB, as torchvision's `EuroSAT` reads it:
//! an ImageFolder of `ROOT/eurosat/2750/<class>/<image>.jpg`, 27,000
//! Sentinel-2 patches of 64x64 pixels in 10 land-use classes. It has no
//! splits: as a folder without `--val-dir`, the part `--val-split` draws by
//! `--seed` is validated on (and evaluated). The photographs are read as
//! an image folder's: this module only lists them, and downloads the zip
//! torchvision downloads.

use std::path::{Path, PathBuf};

use anyhow::Result;

use super::archive::Archive;
use super::download::Published;
use super::folder::Listed;
use super::folder_scan::scan;

/// The dataset's name on the command line and in a run's files.
pub const NAME: &str = "eurosat";
/// The folder under `--data-dir` its files go into, and the one its zip
/// holds (torchvision's).
pub const FOLDER: &str = "eurosat";
const IMAGES: &str = "2750";
pub const FILES: [&str; 1] = ["EuroSAT.zip"];
pub const MD5S: [&str; 1] = ["c8fa014336c82ac7804f0398fcb19387"];
/// torchvision's source: the zip torchgeo keeps, at a fixed revision.
pub const MIRROR: &str = "https://huggingface.co/datasets/torchgeo/eurosat/resolve/c877bcd43f099cd0196738f714544e355477f3fd/";
/// Its land-use classes (AnnualCrop … SeaLake).
pub const CLASSES: i64 = 10;
/// Its images' side.
pub const SIDE: i64 = 64;

/// Where the dataset comes from, as torchvision downloads it.
pub const PUBLISHED: Published<'static> = Published {
    title: "EuroSAT",
    folder: FOLDER,
    files: &FILES,
    md5s: &MD5S,
    archives: &[Archive {
        file: FILES[0],
        folder: IMAGES,
        members: &[],
        also: class_images,
    }],
    mirror: MIRROR,
};

/// For [`Archive::also`]: the images of the class folders
/// (`<class>/<image>.jpg`).
fn class_images(path: &str) -> bool {
    let parts: Vec<&str> = path.split('/').collect();
    matches!(parts[..], [_, file] if file.to_ascii_lowercase().ends_with(".jpg"))
}

/// The dataset in `base` (`ROOT/eurosat`), read as torchvision reads it:
/// the folder of its images, and its classes with every image, to be held
/// out from.
pub fn listing(base: &Path) -> Result<(PathBuf, Listed)> {
    let dir = base.join(IMAGES);
    let found = scan(&dir)?;
    Listed::unsplit_in(dir, found, ("EuroSAT", CLASSES), "class folders")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_images_of_the_class_folders_are_taken() {
        assert!(class_images("Forest/Forest_1.jpg") && class_images("SeaLake/a.JPG"));
        assert!(!class_images("a.jpg") && !class_images("Forest/sub/a.jpg"));
        assert!(!class_images("Forest/Forest_1.tif"));
    }
}
