//! ImageNet-1k's facts: torchvision's normalization, its 1,000 class names
//! and their WordNet ids (the class folders of ImageNet's layout; sorted,
//! they are torchvision's class indices).

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

pub const MEAN: [f64; 3] = [0.485, 0.456, 0.406];
pub const STD: [f64; 3] = [0.229, 0.224, 0.225];

/// torchvision's ImageNet class names, index by index.
pub fn classes() -> Vec<String> {
    include_str!("imagenet_classes.txt")
        .lines()
        .map(String::from)
        .collect()
}

/// The classes' WordNet ids, index by index (sorted).
pub fn wnids() -> Vec<&'static str> {
    include_str!("imagenet_wnids.txt").lines().collect()
}

/// `DIR/train` or `DIR/val` of ImageNet's layout, or an error saying
/// what the layout is.
pub fn split_dir(dir: &Path, split: &str) -> Result<PathBuf> {
    let path = dir.join(split);
    if !path.is_dir() {
        bail!(
            "{}: no {split}/ folder: --dataset imagenet reads DIR/train/<wnid>/ and DIR/val/<wnid>/ (eval reads DIR/val, or with --val-dir any folder of WordNet-id class folders)",
            dir.display()
        );
    }
    Ok(path)
}

/// The names of ImageNet class folders (WordNet ids) in `dir`.
pub fn names(dir: &Path, folders: &[String]) -> Result<Vec<String>> {
    let known = wnids();
    let names = classes();
    folders
        .iter()
        .map(|w| match known.binary_search(&w.as_str()) {
            Ok(i) => Ok(names[i].clone()),
            Err(_) => bail!(
                "{}: not an ImageNet class folder (expected WordNet ids such as n01440764)",
                dir.join(w).display()
            ),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 1,000 sorted, distinct ids beside 1,000 names: the first is the
    /// tench's, the last the toilet tissue's.
    #[test]
    fn ids_and_names_line_up() {
        let (ids, names) = (wnids(), classes());
        assert_eq!((ids.len(), names.len()), (1000, 1000));
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
        assert_eq!((ids[0], names[0].as_str()), ("n01440764", "tench"));
        assert_eq!(
            (ids[999], names[999].as_str()),
            ("n15075141", "toilet tissue")
        );
        let dir = Path::new("train");
        let found = names_of(dir, &["n02123045", "n01440764"]).unwrap();
        assert_eq!(found, ["tabby", "tench"]);
        let err = names_of(dir, &["cats"]).unwrap_err().to_string();
        assert!(
            err.contains("train/cats") && err.contains("WordNet"),
            "{err}"
        );
    }

    fn names_of(dir: &Path, ids: &[&str]) -> Result<Vec<String>> {
        names(dir, &ids.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }
}
