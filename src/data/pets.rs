//! Oxford-IIIT Pet, as torchvision's `OxfordIIITPet` reads it: 37 breeds
//! of cats and dogs, `ROOT/oxford-iiit-pet/images/<id>.jpg` listed with
//! their breeds by `annotations/trainval.txt` (the training split) and
//! `annotations/test.txt`. The photographs are read as an image folder's
//! are (decoded once and cached, or streamed): this module only lists
//! them, and downloads the two archives torchvision downloads.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

use super::archive::{Archive, jpg_files, none_else};
use super::download::Published;
use super::folder::Listed;
use super::folder_scan::{LabeledFiles, some_listed};
use crate::fsutil::read_text;

/// The dataset's name on the command line and in a run's files.
pub const NAME: &str = "oxford-pets";
/// The folder under `--data-dir` torchvision downloads into and reads.
pub const FOLDER: &str = "oxford-iiit-pet";
/// The two archives (each holding the folder of the same name), in the
/// order of [`MD5S`].
pub const ARCHIVES: [&str; 2] = ["images.tar.gz", "annotations.tar.gz"];
pub const MD5S: [&str; 2] = [
    "5c4f3ee8e5d25df40f4fd59a7f44e54c",
    "95a8c909bbe2e81eed6a22bccdf3f68f",
];
pub const MIRROR: &str = "https://www.robots.ox.ac.uk/~vgg/data/pets/data/";
/// The breeds: the labels of the lists run from 1 to this.
pub const CLASSES: i64 = 37;
/// The most bytes a split's list may have (trainval.txt has 100 KB).
const MAX_LIST: u64 = 16 << 20;

/// Where the dataset comes from, as torchvision downloads it.
pub const PUBLISHED: Published<'static> = Published {
    title: "Oxford-IIIT Pet",
    folder: FOLDER,
    files: &ARCHIVES,
    md5s: &MD5S,
    archives: &[
        Archive {
            file: ARCHIVES[0],
            folder: "images",
            members: &[],
            also: jpg_files,
        },
        Archive {
            file: ARCHIVES[1],
            folder: "annotations",
            members: &["trainval.txt", "test.txt"],
            also: none_else,
        },
    ],
    mirror: MIRROR,
};

/// The dataset in `base` (`ROOT/oxford-iiit-pet`), read as torchvision
/// reads it: the folder of its images, and the breeds' names
/// (torchvision's `classes`, named from trainval's images) with the images
/// of trainval (to train on) and test (to validate on), in the lists' order.
pub fn listing(base: &Path) -> Result<(PathBuf, Listed)> {
    let trainval = read_list(base, "trainval")?;
    let test = read_list(base, "test")?;
    let classes = class_names(base, &trainval)?;
    let list = annotations(base, "test");
    for e in &test {
        let name = breed(&e.id);
        if name != classes[e.label as usize] {
            bail!(
                "{}: line {}: {} has label {}, which trainval.txt gives to {}",
                list.display(),
                e.line,
                e.id,
                e.label + 1,
                classes[e.label as usize]
            );
        }
    }
    let images = base.join("images");
    let files = |entries: Vec<Entry>| -> LabeledFiles {
        (entries.into_iter())
            .map(|e| (images.join(format!("{}.jpg", e.id)), e.label))
            .collect()
    };
    let (train, test) = (files(trainval), files(test));
    Ok((images, Listed::split(classes, train, test)))
}

fn annotations(base: &Path, split: &str) -> PathBuf {
    base.join("annotations").join(format!("{split}.txt"))
}

/// One line of a list: the image's id, its label from 0, and the line's number.
struct Entry {
    id: String,
    label: i64,
    line: usize,
}

/// `annotations/<split>.txt`: lines `<id> <breed 1-37> <species> <breed id>`.
fn read_list(base: &Path, split: &str) -> Result<Vec<Entry>> {
    let path = annotations(base, split);
    let text = read_text(&path, "an Oxford-IIIT Pet list", MAX_LIST)?;
    let mut entries = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.is_empty() {
            continue;
        }
        let bad = |what: String| format!("{}: line {}: {what}", path.display(), n + 1);
        let &[id, label, _, _] = fields.as_slice() else {
            bail!(bad(format!(
                "{} fields, expected 4 (image id, breed 1-{CLASSES}, species, breed id)",
                fields.len()
            )));
        };
        let named = !id.starts_with('.') && !id.contains(['/', '\\']);
        if !named {
            bail!(bad(format!(
                "image id '{id}' is not a file name of the form <breed>_<number>"
            )));
        }
        let label = match label.parse::<i64>() {
            Ok(l) if (1..=CLASSES).contains(&l) => l - 1,
            _ => bail!(bad(format!(
                "breed '{label}' is not a number from 1 to {CLASSES}"
            ))),
        };
        entries.push(Entry {
            id: id.to_string(),
            label,
            line: n + 1,
        });
    }
    some_listed(&path, entries)
}

/// An image id's breed as torchvision names it: the part before the last
/// `_`, its words joined by spaces and title-cased (`american_bulldog_12`
/// is `American Bulldog`).
fn breed(id: &str) -> String {
    let raw = id.rsplit_once('_').map_or(id, |(b, _)| b);
    raw.split('_').map(title).collect::<Vec<_>>().join(" ")
}

/// Python's `str.title()`: each letter after one without case upper-case,
/// the others lower-case.
fn title(word: &str) -> String {
    let mut out = String::with_capacity(word.len());
    let mut after_cased = false;
    for c in word.chars() {
        match after_cased {
            true => out.extend(c.to_lowercase()),
            false => out.extend(c.to_uppercase()),
        }
        after_cased = c.is_lowercase() || c.is_uppercase();
    }
    out
}

/// The breeds by label, named from `entries` (trainval's): every label
/// from 1 to 37 must be there, each with one breed.
fn class_names(base: &Path, entries: &[Entry]) -> Result<Vec<String>> {
    let list = annotations(base, "trainval");
    let mut names: Vec<Option<String>> = vec![None; CLASSES as usize];
    for e in entries {
        let name = breed(&e.id);
        match &names[e.label as usize] {
            Some(had) if *had != name => bail!(
                "{}: line {}: {} has label {}, which earlier lines give to {had}",
                list.display(),
                e.line,
                e.id,
                e.label + 1
            ),
            Some(_) => {}
            None => names[e.label as usize] = Some(name),
        }
    }
    let absent: Vec<String> = (names.iter().enumerate())
        .filter(|(_, n)| n.is_none())
        .map(|(i, _)| (i + 1).to_string())
        .collect();
    if !absent.is_empty() {
        bail!(
            "{}: no images of breed(s) {}: the training list has all {CLASSES}",
            list.display(),
            absent.join(", ")
        );
    }
    Ok(names.into_iter().flatten().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Breeds are named as Python's `" ".join(p.title() for p in
    /// raw.split("_"))` names them.
    #[test]
    fn breeds_are_title_cased_as_python_does() {
        assert_eq!(breed("american_bulldog_12"), "American Bulldog");
        assert_eq!(breed("Abyssinian_100"), "Abyssinian");
        assert_eq!(
            breed("staffordshire_bull_terrier_1"),
            "Staffordshire Bull Terrier"
        );
        assert_eq!(title("mIxED"), "Mixed");
        assert_eq!(title("o'neil2x"), "O'Neil2X");
        assert_eq!(breed("solo"), "Solo");
    }
}
