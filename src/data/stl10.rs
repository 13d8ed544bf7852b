//! `--dataset stl10`: STL-10 (Coates, Lee and Ng, 2011) as torchvision's
//! `STL10` reads it: `DIR/stl10_binary/` holding `train_X.bin` and
//! `train_y.bin` (5,000 labelled training images), `test_X.bin` and
//! `test_y.bin` (8,000) and `class_names.txt`. Each image is three planes
//! of 96x96 bytes stored column by column (torchvision transposes them);
//! the labels are bytes 1..10 (torchvision's 0..9). What vggctl downloads
//! is torchvision's archive, extracted whole (the 100,000 unlabelled images
//! and the folds too), so either tool reads the other's folder; the
//! unlabelled images are not read. A training fold (`--fold K`) is line K
//! of `fold_indices.txt`: the zero-based indices of its 1,000 training
//! images, as torchvision's `STL10(folds=K)` takes them.
//!
//! STL-10 has no customary normalization: the training images' own mean
//! and standard deviation per channel (over every pixel, the population's)
//! are computed when they are loaded, exactly, from byte histograms, and a
//! checkpoint stores them as it stores any dataset's.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result, bail};
use tch::Tensor;

use super::archive::{Archive, none_else};
use super::download::{DownloadSource, fetch_archive};
use super::{Dataset, Histograms, Images, Split, mean_std};
use crate::fsutil::{read_regular, read_text};

pub const URL: &str = "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz";
pub const MD5: &str = "91f7769df0f17e558f3565bffb0c7dfb";
/// The folder the archive holds and torchvision reads.
pub const FOLDER: &str = "stl10_binary";
/// The images' side.
pub const SIDE: i64 = 96;
const PIXELS: usize = 3 * 96 * 96;
/// The folder's files as the archive holds them.
const MEMBERS: [&str; 7] = [
    "train_X.bin",
    "train_y.bin",
    "test_X.bin",
    "test_y.bin",
    "unlabeled_X.bin",
    "class_names.txt",
    "fold_indices.txt",
];
/// The classes, as `class_names.txt` names them, for a folder without it.
pub const CLASSES: [&str; 10] = [
    "airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck",
];
/// STL-10's predefined training folds (`fold_indices.txt`'s lines).
pub const FOLDS: usize = 10;
/// The most images a split's file may hold (the test split has 8,000:
/// 221 MB).
const MAX_IMAGES: usize = 10_000;

/// Loads the dataset from `dir` (the training images of `fold` only, if
/// given; for evaluation, `test_only`, none: their pixels only counted for
/// the normalization), first downloading and extracting the archive when
/// the folder is missing and `download_from` allows it.
pub fn load(
    dir: &Path,
    (fold, test_only): (Option<usize>, bool),
    download_from: Option<&DownloadSource>,
    progress: &mut dyn FnMut(u64, Option<u64>),
) -> Result<Dataset> {
    let folder = dir.join(FOLDER);
    if !folder.is_dir() {
        let how = format!(
            "put torchvision's {FOLDER}/ (from {URL}) into {} by hand, or point --data-dir at a copy (--data-url names a mirror)",
            dir.display()
        );
        let Some(src) = download_from else {
            bail!(
                "no STL-10 in {}: expected {}/ and downloading is off; {how}",
                dir.display(),
                folder.display()
            );
        };
        let archive = Archive {
            file: "stl10_binary.tar.gz",
            folder: FOLDER,
            members: &MEMBERS,
            also: none_else,
        };
        // A data directory made for a download that failed is not left behind.
        let made = !dir.exists();
        fetch_archive(dir, src, &archive, progress)
            .inspect_err(|_| {
                if made {
                    let _ = fs::remove_dir(dir);
                }
            })
            .with_context(|| format!("could not download STL-10 from {}; {how}", src.url))?;
    }
    let (train, counts) = match test_only {
        false => read_split(&folder, "train")?,
        true => (
            Split::empty(SIDE),
            histograms(&read_images(&folder, "train")?),
        ),
    };
    let (test, _) = read_split(&folder, "test")?;
    let (mean, std) =
        mean_std(&counts).with_context(|| format!("{}", folder.join("train_X.bin").display()))?;
    let train = match fold.filter(|_| !test_only) {
        Some(k) => train.select(&Tensor::from_slice(&fold_indices(&folder, k, train.len())?)),
        None => train,
    };
    Ok(Dataset {
        name: "stl10".into(),
        train: Images::Resident(train),
        test: Images::Resident(test),
        classes: class_names(&folder)?,
        mean,
        std,
        source: folder.display().to_string(),
        wnids: None,
        test_names: None,
    })
}

/// A split (`train`, `test`): its images as `N x 3 x 96 x 96` (rows
/// first, as torchvision's `np.transpose(images, (0, 1, 3, 2))`), labels
/// 0..9, and its pixels' histograms.
pub fn read_split(folder: &Path, split: &str) -> Result<(Split, Histograms)> {
    let x = read_images(folder, split)?;
    let yp = folder.join(format!("{split}_y.bin"));
    missing(&yp)?;
    let n = x.len() / PIXELS;
    let y = read_regular(&yp, "an STL-10 labels file", MAX_IMAGES as u64)?;
    if y.len() != n {
        bail!(
            "{}: {} labels for the {n} images of {}",
            yp.display(),
            y.len(),
            folder.join(format!("{split}_X.bin")).display()
        );
    }
    let labels = (y.iter().enumerate())
        .map(|(i, &l)| match l {
            1..=10 => Ok(l as i64 - 1),
            _ => bail!("{}: label {i} is {l}, not one of 1..10", yp.display()),
        })
        .collect::<Result<Vec<_>>>()?;
    let counts = histograms(&x);
    let stored = Tensor::from_slice(&x).view([n as i64, 3, SIDE, SIDE]);
    drop(x);
    let split = Split {
        images: stored.transpose(2, 3).contiguous(),
        labels: Tensor::from_slice(&labels),
        layout: None,
    };
    Ok((split, counts))
}

/// A split's images file, as stored (a whole number of images).
fn read_images(folder: &Path, split: &str) -> Result<Vec<u8>> {
    let xp = folder.join(format!("{split}_X.bin"));
    missing(&xp)?;
    let x = read_regular(&xp, "an STL-10 images file", (MAX_IMAGES * PIXELS) as u64)?;
    if x.is_empty() || x.len() % PIXELS != 0 {
        bail!(
            "{}: {} bytes is not a whole number of {PIXELS}-byte images (3 x 96 x 96)",
            xp.display(),
            x.len()
        );
    }
    Ok(x)
}

/// An error where a split's file `p` is missing.
fn missing(p: &Path) -> Result<()> {
    if !p.exists() {
        bail!(
            "{}: missing (STL-10's folder holds {})",
            p.display(),
            MEMBERS[..4].join(", ")
        );
    }
    Ok(())
}

/// The byte counts of each channel's planes (the images' order and the
/// planes' transposition change nothing).
fn histograms(x: &[u8]) -> Histograms {
    let mut counts = [[0u64; 256]; 3];
    for (k, plane) in x.chunks_exact(PIXELS / 3).enumerate() {
        let c = &mut counts[k % 3];
        for &v in plane {
            c[v as usize] += 1;
        }
    }
    counts
}

/// Line `k` of `fold_indices.txt`: the indices of fold `k`'s training
/// images, each one of the `n`.
fn fold_indices(folder: &Path, k: usize, n: i64) -> Result<Vec<i64>> {
    let path = folder.join("fold_indices.txt");
    if !path.exists() {
        bail!(
            "{}: missing (--fold reads STL-10's training folds from it)",
            path.display()
        );
    }
    let text = read_text(&path, "a list of folds", 1 << 20)?;
    let Some(line) = text.lines().nth(k) else {
        bail!("{}: no line for fold {k}", path.display());
    };
    let indices = (line.split_whitespace())
        .map(|w| match w.parse::<i64>() {
            Ok(i) if (0..n).contains(&i) => Ok(i),
            _ => bail!(
                "{}: fold {k} lists {w:?}, not one of the {n} training images' indices",
                path.display()
            ),
        })
        .collect::<Result<Vec<_>>>()?;
    if indices.is_empty() {
        bail!("{}: fold {k} lists no images", path.display());
    }
    Ok(indices)
}

/// `class_names.txt`'s ten names (one a line), or STL-10's own where the
/// folder has no such file (torchvision then names none).
fn class_names(folder: &Path) -> Result<Vec<String>> {
    let path = folder.join("class_names.txt");
    if !path.exists() {
        return Ok(CLASSES.map(String::from).to_vec());
    }
    let text = read_text(&path, "a class list", 1 << 20)?;
    let names: Vec<String> = (text.lines().map(str::trim))
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if names.len() != CLASSES.len() {
        bail!(
            "{}: lists {} class names, STL-10 has 10",
            path.display(),
            names.len()
        );
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Histograms count by channel; the statistics are the population's.
    #[test]
    fn statistics_are_each_channels() {
        // Two images: channel 0 all 0 and all 255, channel 1 all 51,
        // channel 2 half 0, half 255.
        let plane = PIXELS / 3;
        let mut x = vec![0u8; 2 * PIXELS];
        x[PIXELS..PIXELS + plane].fill(255);
        x[plane..2 * plane].fill(51);
        x[PIXELS + plane..PIXELS + 2 * plane].fill(51);
        x[2 * plane..2 * plane + plane / 2].fill(255);
        x[PIXELS + 2 * plane..PIXELS + 2 * plane + plane / 2].fill(255);
        let counts = histograms(&x);
        assert_eq!(counts[0][255], plane as u64);
        let err = mean_std(&counts).unwrap_err().to_string();
        assert!(err.contains("channel 1 has the same value"), "{err}");
        x[plane] = 0;
        let (mean, std) = mean_std(&histograms(&x)).unwrap();
        assert_eq!((mean[0], std[0]), (0.5, 0.5));
        assert_eq!((mean[2], std[2]), (0.5, 0.5));
        assert!((mean[1] - 0.2 * (1.0 - 1.0 / (2 * plane) as f64)).abs() < 1e-12);
    }
}
