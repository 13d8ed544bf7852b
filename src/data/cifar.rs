//! CIFAR-10 and CIFAR-100, each in either published layout: the Python
//! version (`cifar-10-batches-py/`, `cifar-100-python/`: what
//! torchvision's `CIFAR10`/`CIFAR100(download=True)` leave, Python 2
//! pickles read by the safe pickle reader) or the binary version
//! (`cifar-10-batches-bin/`, `cifar-100-binary/`), which is what vggctl
//! downloads when neither is present. CIFAR-100's labels are its 100 fine
//! classes, as torchvision's.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use tch::Tensor;

use super::archive::{Archive, none_else};
use super::download::{DownloadSource, fetch_archive};
use super::{Dataset, Images, Split};
use crate::formats::numpy::{NUMPY_GLOBALS, ndarray};
use crate::formats::pickle::{Allowlist, Unpickler, Value};

/// The images' side.
pub const SIDE: i64 = 32;
const PIXELS: usize = 3 * 32 * 32;

/// One of the two datasets: its files in both layouts, where it is
/// downloaded from, and its normalization.
pub struct Cifar {
    /// As `--dataset` names it.
    pub name: &'static str,
    pub title: &'static str,
    pub classes: i64,
    pub url: &'static str,
    pub md5: &'static str,
    pub mean: [f64; 3],
    pub std: [f64; 3],
    pub py_dir: &'static str,
    pub bin_dir: &'static str,
    /// The Python version's training files, test file, metadata file, and
    /// the keys of the labels and of their names.
    py_train: &'static [&'static str],
    py_test: &'static str,
    py_meta: &'static str,
    py_labels: &'static str,
    py_names: &'static str,
    /// The binary version's training files, test file, class list, and
    /// the other members its archive must hold.
    bin_train: &'static [&'static str],
    bin_test: &'static str,
    bin_names: &'static str,
    bin_extra: &'static [&'static str],
    /// A binary record's label bytes before its pixels, and which is the label.
    label_bytes: usize,
    label_at: usize,
}

pub const CIFAR10: Cifar = Cifar {
    name: "cifar10",
    title: "CIFAR-10",
    classes: 10,
    url: "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
    md5: "c32a1d4ab5d03f1284b67883e8d87530",
    mean: [0.4914, 0.4822, 0.4465],
    std: [0.2470, 0.2435, 0.2616],
    py_dir: "cifar-10-batches-py",
    bin_dir: "cifar-10-batches-bin",
    py_train: &[
        "data_batch_1",
        "data_batch_2",
        "data_batch_3",
        "data_batch_4",
        "data_batch_5",
    ],
    py_test: "test_batch",
    py_meta: "batches.meta",
    py_labels: "labels",
    py_names: "label_names",
    bin_train: &[
        "data_batch_1.bin",
        "data_batch_2.bin",
        "data_batch_3.bin",
        "data_batch_4.bin",
        "data_batch_5.bin",
    ],
    bin_test: "test_batch.bin",
    bin_names: "batches.meta.txt",
    bin_extra: &[],
    label_bytes: 1,
    label_at: 0,
};

/// The means and deviations of CIFAR-100's training pixels, as the
/// community's CIFAR-100 recipes normalize with.
pub const CIFAR100: Cifar = Cifar {
    name: "cifar100",
    title: "CIFAR-100",
    classes: 100,
    url: "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
    md5: "03b5dce01913d631647c71ecec9e9cb8",
    mean: [0.5071, 0.4865, 0.4409],
    std: [0.2673, 0.2564, 0.2762],
    py_dir: "cifar-100-python",
    bin_dir: "cifar-100-binary",
    py_train: &["train"],
    py_test: "test",
    py_meta: "meta",
    py_labels: "fine_labels",
    py_names: "fine_label_names",
    bin_train: &["train.bin"],
    bin_test: "test.bin",
    bin_names: "fine_label_names.txt",
    bin_extra: &["coarse_label_names.txt"],
    // A coarse label, then the fine one.
    label_bytes: 2,
    label_at: 1,
};

/// CIFAR-10's normalization (the default of models without a dataset's).
pub const MEAN: [f64; 3] = CIFAR10.mean;
pub const STD: [f64; 3] = CIFAR10.std;

/// The dataset `--dataset` names, if it is one of these.
pub fn named(name: &str) -> Option<&'static Cifar> {
    [&CIFAR10, &CIFAR100].into_iter().find(|c| c.name == name)
}

impl Cifar {
    /// Every file of the binary version's folder, as its archive holds them.
    fn bin_members(&self) -> Vec<&'static str> {
        let named = [self.bin_test, self.bin_names];
        [self.bin_train, &named, self.bin_extra].concat()
    }

    /// Loads the dataset from `dir`, downloading the binary version first
    /// when neither layout is there and `download_from` allows it; for
    /// evaluation (`test_only`) its test split alone.
    pub fn load(
        &self,
        dir: &Path,
        test_only: bool,
        download_from: Option<&DownloadSource>,
        progress: &mut dyn FnMut(u64, Option<u64>),
    ) -> Result<Dataset> {
        let (py, bin) = (dir.join(self.py_dir), dir.join(self.bin_dir));
        if py.is_dir() {
            return self.load_py(&py, !test_only);
        }
        if !bin.is_dir() {
            let how = format!(
                "put the binary version's {}/ (from {}) or torchvision's {}/ into {} by hand, or point --data-dir at a copy (--data-url names a mirror, --dataset digits needs no download)",
                self.bin_dir,
                self.url,
                self.py_dir,
                dir.display()
            );
            let Some(src) = download_from else {
                bail!(
                    "no {} in {}: expected {}/ or {}/ and downloading is off; {how}",
                    self.title,
                    dir.display(),
                    py.display(),
                    bin.display()
                );
            };
            // A data directory made for a download that failed is not left behind.
            let made = !dir.exists();
            self.fetch_binary(dir, src, progress)
                .inspect_err(|_| {
                    if made {
                        let _ = fs::remove_dir(dir);
                    }
                })
                .with_context(|| {
                    format!("could not download {} from {}; {how}", self.title, src.url)
                })?;
        }
        self.load_bin(&bin, !test_only)
    }

    fn check_label(&self, path: &Path, index: usize, label: i64) -> Result<()> {
        if !(0..self.classes).contains(&label) {
            bail!(
                "{}: record {index} has label {label}, outside 0..{}",
                path.display(),
                self.classes - 1
            );
        }
        Ok(())
    }

    fn read_file(&self, path: &Path) -> Result<Vec<u8>> {
        if !path.exists() {
            let in_py = path.parent().and_then(Path::file_name) == Some(self.py_dir.as_ref());
            let files = match in_py {
                true => [self.py_train, &[self.py_test, self.py_meta]].concat(),
                false => self.bin_members(),
            };
            bail!(
                "{}: missing ({}'s folder holds {})",
                path.display(),
                self.title,
                files.join(", ")
            );
        }
        // CIFAR-10's batches are 30.7 MB, CIFAR-100's training file 154 MB,
        // in either layout.
        let what = format!("a {} file", self.title);
        crate::fsutil::read_regular(path, &what, 256 << 20)
    }

    /// One binary file: records of label bytes (CIFAR-100: coarse, fine)
    /// and 3,072 pixel bytes (R, G, B planes).
    pub fn read_bin_batch(&self, path: &Path) -> Result<(Vec<u8>, Vec<i64>)> {
        let bytes = self.read_file(path)?;
        let record = self.label_bytes + PIXELS;
        if bytes.is_empty() || bytes.len() % record != 0 {
            bail!(
                "{}: {} bytes is not a whole number of {record}-byte records (truncated record?)",
                path.display(),
                bytes.len()
            );
        }
        let mut images = Vec::with_capacity(bytes.len() / record * PIXELS);
        let mut labels = Vec::with_capacity(bytes.len() / record);
        for (i, rec) in bytes.chunks_exact(record).enumerate() {
            let label = rec[self.label_at] as i64;
            self.check_label(path, i, label)?;
            labels.push(label);
            images.extend_from_slice(&rec[self.label_bytes..]);
        }
        Ok((images, labels))
    }

    /// The binary version's files in `dir` (the training batches where
    /// `train` asks).
    fn load_bin(&self, dir: &Path, train: bool) -> Result<Dataset> {
        let files = if train { self.bin_train } else { &[] };
        let train = (files.iter())
            .map(|f| self.read_bin_batch(&dir.join(f)))
            .collect::<Result<Vec<_>>>()?;
        let test = self.read_bin_batch(&dir.join(self.bin_test))?;
        let meta = dir.join(self.bin_names);
        let text = crate::fsutil::read_text(&meta, "a class list", 1 << 20)?;
        let classes: Vec<String> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect();
        self.dataset(collect(train), collect(vec![test]), classes, &meta, dir)
    }

    fn unpickle(&self, path: &Path) -> Result<Value> {
        let bytes = self.read_file(path)?;
        Unpickler::new(&bytes, &PY_ALLOW)
            .load()
            .with_context(|| format!("{}: not a {} pickle", path.display(), self.title))
    }

    /// One pickled file: a dict with `data` (uint8 N x 3072) and the labels
    /// (`labels`; CIFAR-100: `fine_labels`).
    pub fn read_py_batch(&self, path: &Path) -> Result<(Vec<u8>, Vec<i64>)> {
        let v = self.unpickle(path)?;
        let bad = |what: &str| anyhow!("{}: unexpected content: {what}", path.display());
        let data = v.get("data").ok_or_else(|| bad("no 'data' entry"))?;
        let arr = ndarray(&data).map_err(|e| bad(&format!("'data' is not a uint8 array ({e})")))?;
        if arr.dtype != "|u1" || arr.shape.len() != 2 || arr.shape[1] != PIXELS {
            return Err(bad(&format!(
                "'data' is {} {:?}, expected uint8 N x {PIXELS}",
                arr.dtype, arr.shape
            )));
        }
        let n = arr.shape[0];
        if arr.data.len() != n * PIXELS {
            return Err(bad(&format!(
                "'data' holds {} bytes for {n} images",
                arr.data.len()
            )));
        }
        let key = self.py_labels;
        let labels = v
            .get(key)
            .ok_or_else(|| bad(&format!("no '{key}' entry")))?;
        let labels: Vec<i64> = labels
            .items()
            .ok_or_else(|| bad(&format!("'{key}' is not a list")))?
            .iter()
            .map(|l| l.as_int())
            .collect::<Option<_>>()
            .ok_or_else(|| bad(&format!("'{key}' holds something other than integers")))?;
        if labels.len() != n {
            return Err(bad(&format!("{} labels for {n} images", labels.len())));
        }
        for (i, &l) in labels.iter().enumerate() {
            self.check_label(path, i, l)?;
        }
        Ok((arr.data.to_vec(), labels))
    }

    /// torchvision's pickled files in `dir` (the training batches where
    /// `train` asks).
    fn load_py(&self, dir: &Path, train: bool) -> Result<Dataset> {
        let files = if train { self.py_train } else { &[] };
        let train = (files.iter())
            .map(|f| self.read_py_batch(&dir.join(f)))
            .collect::<Result<Vec<_>>>()?;
        let test = self.read_py_batch(&dir.join(self.py_test))?;
        let meta = dir.join(self.py_meta);
        let v = self.unpickle(&meta)?;
        let key = self.py_names;
        let names = v
            .get(key)
            .and_then(|n| n.items())
            .and_then(|n| n.iter().map(|s| s.as_text()).collect::<Option<Vec<_>>>())
            .ok_or_else(|| anyhow!("{}: unexpected content: no '{key}' list", meta.display()))?;
        self.dataset(collect(train), collect(vec![test]), names, &meta, dir)
    }

    fn dataset(
        &self,
        train: Split,
        test: Split,
        classes: Vec<String>,
        meta: &Path,
        dir: &Path,
    ) -> Result<Dataset> {
        if classes.len() as i64 != self.classes {
            bail!(
                "{}: lists {} class names, {} has {}",
                meta.display(),
                classes.len(),
                self.title,
                self.classes
            );
        }
        Ok(Dataset {
            name: self.name.into(),
            train: Images::Resident(train),
            test: Images::Resident(test),
            classes,
            mean: self.mean,
            std: self.std,
            source: dir.display().to_string(),
            wnids: None,
            test_names: None,
        })
    }

    /// Downloads the binary version's archive into `dir` and extracts its
    /// folder ([`fetch_archive`]).
    fn fetch_binary(
        &self,
        dir: &Path,
        src: &DownloadSource,
        progress: &mut dyn FnMut(u64, Option<u64>),
    ) -> Result<()> {
        let archive = Archive {
            file: self.url.rsplit('/').next().unwrap_or("cifar.tar.gz"),
            folder: self.bin_dir,
            members: &self.bin_members(),
            also: none_else,
        };
        fetch_archive(dir, src, &archive, progress)
    }
}

fn collect(batches: Vec<(Vec<u8>, Vec<i64>)>) -> Split {
    let labels: Vec<i64> = batches
        .iter()
        .flat_map(|(_, l)| l.iter().copied())
        .collect();
    let images: Vec<u8> = batches.into_iter().flat_map(|(i, _)| i).collect();
    let n = labels.len() as i64;
    Split {
        images: Tensor::from_slice(&images).view([n, 3, SIDE, SIDE]),
        labels: Tensor::from_slice(&labels),
        layout: None,
    }
}

const PY_ALLOW: Allowlist = Allowlist {
    globals: NUMPY_GLOBALS,
    dict_like: &[],
};
