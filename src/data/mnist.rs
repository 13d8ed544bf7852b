//! MNIST, Fashion-MNIST and KMNIST in torchvision's layout: `DIR/MNIST/raw/`
//! (or `DIR/FashionMNIST/raw/`, `DIR/KMNIST/raw/`) holding the four IDX files
//! (`train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
//! `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`), each also read
//! from its `.gz`. What vggctl downloads is what torchvision's
//! `MNIST(root, download=True)` leaves: the four `.gz` files, checked by
//! their MD5s, and each extracted beside it, so either tool reads the
//! other's folder.
//!
//! The 28x28 gray images become what the VGG family reads: 32x32 RGB,
//! resized bilinearly with antialiasing (torchvision's `Resize(32)` of the
//! uint8 image tensor, bit for bit) and the gray value repeated in the
//! three channels (`Grayscale(3)`).

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use flate2::read::GzDecoder;
use rayon::prelude::*;
use tch::Tensor;

use super::download::{DownloadSource, fetch_files};
use super::resize::{Resize, resize_window_into};
use super::{Dataset, Images, Split, mean_std};
use crate::fsutil::{TempFile, read_regular};

/// The images' side as the model sees them.
pub const SIDE: i64 = 32;
/// The four files in the order of [`Mnist::md5s`].
pub const FILES: [&str; 4] = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
];
/// The largest IDX file read, packed or not (MNIST's training images
/// are 47 MB).
const MAX_BYTES: u64 = 64 << 20;
/// The most images one file may hold (MNIST's training file has 60,000):
/// 307 MB as the model reads them.
const MAX_IMAGES: usize = 100_000;
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
    /// Where the `.gz` files lie, tried in order.
    pub mirrors: &'static [&'static str],
    /// The MD5 of each `.gz` file, in the order of [`FILES`].
    pub md5s: [&'static str; 4],
    /// torchvision's `classes`.
    pub classes: &'static [&'static str],
    /// The usual normalization of the gray values (`Normalize((m,), (s,))`),
    /// in each channel: mean and deviation; None where there is no usual
    /// one (the training images' own, computed as they are loaded).
    pub norm: Option<([f64; 3], [f64; 3])>,
    /// Whether a mirrored image is still one of its class, so that
    /// training flips images by default (clothes are; digits are not).
    pub mirrors_keep_class: bool,
}

pub const MNIST: Mnist = Mnist {
    name: "mnist",
    title: "MNIST",
    folder: "MNIST",
    mirrors: &[
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ],
    md5s: [
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
};

pub const FASHION_MNIST: Mnist = Mnist {
    name: "fashion-mnist",
    title: "Fashion-MNIST",
    folder: "FashionMNIST",
    mirrors: &["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
    md5s: [
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
};

/// Kuzushiji-MNIST: ten cursive hiragana in MNIST's format. Its sources
/// publish no agreed normalization, so the training images' own is used.
pub const KMNIST: Mnist = Mnist {
    name: "kmnist",
    title: "KMNIST",
    folder: "KMNIST",
    mirrors: &["http://codh.rois.ac.jp/kmnist/dataset/kmnist/"],
    md5s: [
        "bdb82020997e1d708af4cf47b453dcf7",
        "e144d726b3acfaa3e44228e80efcd344",
        "5c965bf0a639b31b8f53240b1b52f4d7",
        "7320c461ea6c1c855c0b718fb2a4b134",
    ],
    classes: &["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"],
    norm: None,
    mirrors_keep_class: false,
};

/// The dataset `--dataset` names, if it is one of these.
pub fn named(name: &str) -> Option<&'static Mnist> {
    [&MNIST, &FASHION_MNIST, &KMNIST]
        .into_iter()
        .find(|m| m.name == name)
}

/// An IDX file's content: its dimensions and its bytes after the header.
pub struct Idx {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// Parses an IDX file of unsigned bytes with `rank` dimensions (3:
/// images, 1: labels), whose bytes must be exactly what its header says.
pub fn parse_idx(mut bytes: Vec<u8>, rank: usize, path: &Path) -> Result<Idx> {
    let what = match rank {
        3 => "an IDX file of images (magic 0x00000803)",
        _ => "an IDX file of labels (magic 0x00000801)",
    };
    let header = 4 + 4 * rank;
    match bytes.get(..4) {
        Some(&[0, 0, 8, r]) if r as usize == rank && bytes.len() >= header => {}
        _ => bail!("{}: not {what}", path.display()),
    }
    let dims: Vec<usize> = bytes[4..header]
        .chunks_exact(4)
        .map(|d| u32::from_be_bytes(d.try_into().expect("4 bytes")) as usize)
        .collect();
    let size = dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
    let data = bytes.len() - header;
    if size != Some(data) {
        bail!(
            "{}: its header says {dims:?} ({} bytes) but {data} bytes follow it (truncated?)",
            path.display(),
            size.map_or("too many".into(), |s| s.to_string()),
        );
    }
    if dims[0] > MAX_IMAGES {
        bail!(
            "{}: {} entries, more than the {MAX_IMAGES} read from one file",
            path.display(),
            dims[0]
        );
    }
    bytes.drain(..header);
    Ok(Idx { dims, data: bytes })
}

impl Mnist {
    /// Where torchvision keeps its files under `dir`.
    pub fn raw_dir(&self, dir: &Path) -> PathBuf {
        dir.join(self.folder).join("raw")
    }

    /// Loads the dataset from `dir`, first downloading the files that are
    /// missing when `download_from` allows it.
    pub fn load(
        &self,
        dir: &Path,
        download_from: Option<&DownloadSource>,
        progress: &mut dyn FnMut(u64, Option<u64>),
    ) -> Result<Dataset> {
        let raw = self.raw_dir(dir);
        let missing: Vec<&str> = FILES
            .into_iter()
            .filter(|f| !raw.join(f).exists() && !raw.join(format!("{f}.gz")).exists())
            .collect();
        if !missing.is_empty() {
            let how = format!(
                "put torchvision's {}/raw/ (its four IDX files, or their .gz) into {} by hand, or point --data-dir at a copy (--data-url names a mirror)",
                self.folder,
                dir.display()
            );
            let Some(src) = download_from else {
                bail!(
                    "no {} in {}: {} lacks {} and downloading is off; {how}",
                    self.title,
                    dir.display(),
                    raw.display(),
                    missing.join(", ")
                );
            };
            self.fetch(&raw, &missing, src, progress)
                .with_context(|| format!("could not download {}; {how}", self.title))?;
        }
        let [train_x, train_y, test_x, test_y] = FILES.map(|f| raw.join(f));
        let (train, counts) = self.split(&train_x, &train_y)?;
        let (test, _) = self.split(&test_x, &test_y)?;
        let (mean, std) = match self.norm {
            Some(norm) => norm,
            None => mean_std(&[counts; 3]).with_context(|| format!("{}", train_x.display()))?,
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
    /// count of each gray value in its images as they are stored.
    fn split(&self, images: &Path, labels: &Path) -> Result<(Split, [u64; 256])> {
        let (x, counts) = read_images_counted(images)?;
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
        let y = parse_idx(read(path)?, 1, path)?;
        let classes = self.classes.len();
        if let Some(i) = y.data.iter().position(|&l| l as usize >= classes) {
            bail!(
                "{}: label {i} is {}, outside 0..{}",
                path.display(),
                y.data[i],
                classes - 1
            );
        }
        Ok(y.data.iter().map(|&l| l as i64).collect())
    }

    /// Downloads the `missing` files' `.gz` into `raw` and extracts each
    /// beside it (see [`fetch_files`]).
    fn fetch(
        &self,
        raw: &Path,
        missing: &[&str],
        src: &DownloadSource,
        progress: &mut dyn FnMut(u64, Option<u64>),
    ) -> Result<()> {
        let all = FILES.map(|f| format!("{f}.gz"));
        let names: Vec<String> = missing.iter().map(|f| format!("{f}.gz")).collect();
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        fetch_files(raw, (&all, &names), src, progress, &mut extract)
    }
}

/// A downloaded `FILE.gz` extracted to `FILE` beside it (removed if it
/// does not unpack).
fn extract(gz: &Path) -> Result<()> {
    let bytes = gunzip(gz).inspect_err(|_| {
        let _ = fs::remove_file(gz);
    })?;
    let target = gz.with_extension("");
    let mut out = TempFile::beside(&target)?;
    std::io::Write::write_all(out.file(), &bytes)
        .with_context(|| format!("writing {}", target.display()))?;
    out.commit(&target)
}

/// An images file (or its `.gz`) as `N x 3 x 32 x 32` uint8.
pub fn read_images(path: &Path) -> Result<Tensor> {
    read_images_counted(path).map(|(x, _)| x)
}

/// [`read_images`], and the count of each gray value in the file.
fn read_images_counted(path: &Path) -> Result<(Tensor, [u64; 256])> {
    let x = parse_idx(read(path)?, 3, path)?;
    let (n, h, w) = (x.dims[0], x.dims[1], x.dims[2]);
    if !(1..=MAX_SIDE).contains(&h) || !(1..=MAX_SIDE).contains(&w) {
        bail!(
            "{}: images of {h}x{w} pixels (1 to {MAX_SIDE} a side expected)",
            path.display()
        );
    }
    let mut counts = [0u64; 256];
    for &v in &x.data {
        counts[v as usize] += 1;
    }
    Ok((rgb32(&x.data, n, (h, w)), counts))
}

/// A file's bytes: `path` itself, else its `.gz` decompressed.
fn read(path: &Path) -> Result<Vec<u8>> {
    if path.exists() {
        return read_regular(path, "an IDX file", MAX_BYTES);
    }
    let gz = path.with_file_name(format!(
        "{}.gz",
        path.file_name().unwrap_or_default().to_string_lossy()
    ));
    if gz.exists() {
        return gunzip(&gz);
    }
    bail!(
        "{}: missing (neither it nor its .gz is there; the folder holds {})",
        path.display(),
        FILES.join(", ")
    )
}

/// A `.gz` file decompressed, refused beyond [`MAX_BYTES`].
fn gunzip(gz: &Path) -> Result<Vec<u8>> {
    let packed = read_regular(gz, "a gzip file", MAX_BYTES)?;
    let mut bytes = Vec::new();
    GzDecoder::new(packed.as_slice())
        .take(MAX_BYTES + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("{}: not a gzip file, or a damaged one", gz.display()))?;
    if bytes.len() as u64 > MAX_BYTES {
        bail!("{}: unpacks to more than {MAX_BYTES} bytes", gz.display());
    }
    Ok(bytes)
}

/// `n` gray images of `h` x `w` as `n x 3 x 32 x 32` uint8: resized as
/// torchvision's antialiased bilinear `Resize` rounds them, then repeated
/// in the three channels.
fn rgb32(gray: &[u8], n: usize, (h, w): (usize, usize)) -> Tensor {
    let side = SIDE as usize;
    let plane = side * side;
    let resize = Resize::whole((h, w), (side, side));
    let mut out = vec![0u8; n * 3 * plane];
    out.par_chunks_mut(3 * plane)
        .zip(gray.par_chunks(h * w))
        .for_each(|(dst, src)| {
            if (h, w) == (side, side) {
                dst.chunks_mut(plane).for_each(|p| p.copy_from_slice(src));
            } else {
                let rgb: Vec<u8> = src.iter().flat_map(|&v| [v, v, v]).collect();
                resize_window_into(&rgb, w, &resize, dst);
            }
        });
    Tensor::from_slice(&out).view([n as i64, 3, SIDE, SIDE])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx(rank: u8, dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut b = vec![0, 0, 8, rank];
        dims.iter().for_each(|d| b.extend(d.to_be_bytes()));
        b.extend_from_slice(data);
        b
    }

    /// The header's dimensions must account for every byte; the magic
    /// must be unsigned bytes of the asked rank.
    #[test]
    fn idx_files_hold_exactly_what_their_header_says() {
        let p = Path::new("f");
        let ok = parse_idx(idx(3, &[2, 2, 3], &[7; 12]), 3, p).unwrap();
        assert_eq!((ok.dims, ok.data), (vec![2, 2, 3], vec![7; 12]));
        let err = |b: &[u8], rank| parse_idx(b.to_vec(), rank, p).err().unwrap().to_string();
        assert!(err(&idx(3, &[2, 2, 3], &[7; 11]), 3).contains("11 bytes follow"));
        assert!(err(&idx(3, &[2, 2, 3], &[7; 13]), 3).contains("13 bytes follow"));
        assert!(err(&idx(1, &[12], &[7; 12]), 3).contains("not an IDX file of images"));
        assert!(err(&idx(3, &[u32::MAX; 3], &[]), 3).contains("too many"));
        let mut int32 = idx(1, &[1], &[0; 4]);
        int32[2] = 0x0c;
        assert!(err(&int32, 1).contains("not an IDX file of labels"));
        assert!(err(&[0, 0, 8], 1).contains("not an IDX"));
        let many = (MAX_IMAGES + 1) as u32;
        assert!(err(&idx(1, &[many], &vec![0; many as usize]), 1).contains("more than"));
    }

    /// A 28x28 image becomes 32x32 with its gray in every channel; a
    /// constant image stays constant.
    #[test]
    fn gray_images_become_32x32_rgb() {
        let t = rgb32(&[200u8; 2 * 28 * 28], 2, (28, 28));
        assert_eq!(t.size(), [2, 3, 32, 32]);
        assert_eq!(t.min().int64_value(&[]), 200);
        assert_eq!(t.max().int64_value(&[]), 200);
        let ramp: Vec<u8> = (0..28 * 28).map(|i| (i % 251) as u8).collect();
        let t = rgb32(&ramp, 1, (28, 28));
        assert!(t.get(0).get(0).equal(&t.get(0).get(2)));
    }
}
