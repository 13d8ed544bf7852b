//! SUN397 (Xiao et al., 2010), as torchvision's `SUN397` reads it:
//! `ROOT/SUN397/ClassName.txt` names the 397 scene classes by their
//! folders (`/a/abbey`, `/a/apartment_building/outdoor`: the class is the
//! path less its letter, `apartment_building/outdoor`), and each holds its
//! photographs as `sun_<id>.jpg`, 108,753 in all. It has no splits (the
//! publisher's ten partitions are lists torchvision does not read): as a
//! folder without `--val-dir`, the part `--val-split` draws by `--seed` is
//! validated on. The photographs are read as an image folder's: this
//! module only lists them, and downloads the archive torchvision downloads.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::archive::Archive;
use super::download::{Published, is_plain_name};
use super::folder::Listed;
use crate::fsutil::read_text;

/// The dataset's name on the command line and in a run's files.
pub const NAME: &str = "sun397";
/// The folder under `--data-dir` the archive holds and torchvision reads.
pub const FOLDER: &str = "SUN397";
pub const FILES: [&str; 1] = ["SUN397.tar.gz"];
pub const MD5S: [&str; 1] = ["8ca2778205c41d23104230ba66911c7a"];
pub const MIRROR: &str = "http://vision.princeton.edu/projects/2010/SUN/";
/// Its scene classes.
pub const CLASSES: i64 = 397;
const CLASS_LIST: &str = "ClassName.txt";
/// The most bytes the class list may have (it has 9 KB).
const MAX_LIST: u64 = 1 << 20;

/// Where the dataset comes from, as torchvision downloads it.
pub const PUBLISHED: Published<'static> = Published {
    title: "SUN397",
    // The archive holds the folder itself.
    folder: "",
    files: &FILES,
    md5s: &MD5S,
    archives: &[Archive {
        file: FILES[0],
        folder: FOLDER,
        members: &[CLASS_LIST],
        also: scene_photo,
    }],
    mirror: MIRROR,
};

/// For [`Archive::also`] and the listing: a photograph (`sun_<id>.jpg`)
/// in a folder, the name torchvision's `rglob("sun_*.jpg")` takes.
fn scene_photo(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or("");
    path.contains('/') && name.starts_with("sun_") && name.ends_with(".jpg")
}

/// The dataset in `root/SUN397`, read as torchvision reads it: the folder
/// of its images, and its classes with every image (each class folder's
/// photographs in the order of their names), to be held out from.
pub fn listing(root: &Path) -> Result<(PathBuf, Listed)> {
    let base = root.join(FOLDER);
    let folders = class_folders(&base.join(CLASS_LIST))?;
    let classes: Vec<String> = (folders.iter())
        .map(|f| f.split_once('/').map_or("", |(_, c)| c).to_string())
        .collect();
    let mut files = Vec::new();
    for (label, folder) in folders.iter().enumerate() {
        let dir = base.join(folder);
        let reading = || format!("reading {} (a class {CLASS_LIST} names)", dir.display());
        let mut photos = Vec::new();
        for entry in fs::read_dir(&dir).with_context(reading)? {
            let entry = entry.with_context(reading)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if scene_photo(&format!("{folder}/{name}")) && !entry.path().is_dir() {
                photos.push(name);
            }
        }
        photos.sort();
        files.extend(photos.iter().map(|p| (dir.join(p), label as i64)));
    }
    if files.is_empty() {
        bail!(
            "{}: no photographs (sun_*.jpg) in its classes' folders",
            base.display()
        );
    }
    Ok((base, Listed::unsplit(classes, files)))
}

/// `ClassName.txt`'s class folders (`a/abbey`), each a letter and a path
/// of plain names: 397 of them.
fn class_folders(path: &Path) -> Result<Vec<String>> {
    let text = read_text(path, "SUN397's class list", MAX_LIST)?;
    let mut folders = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let folder = line.trim().trim_start_matches('/');
        let parts: Vec<&str> = folder.split('/').collect();
        // torchvision names the class by the line less its first three
        // characters: the folder's letter is one character.
        let letter = parts[0].chars().count() == 1;
        if parts.len() < 2 || !letter || !parts.iter().all(|p| is_plain_name(p)) {
            bail!(
                "{} line {}: '{}' is not a class folder (/<letter>/<class>)",
                path.display(),
                i + 1,
                line.trim()
            );
        }
        folders.push(folder.to_string());
    }
    if folders.len() as i64 != CLASSES {
        bail!(
            "{}: {} classes, where SUN397 has {CLASSES}",
            path.display(),
            folders.len()
        );
    }
    Ok(folders)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_photographs_in_folders_are_taken() {
        assert!(scene_photo("a/abbey/sun_aaalbzqrimafwbiv.jpg"));
        assert!(scene_photo("a/apartment_building/outdoor/sun_a.jpg"));
        assert!(!scene_photo("sun_a.jpg") && !scene_photo("a/abbey/a.jpg"));
        assert!(!scene_photo("a/abbey/sun_a.JPG") && !scene_photo("ClassName.txt"));
    }
}
