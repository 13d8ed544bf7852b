//! The datasets read from lists of photographs (Imagenette, Oxford-IIIT
//! Pet, Oxford 102 Flowers, Food-101, DTD, FGVC-Aircraft, Stanford Cars,
//! GTSRB, EuroSAT, the Caltechs, SUN397, Country211, Places365): which they
//! are, where they are downloaded from, and how a prepared file of DTD
//! names its partition. `train`, `eval`, `finetune` and `prepare` open
//! them here. Also what `--fold` may name, and the one list of every
//! dataset's name an unknown `--dataset` is answered with.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use vggctl::choice::either;
use vggctl::data::download::DownloadSource;
use vggctl::data::folder::Listed;
use vggctl::data::prepared::Prepared;
use vggctl::data::{
    aircraft, caltech101, caltech256, cars, country211, dtd, eurosat, flowers, food101, gtsrb,
    imagenette, mnist, pets, places365, stl10, sun397,
};

use super::output::usage;
use super::progress::download_bar;

/// The file `vggctl prepare` made at `file` packs the listed dataset
/// `name`: as many classes as it has (FGVC-Aircraft's levels differ in
/// theirs), and DTD's partition `fold` (None: the default; a run records
/// the partition it trained on, and evaluating it reads that partition's
/// test images, packed or not).
pub fn check_packed(file: &Path, name: &str, fold: Option<usize>) -> Result<()> {
    let prepared = Prepared::open(file)?;
    let index = &prepared.index;
    let want = fold.unwrap_or(dtd::DEFAULT_PARTITION);
    match index.partition {
        _ if name != dtd::NAME => {}
        Some(k) if k == want => {}
        Some(k) => {
            return Err(usage(format!(
                "{}: packs DTD's partition {k}, not {want}: give --fold {k} (or prepare --fold {want} another file)",
                file.display()
            )));
        }
        None => bail!(
            "{}: not a file of DTD (vggctl prepare --dataset dtd makes one)",
            file.display()
        ),
    }
    let (packed, classes) = (index.classes.len() as i64, listed_classes(name));
    match classes.filter(|&n| n != packed) {
        Some(n) => Err(usage(format!(
            "{}: packs {packed} classes, where {name} has {n}: give the --dataset it was prepared from (or prepare --dataset {name} another file)",
            file.display()
        ))),
        None => Ok(()),
    }
}

/// Where the dataset `name` is downloaded from where no option says:
/// its environment variables (`VGGCTL_FOOD101_URL`, `VGGCTL_FOOD101_MD5`),
/// else `own`.
pub fn source_from_env(name: &str, own: DownloadSource) -> DownloadSource {
    let env = |what: &str| std::env::var(env_var(name, what)).ok();
    DownloadSource {
        url: env("URL").unwrap_or(own.url),
        md5: env("MD5").unwrap_or(own.md5),
    }
}

/// The dataset `name`'s environment variable `what` (`VGGCTL_FOOD101_MD5`).
fn env_var(name: &str, what: &str) -> String {
    format!("VGGCTL_{}_{what}", name.to_uppercase().replace('-', "_"))
}

/// Whether `name` is a dataset of listed photographs (Imagenette,
/// Oxford-IIIT Pet, Oxford 102 Flowers, Food-101, DTD, FGVC-Aircraft,
/// Stanford Cars, GTSRB, EuroSAT, Caltech-101 and -256, SUN397,
/// Country211, Places365): read as an image folder, or from
/// the file `vggctl prepare` made of it.
pub fn is_listed(name: &str) -> bool {
    listed_classes(name).is_some()
}

/// The number of classes of the listed dataset `name` (see [`is_listed`]).
pub fn listed_classes(name: &str) -> Option<i64> {
    Some(match name {
        pets::NAME => pets::CLASSES,
        flowers::NAME => flowers::CLASSES,
        food101::NAME => food101::CLASSES,
        dtd::NAME => dtd::CLASSES,
        gtsrb::NAME => gtsrb::CLASSES,
        eurosat::NAME => eurosat::CLASSES,
        caltech256::NAME => caltech256::CLASSES,
        caltech101::NAME => caltech101::CLASSES,
        cars::NAME => cars::CLASSES,
        sun397::NAME => sun397::CLASSES,
        country211::NAME => country211::CLASSES,
        other if places365::named(other).is_some() => places365::CLASSES,
        other if let Some(level) = aircraft::named(other) => level.classes,
        other => imagenette::named(other).map(|_| imagenette::CLASSES)?,
    })
}

/// The listed dataset `name` (see [`is_listed`]) under `dir`, DTD's
/// partition `fold`, its missing files first downloaded from where
/// `source(name, own)` says (None: downloading is off): the folder of its
/// images and its lists.
pub fn open_listed(
    (name, fold): (&str, Option<usize>),
    dir: &Path,
    source: &dyn Fn(&str, DownloadSource) -> Option<DownloadSource>,
    quiet: bool,
) -> Result<(PathBuf, Listed)> {
    if name == cars::NAME {
        // Nothing to download: its files are put in place by hand.
        return cars::listing(&cars::base(dir)?);
    }
    if let Some(size) = places365::named(name) {
        let src = source(name, size.own_source());
        let root = size.fetch(dir, src.as_ref(), &mut download_bar(quiet))?;
        return size.listing(&root);
    }
    // FGVC-Aircraft's levels are read from one archive.
    let level = aircraft::named(name);
    let name = level.map_or(name, |_| aircraft::NAME);
    let published = match name {
        pets::NAME => &pets::PUBLISHED,
        flowers::NAME => &flowers::PUBLISHED,
        food101::NAME => &food101::PUBLISHED,
        dtd::NAME => &dtd::PUBLISHED,
        aircraft::NAME => &aircraft::PUBLISHED,
        gtsrb::NAME => &gtsrb::PUBLISHED,
        eurosat::NAME => &eurosat::PUBLISHED,
        caltech256::NAME => &caltech256::PUBLISHED,
        caltech101::NAME => &caltech101::PUBLISHED,
        sun397::NAME => &sun397::PUBLISHED,
        country211::NAME => &country211::PUBLISHED,
        other => match imagenette::named(other) {
            Some(size) => &size.published,
            None => bail!("{other}: not a dataset read from lists"),
        },
    };
    let src = source(name, published.own_source());
    // A download is always checked: one whose publisher gives no checksum
    // (FGVC-Aircraft's) waits for the MD5 its user trusts.
    let unchecked = src
        .as_ref()
        .is_some_and(|s| s.md5.split(',').any(|m| m.trim().is_empty()));
    if unchecked && let Some(file) = published.missing(dir).first() {
        let (base, gives) = (dir.join(published.folder), published.gives(file));
        bail!(
            "no {} in {}: {} is not there, and its publisher gives no checksum of {file} (torchvision checks none), so vggctl downloads it only with the MD5 you trust, in ${}; or put torchvision's {gives} into {} by hand",
            published.title,
            dir.display(),
            base.join(&gives).display(),
            env_var(name, "MD5"),
            base.display()
        );
    }
    let bar = &mut download_bar(quiet);
    let base = match name {
        // Its images are an archive inside the zip.
        caltech101::NAME => caltech101::fetch(dir, src.as_ref(), bar)?,
        _ => published.fetch_missing(dir, src.as_ref(), bar)?,
    };
    match name {
        pets::NAME => pets::listing(&base),
        flowers::NAME => flowers::listing(&base),
        food101::NAME => food101::listing(&base),
        _ if let Some(level) = level => level.listing(&base),
        gtsrb::NAME => gtsrb::listing(&base),
        eurosat::NAME => eurosat::listing(&base),
        caltech256::NAME => caltech256::listing(&base),
        caltech101::NAME => caltech101::listing(&base),
        sun397::NAME => sun397::listing(&base),
        country211::NAME => country211::listing(&base),
        other if let Some(size) = imagenette::named(other) => size.listing(&base),
        _ => dtd::listing(&base, fold),
    }
}

/// `--fold K` for `dataset`: one of DTD's partitions (1 to 10), else of
/// STL-10's folds (0 to 9; other datasets ignore or refuse it).
pub fn check_fold(dataset: &str, fold: Option<usize>) -> Result<()> {
    let (folds, what) = match dataset {
        dtd::NAME => (dtd::PARTITIONS, "DTD's partitions"),
        _ => (0..=stl10::FOLDS - 1, "STL-10's folds"),
    };
    match fold.filter(|k| !folds.contains(k)) {
        Some(k) => Err(usage(format!(
            "--fold {k}: {what} are {} to {}",
            folds.start(),
            folds.end()
        ))),
        None => Ok(()),
    }
}

/// Every `--dataset` name, in the order errors list them.
fn dataset_names() -> Vec<&'static str> {
    let mut names = vec![
        "cifar10",
        "cifar100",
        "mnist",
        "fashion-mnist",
        "kmnist",
        "qmnist",
    ];
    names.extend(mnist::EMNIST_SPLITS.map(|m| m.name));
    names.extend([
        "svhn", "usps", "stl10", "fer2013", "digits", "folder", "imagenet",
    ]);
    names.extend(imagenette::SIZES.map(|s| s.name));
    names.extend([pets::NAME, flowers::NAME, food101::NAME, dtd::NAME]);
    names.extend(aircraft::LEVELS.map(|l| l.name));
    names.extend([
        cars::NAME,
        gtsrb::NAME,
        eurosat::NAME,
        caltech101::NAME,
        caltech256::NAME,
        sun397::NAME,
        country211::NAME,
    ]);
    names.extend(places365::SIZES.map(|s| s.name));
    names
}

/// torchvision's names for datasets vggctl names otherwise (its class
/// names, which match vggctl's once case and punctuation are dropped,
/// need none; FGVC-Aircraft's variant level is its default).
const TORCHVISION_NAMES: [(&str, &str); 4] = [
    ("oxfordiiitpet", pets::NAME),
    ("fgvcaircraftvariant", aircraft::NAME),
    ("imagefolder", "folder"),
    ("imagenet1k", "imagenet"),
];

/// The error of an unknown `--dataset` (or of `emnist` without its
/// split), naming every dataset, and the one meant where a name is
/// torchvision's spelling or a slip of one or two letters.
pub fn unknown_dataset(name: &str) -> String {
    if name == "emnist" {
        let emnist = mnist::EMNIST_SPLITS.map(|m| m.name).join(", ");
        return format!("--dataset emnist: name the split, one of {emnist}");
    }
    let names = dataset_names();
    let guess = meant(name, &names).map_or(String::new(), |m| format!(": did you mean {m}?"));
    format!(
        "unknown dataset '{name}'{guess} (expected {})",
        either(&names)
    )
}

/// The dataset `name` stands for: the one whose name it is once case and
/// punctuation are dropped (`CIFAR-10`, `FashionMNIST`, torchvision's
/// `OxfordIIITPet`), else the one within two letters of it.
fn meant(name: &str, names: &[&'static str]) -> Option<&'static str> {
    let key = |s: &str| -> Vec<char> {
        (s.chars().filter(char::is_ascii_alphanumeric))
            .map(|c| c.to_ascii_lowercase())
            .collect()
    };
    let typed = key(name);
    let known = names.iter().map(|n| (key(n), *n));
    let aliases = TORCHVISION_NAMES.iter().map(|(a, n)| (key(a), *n));
    let all: Vec<(Vec<char>, &str)> = known.chain(aliases).collect();
    if let Some((_, n)) = all.iter().find(|(k, _)| *k == typed) {
        return Some(n);
    }
    let (distance, n) =
        (all.iter().map(|(k, n)| (edits(&typed, k), *n))).min_by_key(|(d, _)| *d)?;
    (distance <= 2 && typed.len() > 3).then_some(n)
}

/// Levenshtein's distance: the fewest insertions, deletions and
/// substitutions that turn `a` into `b`.
fn edits(a: &[char], b: &[char]) -> usize {
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substituted = diagonal + usize::from(ca != cb);
            diagonal = row[j + 1];
            row[j + 1] = substituted.min(row[j] + 1).min(diagonal + 1);
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dataset_is_guessed_from_torchvisions_spelling_or_a_slip() {
        let names = dataset_names();
        assert_eq!(names.len(), 38);
        for (typed, want) in [
            ("CIFAR-10", Some("cifar10")),
            ("FashionMNIST", Some("fashion-mnist")),
            ("OxfordIIITPet", Some(pets::NAME)),
            ("ImageFolder", Some("folder")),
            ("Places365", Some("places365")),
            ("digit", Some("digits")),
            ("cifar", Some("cifar10")),
            ("flowers-101", Some(flowers::NAME)),
            ("places", None),
            ("abc", None),
            ("cifar-1000", Some("cifar100")),
            ("FGVCAircraft", Some(aircraft::NAME)),
            ("fgvc-aircraft-variant", Some(aircraft::NAME)),
            (
                "fgvc-aircraft-manufacturers",
                Some("fgvc-aircraft-manufacturer"),
            ),
        ] {
            assert_eq!(meant(typed, &names), want, "{typed}");
        }
        let chars = |s: &str| s.chars().collect::<Vec<_>>();
        assert_eq!(edits(&chars("kitten"), &chars("sitting")), 3);
        assert_eq!(edits(&chars(""), &chars("abc")), 3);
        assert_eq!(edits(&chars("flaw"), &chars("lawn")), 2);
    }
}
