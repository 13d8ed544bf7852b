//! Food-101, as torchvision's `Food101` reads it: `ROOT/food-101/images/
//! <class>/<id>.jpg`, the splits listed by `meta/train.json` and
//! `meta/test.json` (each class's images, `"<class>/<id>"`); the classes are
//! the training list's, sorted. The photographs are read as an image
//! folder's: this module only lists them, and downloads the archive
//! torchvision downloads.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::archive::{Archive, class_folder_jpgs};
use super::download::{Published, is_plain_name};
use super::folder::Listed;
use super::folder_scan::LabeledFiles;
use crate::fsutil::read_regular;

/// The dataset's name on the command line and in a run's files.
pub const NAME: &str = "food101";
/// The folder under `--data-dir` the archive holds and torchvision reads.
pub const FOLDER: &str = "food-101";
pub const FILES: [&str; 1] = ["food-101.tar.gz"];
pub const MD5S: [&str; 1] = ["85eeb15f3717b99a5da872d97d918f87"];
pub const MIRROR: &str = "http://data.vision.ee.ethz.ch/cvl/";
/// The classes the lists name.
pub const CLASSES: i64 = 101;
/// The most bytes a split's list may have (train.json has 1.5 MB).
const MAX_LIST: u64 = 64 << 20;

/// Where the dataset comes from, as torchvision downloads it.
pub const PUBLISHED: Published<'static> = Published {
    title: "Food-101",
    // The archive holds the folder itself.
    folder: "",
    files: &FILES,
    md5s: &MD5S,
    archives: &[Archive {
        file: FILES[0],
        folder: FOLDER,
        members: &["meta/train.json", "meta/test.json"],
        also: class_folder_jpgs,
    }],
    mirror: MIRROR,
};

/// The dataset in `root/food-101`, read as torchvision reads it: the
/// folder of its images, and its classes with the images of train (to
/// train on) and of test (to validate on), in the lists' order.
pub fn listing(root: &Path) -> Result<(PathBuf, Listed)> {
    let base = &root.join(FOLDER);
    let images = base.join("images");
    let train = read_list(base, "train")?;
    let test = read_list(base, "test")?;
    let mut classes: Vec<String> = train.iter().map(|(c, _)| c.clone()).collect();
    classes.sort();
    if classes.len() as i64 != CLASSES {
        bail!(
            "{}: {} classes, where Food-101 has {CLASSES}",
            list_path(base, "train").display(),
            classes.len()
        );
    }
    let files = |split: &str, list: Vec<(String, Vec<String>)>| -> Result<LabeledFiles> {
        let mut files = Vec::new();
        for (class, ids) in list {
            let Ok(label) = classes.binary_search(&class) else {
                bail!(
                    "{}: class '{class}' is not one of train.json's",
                    list_path(base, split).display()
                );
            };
            let path = |id: &String| images.join(format!("{id}.jpg"));
            files.extend(ids.iter().map(|id| (path(id), label as i64)));
        }
        Ok(files)
    };
    let (train, test) = (files("train", train)?, files("test", test)?);
    Ok((images, Listed::split(classes, train, test)))
}

fn list_path(base: &Path, split: &str) -> PathBuf {
    base.join("meta").join(format!("{split}.json"))
}

/// `meta/<split>.json`: each class with its images' paths under
/// `images/` (less `.jpg`), in the file's order.
fn read_list(base: &Path, split: &str) -> Result<Vec<(String, Vec<String>)>> {
    let path = list_path(base, split);
    let bytes = read_regular(&path, "a Food-101 list", MAX_LIST)?;
    let doc: serde_json::Value =
        serde_json::from_slice(&bytes).with_context(|| format!("{}: not JSON", path.display()))?;
    let bad = |what: String| anyhow::anyhow!("{}: {what}", path.display());
    let Some(object) = doc.as_object() else {
        return Err(bad("not an object of classes and their images".into()));
    };
    let mut list = Vec::new();
    for (class, ids) in object {
        let ids: Option<Vec<String>> =
            (ids.as_array()).and_then(|a| a.iter().map(|v| v.as_str().map(String::from)).collect());
        let Some(ids) = ids else {
            return Err(bad(format!("class '{class}': not a list of image paths")));
        };
        if let Some(id) = ids.iter().find(|id| !is_relative(id)) {
            return Err(bad(format!(
                "class '{class}': '{id}' is not a path inside images/"
            )));
        }
        list.push((class.clone(), ids));
    }
    if list.iter().all(|(_, ids)| ids.is_empty()) {
        return Err(bad("lists no images".into()));
    }
    Ok(list)
}

/// Whether `id` is a path of plain names (`apple_pie/1005649`: no `..`,
/// no leading `/`).
fn is_relative(id: &str) -> bool {
    id.split('/').all(is_plain_name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_images_of_class_folders_and_plain_paths_are_taken() {
        let wanted = class_folder_jpgs;
        assert!(wanted("images/apple_pie/1005649.jpg"));
        assert!(!wanted("images/1005649.jpg") && !wanted("images/a/b/c.jpg"));
        assert!(!wanted("meta/classes.txt") && !wanted("images/a/b.png"));
        assert!(is_relative("apple_pie/1005649"));
        assert!(!is_relative("../x") && !is_relative("/x") && !is_relative("a//b"));
    }
}
