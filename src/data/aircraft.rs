//! FGVC-Aircraft (Maji et al., 2013), as torchvision's `FGVCAircraft`
//! reads it at each of its annotation levels: the variant (the default,
//! `--dataset fgvc-aircraft`), the family (`fgvc-aircraft-family`) and the
//! manufacturer (`fgvc-aircraft-manufacturer`).
//! `ROOT/fgvc-aircraft-2013b/data/images/<id>.jpg`, the level's 100
//! variants in `data/variants.txt` (70 families in `families.txt`, 30
//! manufacturers in `manufacturers.txt`; one a line, in that order:
//! torchvision's classes), each split listed by
//! `data/images_<level>_<split>.txt` (`<id> <class>` a line; a class may
//! hold spaces). vggctl trains on train then val
//! (trainval's 6,667 images; `--val-on val` trains on train and validates
//! on val, as benchmarks tune) and validates on test (3,333). The
//! photographs are read as an image folder's: this module only lists them,
//! and downloads the archive torchvision downloads.
//!
//! Its publisher gives no checksum of the archive, and torchvision checks
//! none; since every download vggctl makes is checked, this one needs the
//! MD5 its user trusts ([`MD5S`] is empty).

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

use super::archive::Archive;
use super::download::{Published, is_plain_name};
use super::folder::Listed;
use super::folder_scan::{LabeledFiles, some_listed};
use crate::fsutil::read_text;

/// The dataset's name on the command line and in a run's files (at the
/// variant level; [`LEVELS`] names the others).
pub const NAME: &str = "fgvc-aircraft";
/// The folder under `--data-dir` the archive holds and torchvision reads.
pub const FOLDER: &str = "fgvc-aircraft-2013b";
pub const FILES: [&str; 1] = ["fgvc-aircraft-2013b.tar.gz"];
/// None known: see the module's note.
pub const MD5S: [&str; 1] = [""];
pub const MIRROR: &str = "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/";
/// The most bytes a list may have (trainval's has about 100 KB).
const MAX_LIST: u64 = 16 << 20;

/// One of the annotation levels torchvision's `FGVCAircraft` reads, a
/// dataset of its own to vggctl.
pub struct Level {
    /// The dataset's name on the command line and in a run's files.
    pub name: &'static str,
    /// torchvision's `annotation_level`, which names its lists.
    pub level: &'static str,
    /// Its classes, in the plural ("families"), whose list is
    /// `data/<plural>.txt`.
    pub plural: &'static str,
    /// How many classes that list names.
    pub classes: i64,
}

/// The variant (torchvision's default), the family and the manufacturer.
pub const LEVELS: [Level; 3] = [
    Level {
        name: NAME,
        level: "variant",
        plural: "variants",
        classes: 100,
    },
    Level {
        name: "fgvc-aircraft-family",
        level: "family",
        plural: "families",
        classes: 70,
    },
    Level {
        name: "fgvc-aircraft-manufacturer",
        level: "manufacturer",
        plural: "manufacturers",
        classes: 30,
    },
];

/// The annotation level the dataset `name` reads.
pub fn named(name: &str) -> Option<&'static Level> {
    LEVELS.iter().find(|l| l.name == name)
}

/// The lists the archive must hold: every level's, trainval's too
/// (torchvision reads them).
const LISTS: [&str; 15] = [
    "data/variants.txt",
    "data/images_variant_train.txt",
    "data/images_variant_val.txt",
    "data/images_variant_trainval.txt",
    "data/images_variant_test.txt",
    "data/families.txt",
    "data/images_family_train.txt",
    "data/images_family_val.txt",
    "data/images_family_trainval.txt",
    "data/images_family_test.txt",
    "data/manufacturers.txt",
    "data/images_manufacturer_train.txt",
    "data/images_manufacturer_val.txt",
    "data/images_manufacturer_trainval.txt",
    "data/images_manufacturer_test.txt",
];

/// Where the dataset comes from, as torchvision downloads it.
pub const PUBLISHED: Published<'static> = Published {
    title: "FGVC-Aircraft",
    // The archive holds the folder itself.
    folder: "",
    files: &FILES,
    md5s: &MD5S,
    archives: &[Archive {
        file: FILES[0],
        folder: FOLDER,
        members: &LISTS,
        also: data_files,
    }],
    mirror: MIRROR,
};

/// For [`Archive::also`]: the photographs (`data/images/<id>.jpg`) and the
/// other lists of `data/` (the archive's images_box.txt, images.txt and
/// images_<level>_<split>.txt).
fn data_files(path: &str) -> bool {
    let parts: Vec<&str> = path.split('/').collect();
    match parts[..] {
        ["data", "images", file] => file.ends_with(".jpg"),
        ["data", file] => file.ends_with(".txt"),
        _ => false,
    }
}

impl Level {
    /// The dataset in `root/fgvc-aircraft-2013b`, read as torchvision
    /// reads it at this level: the folder of its images, and its classes
    /// with the images of train then val (to train on) and of test (to
    /// validate on), in the lists' order.
    pub fn listing(&self, root: &Path) -> Result<(PathBuf, Listed)> {
        let data = root.join(FOLDER).join("data");
        let classes = self.read_classes(&data)?;
        let [train, val, test] =
            ["train", "val", "test"].map(|s| self.read_list(&data, s, &classes));
        let (train, val, test) = (train?, val?, test?);
        let own_val = val.len();
        let listed = Listed {
            train: [train, val].concat(),
            val: Some(test),
            classes,
            wnids: None,
            partition: None,
            own_val,
        };
        Ok((data.join("images"), listed))
    }

    /// `data/<plural>.txt`: one class a line, each stripped of surrounding
    /// space (torchvision's `line.strip()`), all different.
    fn read_classes(&self, data: &Path) -> Result<Vec<String>> {
        let (plural, expected) = (self.plural, self.classes);
        let path = data.join(format!("{plural}.txt"));
        let what = format!("FGVC-Aircraft's list of {plural}");
        let text = read_text(&path, &what, MAX_LIST)?;
        let classes: Vec<String> = text.lines().map(|l| l.trim().to_string()).collect();
        if let Some(n) = classes.iter().position(String::is_empty) {
            bail!("{}: line {} is blank", path.display(), n + 1);
        }
        if classes.len() as i64 != expected {
            bail!(
                "{}: {} {plural}, where FGVC-Aircraft has {expected}",
                path.display(),
                classes.len()
            );
        }
        let mut sorted = classes.clone();
        sorted.sort();
        if let Some(twice) = sorted.windows(2).find(|w| w[0] == w[1]) {
            bail!("{}: '{}' is listed twice", path.display(), twice[0]);
        }
        Ok(classes)
    }

    /// `data/images_<level>_<split>.txt`: each line's image and its
    /// class's index among `classes`, in order.
    fn read_list(&self, data: &Path, split: &str, classes: &[String]) -> Result<LabeledFiles> {
        let (level, plural) = (self.level, self.plural);
        let path = data.join(format!("images_{level}_{split}.txt"));
        let text = read_text(&path, "an FGVC-Aircraft list", MAX_LIST)?;
        let images = data.join("images");
        let mut files = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let at = || format!("{}: line {}", path.display(), n + 1);
            let Some((id, class)) = line.trim().split_once(' ') else {
                bail!("{}: '{line}' is not '<image id> <{level}>'", at());
            };
            if !is_plain_name(id) {
                bail!("{}: '{id}' is not a plain file name", at());
            }
            let Some(label) = classes.iter().position(|c| c == class) else {
                bail!("{}: {level} '{class}' is not one of {plural}.txt's", at());
            };
            files.push((images.join(format!("{id}.jpg")), label as i64));
        }
        some_listed(&path, files)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_photographs_and_lists_of_data_are_taken() {
        assert!(data_files("data/images/0034309.jpg"));
        assert!(data_files("data/families.txt"));
        assert!(!data_files("data/images/a/b.jpg") && !data_files("README.html"));
        assert!(!data_files("data/images/0034309.png") && !data_files("evaluation.m"));
        assert!(LISTS.iter().all(|l| data_files(l)));
    }

    #[test]
    fn every_level_names_its_lists() {
        for level in &LEVELS {
            assert_eq!(named(level.name).map(|l| l.level), Some(level.level));
            let listed = |split: &str| format!("data/images_{}_{split}.txt", level.level);
            assert!(LISTS.contains(&format!("data/{}.txt", level.plural).as_str()));
            let splits = ["train", "val", "trainval", "test"];
            assert!(splits.iter().all(|s| LISTS.contains(&listed(s).as_str())));
        }
        assert!(named("fgvc-aircraft-model").is_none());
    }
}
