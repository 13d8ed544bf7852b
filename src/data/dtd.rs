//! The Describable Textures Dataset, as torchvision's `DTD` reads it:
//! `ROOT/dtd/dtd/images/<class>/<image>.jpg`, each of its ten partitions
//! (1 to 10, torchvision's `partition`) listed in `labels/train<K>.txt`,
//! `val<K>.txt` and `test<K>.txt` (one `<class>/<image>` a line). vggctl
//! trains on a partition's train and val lists together (3,760 images, as
//! transfer-learning benchmarks do) and validates on its test list
//! (1,880); the classes are the training lists', sorted, as torchvision
//! names them. The photographs are read as an image folder's: this module
//! only lists them, and downloads the archive torchvision downloads.

use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

use super::archive::{Archive, class_folder_jpgs};
use super::download::{Published, is_plain_name};
use super::folder::Listed;
use super::folder_scan::{LabeledFiles, some_listed};
use crate::fsutil::read_text;

/// The dataset's name on the command line and in a run's files.
pub const NAME: &str = "dtd";
/// The folder under `--data-dir` torchvision downloads into; the archive
/// holds the folder `dtd/` read inside it.
pub const FOLDER: &str = "dtd";
pub const FILES: [&str; 1] = ["dtd-r1.0.1.tar.gz"];
pub const MD5S: [&str; 1] = ["fff73e5086ae6bdbea199a49dfb8a4c1"];
pub const MIRROR: &str = "https://www.robots.ox.ac.uk/~vgg/data/dtd/download/";
/// The classes (texture words) the lists name.
pub const CLASSES: i64 = 47;
/// The partitions `--fold` chooses among (torchvision's `partition`).
pub const PARTITIONS: RangeInclusive<usize> = 1..=10;
/// The partition read where none is chosen (torchvision's default).
pub const DEFAULT_PARTITION: usize = 1;
/// The most bytes a list may have (each has about 60 KB).
const MAX_LIST: u64 = 16 << 20;

/// The lists the archive must hold: each partition's three.
#[rustfmt::skip]
const LISTS: [&str; 30] = [
    "labels/train1.txt", "labels/val1.txt", "labels/test1.txt",
    "labels/train2.txt", "labels/val2.txt", "labels/test2.txt",
    "labels/train3.txt", "labels/val3.txt", "labels/test3.txt",
    "labels/train4.txt", "labels/val4.txt", "labels/test4.txt",
    "labels/train5.txt", "labels/val5.txt", "labels/test5.txt",
    "labels/train6.txt", "labels/val6.txt", "labels/test6.txt",
    "labels/train7.txt", "labels/val7.txt", "labels/test7.txt",
    "labels/train8.txt", "labels/val8.txt", "labels/test8.txt",
    "labels/train9.txt", "labels/val9.txt", "labels/test9.txt",
    "labels/train10.txt", "labels/val10.txt", "labels/test10.txt",
];

/// Where the dataset comes from, as torchvision downloads it.
pub const PUBLISHED: Published<'static> = Published {
    title: "DTD",
    folder: FOLDER,
    files: &FILES,
    md5s: &MD5S,
    archives: &[Archive {
        file: FILES[0],
        folder: "dtd",
        members: &LISTS,
        also: class_folder_jpgs,
    }],
    mirror: MIRROR,
};

/// One line of a list: its number, class and image file.
struct Entry {
    line: usize,
    class: String,
    image: String,
}

/// Partition `partition` (None: 1) of the dataset in `base` (`ROOT/dtd`),
/// read as torchvision reads it: the folder of its images, and its classes
/// with the images of train and val (to train on) and of test (to
/// validate on), in the lists' order.
pub fn listing(base: &Path, partition: Option<usize>) -> Result<(PathBuf, Listed)> {
    let k = partition.unwrap_or(DEFAULT_PARTITION);
    let data = base.join("dtd");
    let [train, val, test] = ["train", "val", "test"].map(|s| read_list(&data, s, k));
    let (train, val, test) = (train?, val?, test?);
    let mut classes: Vec<String> = (train.iter().chain(&val))
        .map(|e| e.class.clone())
        .collect();
    classes.sort();
    classes.dedup();
    if classes.len() as i64 != CLASSES {
        bail!(
            "{} and val{k}.txt: {} classes, where DTD has {CLASSES}",
            list_path(&data, "train", k).display(),
            classes.len()
        );
    }
    let images = data.join("images");
    let files = |entries: Vec<Entry>, split: &str| -> Result<LabeledFiles> {
        let mut files = Vec::with_capacity(entries.len());
        for e in entries {
            let Ok(label) = classes.binary_search(&e.class) else {
                bail!(
                    "{}: line {}: class '{}' is not one of train{k}.txt's and val{k}.txt's",
                    list_path(&data, split, k).display(),
                    e.line,
                    e.class
                );
            };
            files.push((images.join(&e.class).join(&e.image), label as i64));
        }
        Ok(files)
    };
    let own_val = val.len();
    let listed = Listed {
        train: [files(train, "train")?, files(val, "val")?].concat(),
        val: Some(files(test, "test")?),
        classes,
        wnids: None,
        partition: Some(k),
        own_val,
    };
    Ok((images, listed))
}

fn list_path(data: &Path, split: &str, k: usize) -> PathBuf {
    data.join("labels").join(format!("{split}{k}.txt"))
}

/// `labels/<split><k>.txt`: its `<class>/<image>` lines, in order (blank
/// lines skipped).
fn read_list(data: &Path, split: &str, k: usize) -> Result<Vec<Entry>> {
    let path = list_path(data, split, k);
    let text = read_text(&path, "a DTD list", MAX_LIST)?;
    let mut entries = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let parts: Vec<&str> = line.split('/').collect();
        let &[class, image] = parts.as_slice() else {
            bail!(
                "{}: line {}: '{line}' is not <class>/<image>",
                path.display(),
                n + 1
            );
        };
        if !is_plain_name(class) || !is_plain_name(image) {
            bail!(
                "{}: line {}: '{line}' is not <class>/<image> of plain file names",
                path.display(),
                n + 1
            );
        }
        entries.push(Entry {
            line: n + 1,
            class: class.to_string(),
            image: image.to_string(),
        });
    }
    some_listed(&path, entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_images_of_class_folders_and_plain_names_are_taken() {
        let wanted = class_folder_jpgs;
        assert!(wanted("images/banded/banded_0002.jpg"));
        assert!(!wanted("imdb/imdb.mat") && !wanted("images/banded/.directory"));
        assert!(is_plain_name("banded_0002.jpg"));
        assert!(!is_plain_name("..") && !is_plain_name("") && !is_plain_name("a\\b"));
    }

    #[test]
    fn every_partition_has_its_three_lists() {
        for k in PARTITIONS {
            for s in ["train", "val", "test"] {
                assert!(LISTS.contains(&format!("labels/{s}{k}.txt").as_str()));
            }
        }
        assert_eq!(LISTS.len(), 3 * PARTITIONS.count());
    }
}
