//! MNIST, Fashion-MNIST and KMNIST in torchvision's layout: `DIR/MNIST/raw/`
//! (or `DIR/FashionMNIST/raw/`, `DIR/KMNIST/raw/`) holding the four IDX files
//! (`train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
//! `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`), each also read
//! from its `.gz`. What vggctl downloads is what torchvision's
//! `MNIST(root, download=True)` leaves: the four `.gz` files, checked by
//! their MD5s, and each extracted beside it, so either tool reads the
//! other's folder. QMNIST is of the family too (its own file names, its
//! labels int32 rows), and so are EMNIST's splits (see [`super::emnist`]:
//! their own file names, one zip, images transposed).
//!
//! The 28x28 gray images become what the VGG family reads: 32x32 RGB,
//! resized bilinearly with antialiasing (torchvision's `Resize(32)` of the
//! uint8 image tensor, bit for bit) and the gray value repeated in the
//! three channels (`Grayscale(3)`).

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use rayon::prelude::*;
use tch::{Device, Kind, Tensor};

use super::download::{DownloadSource, fetch_files};
use super::emnist;
use super::resize::{Resize, resize_window_into};
use super::{Dataset, Histograms, Images, Split, gray_histograms, mean_std};
use crate::formats::idx::{self, Caps, Kind as Idx};
use crate::fsutil::TempFile;

/// The images' side as the model sees them.
pub const SIDE: i64 = 32;
/// The four files in the order of [`Mnist::md5s`].
pub const FILES: [&str; 4] = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
];
/// QMNIST's four files, in the same order.
const QMNIST_FILES: [&str; 4] = [
    "qmnist-train-images-idx3-ubyte",
    "qmnist-train-labels-idx2-int",
    "qmnist-test-images-idx3-ubyte",
    "qmnist-test-labels-idx2-int",
];
/// MNIST's training file has 60,000 images (47 MB; 184 MB as the model
/// reads them).
const CAPS: Caps = Caps {
    images: 100_000,
    bytes: 64 << 20,
};
/// The largest image side read.
const MAX_SIDE: usize = 1024;

/// One of the datasets: its folder (torchvision's class name), where it
/// is downloaded from, its classes and its normalization.
pub struct Mnist {
    /// As `--dataset` names it.
    pub name: &'static str,
    pub title: &'static str,
    /// The folder under the data directory: torchvision's class name.
    pub folder: &'static str,
    /// Where the `.gz` files (EMNIST's zip) lie, tried in order.
    pub mirrors: &'static [&'static str],
    /// The MD5 of each `.gz` file, in the order of [`FILES`] (EMNIST's
    /// zip's).
    pub md5s: &'static [&'static str],
    /// torchvision's `classes`.
    pub classes: &'static [&'static str],
    /// The usual normalization of the gray values (`Normalize((m,), (s,))`),
    /// in each channel: mean and deviation; None where there is no usual
    /// one (the training images' own, computed as they are loaded).
    pub norm: Option<([f64; 3], [f64; 3])>,
    /// Whether a mirrored image is still one of its class, so that
    /// training flips images by default (clothes are; digits are not).
    pub mirrors_keep_class: bool,
    pub layout: Layout,
}

/// How a dataset of the family keeps its files.
#[derive(Clone, Copy, PartialEq)]
pub enum Layout {
    /// MNIST's four files ([`FILES`]), each downloaded as its `.gz`.
    Mnist,
    /// QMNIST's: its own names, labels as rows of eight int32 (the class
    /// first, then NIST's writer and character ids).
    Qmnist,
    /// EMNIST's split: files named by it, out of one zip, images stored
    /// transposed.
    Emnist(&'static str),
}

pub const MNIST: Mnist = Mnist {
    name: "mnist",
    title: "MNIST",
    folder: "MNIST",
    mirrors: &[
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ],
    md5s: &[
        "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "d53e105ee54ea40749a09fcbcd1e9432",
        "9fb629c4189551a2d022fa330f9573f3",
        "ec29112dd5afa0611ce80d1b7f02629c",
    ],
    classes: &[
        "0 - zero",
        "1 - one",
        "2 - two",
        "3 - three",
        "4 - four",
        "5 - five",
        "6 - six",
        "7 - seven",
        "8 - eight",
        "9 - nine",
    ],
    norm: Some(([0.1307; 3], [0.3081; 3])),
    mirrors_keep_class: false,
    layout: Layout::Mnist,
};

pub const FASHION_MNIST: Mnist = Mnist {
    name: "fashion-mnist",
    title: "Fashion-MNIST",
    folder: "FashionMNIST",
    mirrors: &["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
    md5s: &[
        "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "25c81989df183df01b3e8a0aad5dffbe",
        "bef4ecab320f06d8554ea6380940ec79",
        "bb300cfdad3c16e7a12a480ee83cd310",
    ],
    classes: &[
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ],
    norm: Some(([0.2860; 3], [0.3530; 3])),
    mirrors_keep_class: true,
    layout: Layout::Mnist,
};

/// Kuzushiji-MNIST: ten cursive hiragana in MNIST's format. Its sources
/// publish no agreed normalization, so the training images' own is used.
pub const KMNIST: Mnist = Mnist {
    name: "kmnist",
    title: "KMNIST",
    folder: "KMNIST",
    mirrors: &["http://codh.rois.ac.jp/kmnist/dataset/kmnist/"],
    md5s: &[
        "bdb82020997e1d708af4cf47b453dcf7",
        "e144d726b3acfaa3e44228e80efcd344",
        "5c965bf0a639b31b8f53240b1b52f4d7",
        "7320c461ea6c1c855c0b718fb2a4b134",
    ],
    classes: &["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"],
    norm: None,
    mirrors_keep_class: false,
    layout: Layout::Mnist,
};

const fn emnist(
    name: &'static str,
    split: &'static str,
    classes: &'static [&'static str],
) -> Mnist {
    Mnist {
        name,
        title: "EMNIST",
        folder: "EMNIST",
        mirrors: &[emnist::MIRROR],
        md5s: &[emnist::MD5],
        classes,
        // No agreed normalization: the split's training images' own.
        norm: None,
        mirrors_keep_class: false,
        layout: Layout::Emnist(split),
    }
}

/// EMNIST's six splits, as `--dataset emnist-<split>` names them.
pub const EMNIST_SPLITS: [Mnist; 6] = [
    emnist("emnist-byclass", "byclass", &emnist::BYCLASS),
    emnist("emnist-bymerge", "bymerge", &emnist::BYMERGE),
    emnist("emnist-balanced", "balanced", &emnist::BYMERGE),
    emnist("emnist-letters", "letters", &emnist::LETTERS),
    emnist("emnist-digits", "digits", &emnist::DIGITS),
    emnist("emnist-mnist", "mnist", &emnist::DIGITS),
];

/// QMNIST (Yadav and Bottou, 2019): MNIST's 60,000 training images as
/// reconstructed from NIST's, and 60,000 test images, the first 10,000 of
/// them MNIST's test split (torchvision's `QMNIST(train=...)`, its `train`
/// and `test`). Its labels are MNIST's digits, normalized as MNIST is.
pub const QMNIST: Mnist = Mnist {
    name: "qmnist",
    title: "QMNIST",
    folder: "QMNIST",
    mirrors: &["https://raw.githubusercontent.com/facebookresearch/qmnist/master/"],
    md5s: &[
        "ed72d4157d28c017586c42bc6afe6370",
        "0058f8dd561b90ffdd0f734c6a30e5e4",
        "1394631089c404de565df7b7aeaf9412",
        "5b5b05890a5e13444e108efe57b788aa",
    ],
    classes: MNIST.classes,
    norm: MNIST.norm,
    mirrors_keep_class: false,
    layout: Layout::Qmnist,
};

/// The dataset `--dataset` names, if it is one of these (or an EMNIST
/// split).
pub fn named(name: &str) -> Option<&'static Mnist> {
    [&MNIST, &FASHION_MNIST, &KMNIST, &QMNIST]
        .into_iter()
        .chain(&EMNIST_SPLITS)
        .find(|m| m.name == name)
}

impl Mnist {
    /// Where torchvision keeps its files under `dir`.
    pub fn raw_dir(&self, dir: &Path) -> PathBuf {
        dir.join(self.folder).join("raw")
    }

    /// Its four files, in [`FILES`]' order (EMNIST's are named by split).
    pub fn files(&self) -> [String; 4] {
        match self.layout {
            Layout::Mnist => FILES.map(String::from),
            Layout::Qmnist => QMNIST_FILES.map(String::from),
            Layout::Emnist(split) => emnist::files(split),
        }
    }

    /// The name of its environment variables (`VGGCTL_EMNIST_URL`: one
    /// zip serves every EMNIST split).
    pub fn env_name(&self) -> &str {
        match self.layout {
            Layout::Emnist(_) => "emnist",
            _ => self.name,
        }
    }

    fn caps(&self) -> Caps {
        match self.layout {
            Layout::Emnist(_) => Caps {
                images: emnist::MAX_IMAGES,
                bytes: emnist::MAX_BYTES,
            },
            _ => CAPS,
        }
    }

    /// Loads the dataset from `dir`, first downloading the files that are
    /// missing when `download_from` allows it; for evaluation
    /// (`test_only`) its test split alone, the training images only counted
    /// where they give the normalization.
    pub fn load(
        &self,
        dir: &Path,
        test_only: bool,
        download_from: Option<&DownloadSource>,
        progress: &mut dyn FnMut(u64, Option<u64>),
    ) -> Result<Dataset> {
        let raw = self.raw_dir(dir);
        let files = self.files();
        let missing: Vec<&str> = (files.iter().map(String::as_str))
            .filter(|f| !raw.join(f).exists() && !raw.join(format!("{f}.gz")).exists())
            .collect();
        if !missing.is_empty() {
            self.fetch(dir, &missing, download_from, progress)?;
        }
        let [train_x, train_y, test_x, test_y] = files.map(|f| raw.join(f));
        let (train, counts) = match (test_only, self.norm) {
            (false, _) => self.split(&train_x, &train_y)?,
            (true, Some(_)) => (Split::empty(SIDE), [[0; 256]; 3]),
            (true, None) => (Split::empty(SIDE), read_gray(&train_x, self.caps())?.1),
        };
        let (test, _) = self.split(&test_x, &test_y)?;
        let (mean, std) = match self.norm {
            Some(norm) => norm,
            None => mean_std(&counts).with_context(|| format!("{}", train_x.display()))?,
        };
        Ok(Dataset {
            name: self.name.into(),
            train: Images::Resident(train),
            test: Images::Resident(test),
            classes: self.classes.iter().map(|c| c.to_string()).collect(),
            mean,
            std,
            source: raw.display().to_string(),
            wnids: None,
            test_names: None,
        })
    }

    /// One split: its images file and labels file, as 32x32 RGB, and the
    /// histograms of its images' gray values as they are stored.
    fn split(&self, images: &Path, labels: &Path) -> Result<(Split, Histograms)> {
        let upright = matches!(self.layout, Layout::Emnist(_));
        let (x, counts) = read_images_counted(images, self.caps(), upright)?;
        let y = self.read_labels(labels)?;
        let n = x.size()[0];
        if y.len() as i64 != n {
            bail!(
                "{}: {} labels for the {n} images of {}",
                labels.display(),
                y.len(),
                images.display()
            );
        }
        let split = Split {
            images: x,
            labels: Tensor::from_slice(&y),
            layout: None,
        };
        Ok((split, counts))
    }

    /// A labels file (or its `.gz`), each label one of the classes.
    pub fn read_labels(&self, path: &Path) -> Result<Vec<i64>> {
        let bytes = idx::read(path, self.caps())?;
        let labels: Vec<i64> = match self.layout {
            // torchvision's QMNIST(compat=True): each row's first column.
            Layout::Qmnist => {
                let y = idx::parse(bytes, Idx::IntLabels, path, self.caps())?;
                let row = 4 * y.dims[1];
                if row == 0 {
                    bail!("{}: rows of no columns, so no labels", path.display());
                }
                (y.data.chunks_exact(row))
                    .map(|r| i32::from_be_bytes(r[..4].try_into().expect("4 bytes")) as i64)
                    .collect()
            }
            _ => (idx::parse(bytes, Idx::Labels, path, self.caps())?.data)
                .into_iter()
                .map(i64::from)
                .collect(),
        };
        let classes = self.classes.len() as i64;
        if let Some(i) = labels.iter().position(|l| !(0..classes).contains(l)) {
            bail!(
                "{}: label {i} is {}, outside 0..{}",
                path.display(),
                labels[i],
                classes - 1
            );
        }
        Ok(labels)
    }

    /// The `missing` files fetched into `dir`'s raw folder: their `.gz`
    /// downloaded and each extracted beside it (see [`fetch_files`]), or
    /// EMNIST's extracted from its zip.
    fn fetch(
        &self,
        dir: &Path,
        missing: &[&str],
        src: Option<&DownloadSource>,
        progress: &mut dyn FnMut(u64, Option<u64>),
    ) -> Result<()> {
        let raw = self.raw_dir(dir);
        let how = match self.layout {
            Layout::Emnist(split) => format!(
                "put torchvision's {}/raw/ (its emnist-{split}-* IDX files, or {}) into {} by hand",
                self.folder,
                emnist::ZIP,
                dir.display()
            ),
            _ => format!(
                "put torchvision's {}/raw/ (its four IDX files, or their .gz) into {} by hand",
                self.folder,
                dir.display()
            ),
        };
        let how = format!("{how}, or point --data-dir at a copy (--data-url names a mirror)");
        // EMNIST's split comes out of its zip, downloaded only if missing.
        let emnist = matches!(self.layout, Layout::Emnist(_));
        if emnist && (src.is_some() || raw.join(emnist::ZIP).exists()) {
            return emnist::fetch(&raw, missing, src, progress).with_context(|| {
                format!(
                    "could not get {}'s files from {}; {how}",
                    self.name,
                    emnist::ZIP
                )
            });
        }
        let Some(src) = src else {
            let zip = if emnist { vec![emnist::ZIP] } else { vec![] };
            bail!(
                "no {} in {}: {} lacks {} and downloading is off; {how}",
                if emnist { self.name } else { self.title },
                dir.display(),
                raw.display(),
                [missing, &zip].concat().join(", ")
            );
        };
        let all = self.files().map(|f| format!("{f}.gz"));
        let names: Vec<String> = missing.iter().map(|f| format!("{f}.gz")).collect();
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        fetch_files(&raw, (&all, &names), src, progress, &mut extract)
            .with_context(|| format!("could not download {}; {how}", self.title))
    }
}

/// A downloaded `FILE.gz` extracted to `FILE` beside it (removed if it
/// does not unpack).
fn extract(gz: &Path) -> Result<()> {
    let bytes = idx::gunzip(gz, CAPS).inspect_err(|_| {
        let _ = fs::remove_file(gz);
    })?;
    let target = gz.with_extension("");
    let mut out = TempFile::beside(&target)?;
    std::io::Write::write_all(out.file(), &bytes)
        .with_context(|| format!("writing {}", target.display()))?;
    out.commit(&target)
}

/// An images file (or its `.gz`) of MNIST's as `N x 3 x 32 x 32` uint8.
pub fn read_images(path: &Path) -> Result<Tensor> {
    read_images_counted(path, CAPS, false).map(|(x, _)| x)
}

/// [`read_images`] within `caps`, each image transposed where `upright`
/// (EMNIST's), and the histograms of the file's gray values.
fn read_images_counted(path: &Path, caps: Caps, upright: bool) -> Result<(Tensor, Histograms)> {
    let (x, counts) = read_gray(path, caps)?;
    let (n, h, w) = (x.dims[0], x.dims[1], x.dims[2]);
    Ok((rgb32(&x.data, n, (h, w), upright), counts))
}

/// An images file's gray values as stored, within `caps`, and their
/// histograms.
fn read_gray(path: &Path, caps: Caps) -> Result<(idx::Idx, Histograms)> {
    let x = idx::parse(idx::read(path, caps)?, Idx::Images, path, caps)?;
    let (h, w) = (x.dims[1], x.dims[2]);
    if !(1..=MAX_SIDE).contains(&h) || !(1..=MAX_SIDE).contains(&w) {
        bail!(
            "{}: images of {h}x{w} pixels (1 to {MAX_SIDE} a side expected)",
            path.display()
        );
    }
    let counts = gray_histograms(&x.data);
    Ok((x, counts))
}

/// An image of `h` x `w` transposed (to `w` x `h`).
fn transposed(image: &[u8], (h, w): (usize, usize)) -> Vec<u8> {
    let mut out = vec![0u8; image.len()];
    for (r, row) in out.chunks_mut(h).enumerate() {
        row.iter_mut()
            .enumerate()
            .for_each(|(c, v)| *v = image[c * w + r]);
    }
    out
}

/// Images converted a chunk at a time, so that converting EMNIST's
/// 697,932 needs no second copy of the 2.1 GB result.
const CHUNK: usize = 16_384;

/// `n` gray images of `h` x `w` (each transposed first where `upright`) as
/// `n x 3 x 32 x 32` uint8: resized as torchvision's antialiased bilinear
/// `Resize` rounds them, then repeated in the three channels.
pub(super) fn rgb32(gray: &[u8], n: usize, (h, w): (usize, usize), upright: bool) -> Tensor {
    let side = SIDE as usize;
    let plane = side * side;
    let (rows, cols) = if upright { (w, h) } else { (h, w) };
    let resize = Resize::whole((rows, cols), (side, side));
    let out = Tensor::zeros([n as i64, 3, SIDE, SIDE], (Kind::Uint8, Device::Cpu));
    for (k, images) in gray.chunks(CHUNK * h * w).enumerate() {
        let m = images.len() / (h * w);
        let mut buf = vec![0u8; m * 3 * plane];
        buf.par_chunks_mut(3 * plane)
            .zip(images.par_chunks(h * w))
            .for_each(|(dst, src)| {
                let turned;
                let src = match upright {
                    true => {
                        turned = transposed(src, (h, w));
                        &turned[..]
                    }
                    false => src,
                };
                if (rows, cols) == (side, side) {
                    dst.chunks_mut(plane).for_each(|p| p.copy_from_slice(src));
                } else {
                    let rgb: Vec<u8> = src.iter().flat_map(|&v| [v, v, v]).collect();
                    resize_window_into(&rgb, cols, &resize, dst);
                }
            });
        let part = Tensor::from_slice(&buf).view([m as i64, 3, SIDE, SIDE]);
        out.narrow(0, (k * CHUNK) as i64, m as i64).copy_(&part);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 28x28 image becomes 32x32 with its gray in every channel; a
    /// constant image stays constant.
    #[test]
    fn gray_images_become_32x32_rgb() {
        let t = rgb32(&[200u8; 2 * 28 * 28], 2, (28, 28), false);
        assert_eq!(t.size(), [2, 3, 32, 32]);
        assert_eq!(t.min().int64_value(&[]), 200);
        assert_eq!(t.max().int64_value(&[]), 200);
        let ramp: Vec<u8> = (0..28 * 28).map(|i| (i % 251) as u8).collect();
        let t = rgb32(&ramp, 1, (28, 28), false);
        assert!(t.get(0).get(0).equal(&t.get(0).get(2)));
        // Upright: the transposed image's resize is the resize's transpose.
        let square: Vec<u8> = (0..32 * 32).map(|i| (i % 253) as u8).collect();
        let turned = rgb32(&square, 1, (32, 32), true);
        let plain = rgb32(&square, 1, (32, 32), false);
        assert!(turned.equal(&plain.transpose(2, 3)));
        assert_eq!(transposed(&[1, 2, 3, 4, 5, 6], (2, 3)), [1, 4, 2, 5, 3, 6]);
    }
}
