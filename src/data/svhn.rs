//! `--dataset svhn`: the Street View House Numbers' cropped digits
//! (Netzer et al., 2011) as torchvision's `SVHN` reads them: the MAT-files
//! `train_32x32.mat` and `test_32x32.mat` in the data directory, `X` the
//! 32x32x3xN uint8 images (column-major) and `y` the labels 1..10, the
//! digit 0 being labelled 10 (torchvision's label 0). With `--extra` its
//! `extra_32x32.mat` (531,131 images more) is trained on too, after
//! `train`'s images, as `ConcatDataset([SVHN("train"), SVHN("extra")])`.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use anyhow::{Context, Result, bail};
use tch::Tensor;

use super::download::{DownloadSource, fetch_kept_files};
use super::{Dataset, Images, Split};
use crate::formats::mat::{MatArray, Values, read_mat};

/// The three files (train, test, extra), in the order of [`MD5S`].
pub const FILES: [&str; 3] = ["train_32x32.mat", "test_32x32.mat", "extra_32x32.mat"];
pub const MD5S: [&str; 3] = [
    "e26dedcc434d2e4c54c9b2d4a06d8373",
    "eb5a983be6a315427106f1b164d9cef3",
    "a93ce644f1a588dc4d68dda5feec44a7",
];
pub const MIRROR: &str = "http://ufldl.stanford.edu/housenumbers/";
/// The usual normalization (of the training images).
pub const MEAN: [f64; 3] = [0.4377, 0.4438, 0.4728];
pub const STD: [f64; 3] = [0.1980, 0.2010, 0.1970];
/// The most bytes one array may unpack to: the training images are 225 MB,
/// the extra split's 1.63 GB (531,131 x 3,072).
const MAX_BYTES: u64 = 256 << 20;
const EXTRA_MAX_BYTES: u64 = 1664 << 20;
const SIDE: usize = 32;

/// Loads the dataset from `dir`, its training split with the extra split
/// after it where `extra` asks (for evaluation, `test_only`, its test split
/// alone), first downloading the files that are missing when
/// `download_from` allows it.
pub fn load(
    dir: &Path,
    (test_only, extra): (bool, bool),
    download_from: Option<&DownloadSource>,
    progress: &mut dyn FnMut(u64, Option<u64>),
) -> Result<Dataset> {
    let needed = match (test_only, extra) {
        (true, _) => &FILES[1..2],
        (false, false) => &FILES[..2],
        (false, true) => &FILES[..],
    };
    fetch_kept_files(dir, "SVHN", (&FILES, needed), download_from, progress)?;
    let [train, test, more] = FILES.map(|f| dir.join(f));
    let mut train = match test_only {
        true => Split::empty(SIDE as i64),
        false => read_split(&train)?,
    };
    if extra && !test_only {
        let more = read_mat_split(&more, EXTRA_MAX_BYTES)?;
        train = Split {
            images: Tensor::cat(&[train.images, more.images], 0),
            labels: Tensor::cat(&[train.labels, more.labels], 0),
            layout: None,
        };
    }
    Ok(Dataset {
        name: "svhn".into(),
        train: Images::Resident(train),
        test: Images::Resident(read_split(&test)?),
        classes: (0..10).map(|c| c.to_string()).collect(),
        mean: MEAN,
        std: STD,
        source: dir.display().to_string(),
        wnids: None,
        test_names: None,
    })
}

/// The training or test split's file: its images as `N x 3 x 32 x 32` and
/// labels 0..9.
pub fn read_split(path: &Path) -> Result<Split> {
    read_mat_split(path, MAX_BYTES)
}

/// One split's file, each array at most `max` bytes unpacked.
fn read_mat_split(path: &Path, max: u64) -> Result<Split> {
    // Checked before opening: a FIFO would block the open.
    let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    if !meta.is_file() {
        bail!("{}: not a regular file", path.display());
    }
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut vars = read_mat(&mut BufReader::new(file), &["X", "y"], max)
        .with_context(|| format!("{}: not an SVHN MAT-file", path.display()))?;
    let mut take = |name: &str| {
        let at = vars.iter().position(|(n, _)| n == name).with_context(|| {
            format!(
                "{}: no '{name}' array (SVHN's files hold X and y)",
                path.display()
            )
        })?;
        Ok::<_, anyhow::Error>(vars.swap_remove(at).1)
    };
    let (x, y) = (take("X")?, take("y")?);
    let images = images(x).with_context(|| format!("{}: 'X'", path.display()))?;
    let labels = labels(&y, images.size()[0] as usize)
        .with_context(|| format!("{}: 'y'", path.display()))?;
    Ok(Split {
        images,
        labels: Tensor::from_slice(&labels),
        layout: None,
    })
}

/// `X` (32x32x3xN, column-major: row fastest) as `N x 3 x 32 x 32`, as
/// torchvision's `np.transpose(X, (3, 2, 0, 1))`: each plane transposed.
/// The file's bytes are let go before the transposed copy is made.
fn images(x: MatArray) -> Result<Tensor> {
    match x.dims[..] {
        [SIDE, SIDE, 3, _] | [SIDE, SIDE, 3] => {}
        _ => bail!("dimensions {:?}, expected 32 x 32 x 3 x N", x.dims),
    }
    let Values::Bytes(raw) = x.values else {
        bail!("not stored as uint8");
    };
    let (n, side) = ((raw.len() / (3 * SIDE * SIDE)) as i64, SIDE as i64);
    let stored = Tensor::from_slice(&raw).view([n, 3, side, side]);
    drop(raw);
    Ok(stored.transpose(2, 3).contiguous())
}

/// `y` (N x 1 or 1 x N) as labels 0..9: 10 is the digit 0.
fn labels(y: &MatArray, n: usize) -> Result<Vec<i64>> {
    if y.len() != n || y.dims.iter().filter(|&&d| d != 1).count() > 1 {
        bail!("dimensions {:?} for {n} images", y.dims);
    }
    let values: Vec<f64> = match &y.values {
        Values::Bytes(b) => b.iter().map(|&v| v as f64).collect(),
        Values::Numbers(v) => v.clone(),
    };
    values
        .iter()
        .enumerate()
        .map(|(i, &v)| match v {
            10.0 => Ok(0),
            v if v.fract() == 0.0 && (0.0..10.0).contains(&v) => Ok(v as i64),
            v => bail!("label {i} is {v}, not one of 0..10"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Column-major planes become row-major; 10 is the label 0.
    #[test]
    fn planes_are_transposed_and_ten_is_zero() {
        let raw: Vec<u8> = (0..2 * 3 * 1024).map(|i| (i % 251) as u8).collect();
        let x = MatArray {
            dims: vec![32, 32, 3, 2],
            values: Values::Bytes(raw.clone()),
        };
        let out = images(x).unwrap();
        assert_eq!(out.size(), [2, 3, 32, 32]);
        // Image 1, channel 2, row 5, column 7.
        let want = raw[3072 + 2048 + 7 * 32 + 5] as i64;
        assert_eq!(out.int64_value(&[1, 2, 5, 7]), want);
        let y = MatArray {
            dims: vec![3, 1],
            values: Values::Numbers(vec![10.0, 1.0, 9.0]),
        };
        assert_eq!(labels(&y, 3).unwrap(), [0, 1, 9]);
        let bad = MatArray {
            dims: vec![1, 1],
            values: Values::Numbers(vec![11.0]),
        };
        assert!(
            labels(&bad, 1)
                .unwrap_err()
                .to_string()
                .contains("label 0 is 11")
        );
        assert!(labels(&y, 2).is_err());
    }
}
