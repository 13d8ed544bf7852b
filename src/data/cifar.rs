//! CIFAR-10 in either published layout: `cifar-10-batches-py/` (what
//! torchvision's `CIFAR10(download=True)` leaves: Python 2 pickles, read by
//! the safe pickle reader) or `cifar-10-batches-bin/` (the binary version,
//! which is what vggctl downloads when neither is present).

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use tch::Tensor;

use super::download::{Checksum, download};
use super::{Dataset, Images, Split};
use crate::formats::numpy::{NUMPY_GLOBALS, ndarray};
use crate::formats::pickle::{Allowlist, Unpickler, Value};

pub const URL: &str = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz";
pub const MD5: &str = "c32a1d4ab5d03f1284b67883e8d87530";
pub const MEAN: [f64; 3] = [0.4914, 0.4822, 0.4465];
pub const STD: [f64; 3] = [0.2470, 0.2435, 0.2616];
pub const PY_DIR: &str = "cifar-10-batches-py";
pub const BIN_DIR: &str = "cifar-10-batches-bin";

/// The images' side.
pub const SIDE: i64 = 32;
const PIXELS: usize = 3 * 32 * 32;
const RECORD: usize = 1 + PIXELS;
const CLASSES: i64 = 10;
const BIN_FILES: [&str; 7] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
    "test_batch.bin",
    "batches.meta.txt",
];

/// Where to fetch the archive from when the data is missing.
pub struct DownloadSource {
    pub url: String,
    pub md5: String,
}

/// Loads CIFAR-10 from `dir`, downloading the binary version first when
/// neither layout is there and `download` allows it.
pub fn load(
    dir: &Path,
    download_from: Option<&DownloadSource>,
    progress: &mut dyn FnMut(u64, Option<u64>),
) -> Result<Dataset> {
    let (py, bin) = (dir.join(PY_DIR), dir.join(BIN_DIR));
    if py.is_dir() {
        return load_py(&py);
    }
    if !bin.is_dir() {
        let how = format!(
            "put the binary version's {BIN_DIR}/ (from {URL}) or torchvision's {PY_DIR}/ into {} by hand, or point --data-dir at a copy (--data-url names a mirror, --dataset digits needs no download)",
            dir.display()
        );
        let Some(src) = download_from else {
            bail!(
                "no CIFAR-10 in {}: expected {}/ or {}/ and downloading is off; {how}",
                dir.display(),
                py.display(),
                bin.display()
            );
        };
        // A data directory made for a download that failed is not left behind.
        let made = !dir.exists();
        fetch_binary(dir, src, progress)
            .inspect_err(|_| {
                if made {
                    let _ = fs::remove_dir(dir);
                }
            })
            .with_context(|| format!("could not download CIFAR-10 from {}; {how}", src.url))?;
    }
    load_bin(&bin)
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

fn check_label(path: &Path, index: usize, label: i64) -> Result<()> {
    if !(0..CLASSES).contains(&label) {
        bail!(
            "{}: record {index} has label {label}, outside 0..9",
            path.display()
        );
    }
    Ok(())
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    if !path.exists() {
        bail!(
            "{}: missing (CIFAR-10 has data_batch_1..5 and test_batch)",
            path.display()
        );
    }
    // A batch is 30.7 MB in either layout.
    crate::fsutil::read_regular(path, "a CIFAR-10 batch", 64 << 20)
}

/// One binary batch: records of 1 label byte + 3,072 pixel bytes (R, G, B planes).
pub fn read_bin_batch(path: &Path) -> Result<(Vec<u8>, Vec<i64>)> {
    let bytes = read_file(path)?;
    if bytes.is_empty() || bytes.len() % RECORD != 0 {
        bail!(
            "{}: {} bytes is not a whole number of {RECORD}-byte records (truncated record?)",
            path.display(),
            bytes.len()
        );
    }
    let mut images = Vec::with_capacity(bytes.len() / RECORD * PIXELS);
    let mut labels = Vec::with_capacity(bytes.len() / RECORD);
    for (i, rec) in bytes.chunks_exact(RECORD).enumerate() {
        check_label(path, i, rec[0] as i64)?;
        labels.push(rec[0] as i64);
        images.extend_from_slice(&rec[1..]);
    }
    Ok((images, labels))
}

fn load_bin(dir: &Path) -> Result<Dataset> {
    let train = (1..=5)
        .map(|i| read_bin_batch(&dir.join(format!("data_batch_{i}.bin"))))
        .collect::<Result<Vec<_>>>()?;
    let test = read_bin_batch(&dir.join("test_batch.bin"))?;
    let meta = dir.join("batches.meta.txt");
    let bytes = crate::fsutil::read_regular(&meta, "a class list", 1 << 20)?;
    let text =
        String::from_utf8(bytes).with_context(|| format!("{}: not UTF-8 text", meta.display()))?;
    let classes: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    dataset(collect(train), collect(vec![test]), classes, &meta, dir)
}

const PY_ALLOW: Allowlist = Allowlist {
    globals: NUMPY_GLOBALS,
    dict_like: &[],
};

fn unpickle(path: &Path) -> Result<Value> {
    let bytes = read_file(path)?;
    Unpickler::new(&bytes, &PY_ALLOW)
        .load()
        .with_context(|| format!("{}: not a CIFAR-10 pickle", path.display()))
}

/// One pickled batch: a dict with `data` (uint8 N x 3072) and `labels`.
pub fn read_py_batch(path: &Path) -> Result<(Vec<u8>, Vec<i64>)> {
    let v = unpickle(path)?;
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
    let labels = v.get("labels").ok_or_else(|| bad("no 'labels' entry"))?;
    let labels: Vec<i64> = labels
        .items()
        .ok_or_else(|| bad("'labels' is not a list"))?
        .iter()
        .map(|l| l.as_int())
        .collect::<Option<_>>()
        .ok_or_else(|| bad("'labels' holds something other than integers"))?;
    if labels.len() != n {
        return Err(bad(&format!("{} labels for {n} images", labels.len())));
    }
    for (i, &l) in labels.iter().enumerate() {
        check_label(path, i, l)?;
    }
    Ok((arr.data.to_vec(), labels))
}

fn load_py(dir: &Path) -> Result<Dataset> {
    let train = (1..=5)
        .map(|i| read_py_batch(&dir.join(format!("data_batch_{i}"))))
        .collect::<Result<Vec<_>>>()?;
    let test = read_py_batch(&dir.join("test_batch"))?;
    let meta = dir.join("batches.meta");
    let v = unpickle(&meta)?;
    let names = v
        .get("label_names")
        .and_then(|n| n.items())
        .and_then(|n| n.iter().map(|s| s.as_text()).collect::<Option<Vec<_>>>())
        .ok_or_else(|| {
            anyhow!(
                "{}: unexpected content: no 'label_names' list",
                meta.display()
            )
        })?;
    dataset(collect(train), collect(vec![test]), names, &meta, dir)
}

fn dataset(
    train: Split,
    test: Split,
    classes: Vec<String>,
    meta: &Path,
    dir: &Path,
) -> Result<Dataset> {
    if classes.len() as i64 != CLASSES {
        bail!(
            "{}: lists {} class names, CIFAR-10 has 10",
            meta.display(),
            classes.len()
        );
    }
    Ok(Dataset {
        name: "cifar10".into(),
        train: Images::Resident(train),
        test: Images::Resident(test),
        classes,
        mean: MEAN,
        std: STD,
        source: dir.display().to_string(),
        wnids: None,
        test_names: None,
    })
}

/// Downloads the binary archive into `dir`, verifies it, and extracts only
/// the expected members of `cifar-10-batches-bin/` through a temporary
/// directory, so an interrupted or rejected download leaves nothing behind.
fn fetch_binary(
    dir: &Path,
    src: &DownloadSource,
    progress: &mut dyn FnMut(u64, Option<u64>),
) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let archive = dir.join("cifar-10-binary.tar.gz");
    download(
        &src.url,
        &archive,
        &Checksum::Md5(src.md5.clone()),
        progress,
    )?;
    // A fresh directory of an unguessable name: `create_dir` never follows
    // or reuses what is already there.
    let tmp = crate::fsutil::temp_name(&dir.join(BIN_DIR));
    fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let result = extract(&archive, &tmp).and_then(|()| {
        fs::rename(&tmp, dir.join(BIN_DIR))
            .with_context(|| format!("moving {} into place", tmp.display()))
    });
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
        let _ = fs::remove_file(&archive);
    }
    result
}

fn extract(archive: &Path, into: &Path) -> Result<()> {
    let file = File::open(archive).with_context(|| format!("opening {}", archive.display()))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let mut found: Vec<&str> = Vec::new();
    for entry in tar
        .entries()
        .with_context(|| format!("reading {}", archive.display()))?
    {
        let mut entry = entry.with_context(|| format!("reading {}", archive.display()))?;
        let path: PathBuf = entry.path()?.into_owned();
        // Only `cifar-10-batches-bin/<known name>`, as a regular file: no
        // other paths (and so no traversal) are ever written.
        let name = match (path.parent(), path.file_name()) {
            (Some(p), Some(n)) if p == Path::new(BIN_DIR) => n.to_string_lossy().into_owned(),
            _ => continue,
        };
        let Some(known) = BIN_FILES.iter().find(|f| **f == name) else {
            continue;
        };
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let dest = into.join(known);
        let mut out =
            File::create(&dest).with_context(|| format!("creating {}", dest.display()))?;
        std::io::copy(&mut entry, &mut out)
            .with_context(|| format!("extracting {}", path.display()))?;
        found.push(known);
    }
    let missing: Vec<&&str> = BIN_FILES.iter().filter(|f| !found.contains(f)).collect();
    if !missing.is_empty() {
        bail!(
            "{} lacks {}",
            archive.display(),
            missing
                .iter()
                .map(|m| format!("{BIN_DIR}/{m}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}
