//! Places365-Standard (Zhou et al., 2017), as torchvision's `Places365`
//! reads it (`split="train-standard"` to train on, `"val"` to validate on;
//! `small=True` for `places365-256`): in `ROOT` itself, the classes
//! `categories_places365.txt` names (`/a/airfield 0`: torchvision sorts
//! the names, the lists give the labels), the training list
//! `places365_train_standard.txt` (`/a/airfield/00000001.jpg 0`, 1,803,460
//! images under `data_large_standard/` or `data_256_standard/`) and the
//! val list `places365_val.txt` (`Places365_val_00000001.jpg 165`, 36,500
//! under `val_large/` or `val_256/`). The photographs are read as an image
//! folder's: this module only lists them, and downloads the files
//! torchvision downloads (the training archive's `data_large/` renamed to
//! `data_large_standard/`, as torchvision renames it).

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::archive::{Archive, none_else, unpack};
use super::download::{DownloadSource, fetch_files, is_plain_name};
use super::folder::Listed;
use super::folder_scan::{LabeledFiles, some_listed};
use crate::fsutil::read_text;

/// Its scene classes.
pub const CLASSES: i64 = 365;
pub const MIRROR: &str = "http://data.csail.mit.edu/places/places365/";
const CATEGORIES: &str = "categories_places365.txt";
const TRAIN_LIST: &str = "places365_train_standard.txt";
const VAL_LIST: &str = "places365_val.txt";
/// The most bytes a list may have (the training list has 70 MB).
const MAX_LIST: u64 = 1 << 30;

/// The devkit's archive: the class list and the splits' lists at its top.
const DEVKIT: Archive<'static> = Archive {
    file: "filelist_places365-standard.tar",
    folder: "",
    members: &[CATEGORIES, TRAIN_LIST, VAL_LIST],
    also: none_else,
};

/// One size of its images: `places365` (as published) or `places365-256`
/// (resized to 256x256).
pub struct Size {
    /// The dataset's name on the command line and in a run's files.
    pub name: &'static str,
    /// The training images' archive, its folder and the folder torchvision
    /// renames that to; the val images' archive.
    train: Archive<'static>,
    train_folder: &'static str,
    val: Archive<'static>,
    /// The MD5s of the devkit's, the training images' and the val images'
    /// archives (torchvision's).
    pub md5s: [&'static str; 3],
}

pub const SIZES: [Size; 2] = [
    Size {
        name: "places365",
        train: Archive {
            file: "train_large_places365standard.tar",
            folder: "data_large",
            members: &[],
            also: class_photo,
        },
        train_folder: "data_large_standard",
        val: Archive {
            file: "val_large.tar",
            folder: "val_large",
            members: &[],
            also: super::archive::jpg_files,
        },
        md5s: [
            "35a0585fee1fa656440f3ab298f8479c",
            "67e186b496a84c929568076ed01a8aa1",
            "9b71c4993ad89d2d8bcbdc4aef38042f",
        ],
    },
    Size {
        name: "places365-256",
        train: Archive {
            file: "train_256_places365standard.tar",
            folder: "data_256",
            members: &[],
            also: class_photo,
        },
        train_folder: "data_256_standard",
        val: Archive {
            file: "val_256.tar",
            folder: "val_256",
            members: &[],
            also: super::archive::jpg_files,
        },
        md5s: [
            "35a0585fee1fa656440f3ab298f8479c",
            "53ca1c756c3d1e7809517cc47c5561c5",
            "e27b17d8d44f4af9a78502beb927f808",
        ],
    },
];

/// The size `--dataset` names, if it is one of Places365's.
pub fn named(name: &str) -> Option<&'static Size> {
    SIZES.iter().find(|s| s.name == name)
}

/// For [`Archive::also`]: a photograph in a class folder
/// (`a/airfield/00000001.jpg`, `b/bakery/shop/00000001.jpg`).
fn class_photo(path: &str) -> bool {
    path.matches('/').count() >= 2 && path.ends_with(".jpg")
}

impl Size {
    /// Its three files, in the order of [`Size::md5s`].
    pub fn files(&self) -> [&'static str; 3] {
        [DEVKIT.file, self.train.file, self.val.file]
    }

    /// Where it comes from unless the command line says otherwise.
    pub fn own_source(&self) -> DownloadSource {
        DownloadSource {
            url: MIRROR.into(),
            md5: self.md5s.join(","),
        }
    }

    /// What each file gives, whose presence says it is there.
    fn gives(&self, file: &str) -> String {
        match file {
            f if f == DEVKIT.file => CATEGORIES.to_string(),
            f if f == self.train.file => format!("{}/", self.train_folder),
            _ => format!("{}/", self.val.folder),
        }
    }

    /// `root`, its missing files first downloaded from the mirrors `src`
    /// names (None: downloading is off) and extracted.
    pub fn fetch(
        &self,
        root: &Path,
        src: Option<&DownloadSource>,
        progress: &mut dyn FnMut(u64, Option<u64>),
    ) -> Result<PathBuf> {
        let files = self.files();
        let missing: Vec<&str> = (files.iter().copied())
            .filter(|f| !root.join(self.gives(f)).exists())
            .collect();
        let Some(first) = missing.first() else {
            return Ok(root.to_path_buf());
        };
        let how = format!(
            "put torchvision's {CATEGORIES}, {TRAIN_LIST} and {VAL_LIST} (of {}), {}/ (of {}) and {}/ (of {}, from {MIRROR}) into {} by hand, or point --data-dir at a copy (--data-url names a mirror)",
            DEVKIT.file,
            self.train_folder,
            self.train.file,
            self.val.folder,
            self.val.file,
            root.display()
        );
        let Some(src) = src else {
            bail!(
                "no Places365 in {}: expected {} and downloading is off; {how}",
                root.display(),
                root.join(self.gives(first)).display()
            );
        };
        fetch_files(root, (&files, &missing), src, progress, &mut |path| {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            match name.as_deref() {
                Some(f) if f == DEVKIT.file => unpack(root, &DEVKIT),
                Some(f) if f == self.train.file => {
                    unpack(root, &self.train)?;
                    let (from, to) = (root.join(self.train.folder), root.join(self.train_folder));
                    fs::rename(&from, &to).with_context(|| format!("renaming {}", from.display()))
                }
                _ => unpack(root, &self.val),
            }
        })
        .with_context(|| format!("could not download Places365; {how}"))?;
        Ok(root.to_path_buf())
    }

    /// The dataset in `root`, read as torchvision reads it: the folder of
    /// its images, and its classes with the images of the training list (to
    /// train on) and of the val list (to validate on), in the lists' order.
    pub fn listing(&self, root: &Path) -> Result<(PathBuf, Listed)> {
        let classes = categories(&root.join(CATEGORIES))?;
        let train = list(root, TRAIN_LIST, &root.join(self.train_folder))?;
        let val = list(root, VAL_LIST, &root.join(self.val.folder))?;
        Ok((root.to_path_buf(), Listed::split(classes, train, val)))
    }
}

/// `categories_places365.txt`'s classes (`/a/airfield 0`), sorted as
/// torchvision sorts them; their indices must be 0 to 364, each once.
fn categories(path: &Path) -> Result<Vec<String>> {
    let text = read_text(path, "Places365's class list", MAX_LIST)?;
    let mut named = Vec::new();
    for (i, line) in text.lines().enumerate() {
        match line.split_whitespace().collect::<Vec<_>>()[..] {
            [name, index] if index.parse::<usize>().is_ok() => named.push((name, index)),
            _ => bail!(
                "{} line {}: '{line}' is not a class and its index",
                path.display(),
                i + 1
            ),
        }
    }
    let mut indices: Vec<usize> = named
        .iter()
        .map(|(_, i)| i.parse().expect("a number"))
        .collect();
    indices.sort();
    if indices != (0..CLASSES as usize).collect::<Vec<_>>() {
        bail!(
            "{}: {} classes, where Places365 has {CLASSES} indexed 0 to 364 once each",
            path.display(),
            named.len()
        );
    }
    let mut classes: Vec<String> = named.iter().map(|(n, _)| n.to_string()).collect();
    classes.sort();
    Ok(classes)
}

/// A split's list in `root`: each line an image's path under `images` (a
/// leading `/` dropped) and its class index.
fn list(root: &Path, name: &str, images: &Path) -> Result<LabeledFiles> {
    let path = root.join(name);
    let text = read_text(&path, "a Places365 list", MAX_LIST)?;
    let mut files = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let bad = |what: &str| anyhow::anyhow!("{} line {}: {what}", path.display(), i + 1);
        let (file, label) = match line.split_whitespace().collect::<Vec<_>>()[..] {
            [file, label] => (file.trim_start_matches('/'), label),
            _ => {
                return Err(bad(&format!(
                    "'{line}' is not an image and its class index"
                )));
            }
        };
        if !file.split('/').all(is_plain_name) {
            return Err(bad(&format!(
                "'{file}' is not a path inside {}",
                images.display()
            )));
        }
        match label.parse::<i64>() {
            Ok(l) if (0..CLASSES).contains(&l) => files.push((images.join(file), l)),
            _ => return Err(bad(&format!("class index '{label}' is not from 0 to 364"))),
        }
    }
    some_listed(&path, files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_photographs_of_class_folders_are_taken() {
        assert!(class_photo("a/airfield/00000001.jpg"));
        assert!(class_photo("b/bakery/shop/00000001.jpg"));
        assert!(!class_photo("a/00000001.jpg") && !class_photo("a/airfield/x.png"));
    }
}
