//! `--dataset usps`: the US Postal Service's handwritten digits (Hull,
//! 1994) as torchvision's `USPS` reads them: `usps.bz2` (7,291 training
//! images) and `usps.t.bz2` (2,007 test images) in the data directory,
//! LIBSVM's text compressed by bzip2 (kept so, as torchvision keeps them),
//! one image a line: its label 1 to 10 (the digit plus one) and 256
//! `index:value` pairs, the 16x16 gray image row by row, each value in
//! [-1, 1] and made torchvision's byte, `uint8(float32((v + 1) / 2 * 255))`
//! (truncated). The images become 32x32 RGB as MNIST's do (antialiased
//! bilinear `Resize(32)`, the gray in the three channels), normalized by
//! the training images' own mean and deviation (USPS has no usual one).

use std::path::Path;

use anyhow::{Context, Result, bail};
use bzip2::read::MultiBzDecoder;
use tch::Tensor;

use super::download::{DownloadSource, fetch_kept_files};
use super::mnist::{SIDE, rgb32};
use super::{Dataset, Images, Split, gray_histograms, mean_std};
use crate::fsutil::{read_regular, unpack_capped};

/// The dataset's name on the command line and in a run's files.
pub const NAME: &str = "usps";
/// The two files (train, test), in the order of [`MD5S`].
pub const FILES: [&str; 2] = ["usps.bz2", "usps.t.bz2"];
pub const MD5S: [&str; 2] = [
    "ec16c51db3855ca6c91edd34d0e9b197",
    "8ea070ee2aca1ac39742fdd1ef5ed118",
];
pub const MIRROR: &str = "https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/multiclass/";
/// The images' side as stored.
const STORED: usize = 16;
/// The most bytes a file may unpack to (the training file's text is
/// about 19 MB).
const MAX_TEXT: u64 = 64 << 20;
/// The most bytes a compressed file may have (the training file has
/// 6.3 MB).
const MAX_FILE: u64 = 64 << 20;

/// Loads the dataset from `dir`, first downloading the files that are
/// missing when `download_from` allows it; for evaluation (`test_only`)
/// its test split alone, the training images read for the normalization
/// only.
pub fn load(
    dir: &Path,
    test_only: bool,
    download_from: Option<&DownloadSource>,
    progress: &mut dyn FnMut(u64, Option<u64>),
) -> Result<Dataset> {
    fetch_kept_files(dir, "USPS", (&FILES, &FILES), download_from, progress)?;
    let [train, test] = FILES.map(|f| read_file(&dir.join(f)));
    let ((train_gray, train_labels), test) = (train?, test?);
    let (mean, std) = mean_std(&gray_histograms(&train_gray))
        .with_context(|| format!("{}", dir.join(FILES[0]).display()))?;
    let train = match test_only {
        true => Split::empty(SIDE),
        false => split(&train_gray, &train_labels),
    };
    Ok(Dataset {
        name: NAME.into(),
        train: Images::Resident(train),
        test: Images::Resident(split(&test.0, &test.1)),
        classes: (0..10).map(|d| d.to_string()).collect(),
        mean,
        std,
        source: dir.display().to_string(),
        wnids: None,
        test_names: None,
    })
}

/// Gray 16x16 images and their labels as a split of 32x32 RGB.
fn split(gray: &[u8], labels: &[i64]) -> Split {
    Split {
        images: rgb32(gray, labels.len(), (STORED, STORED), false),
        labels: Tensor::from_slice(labels),
        layout: None,
    }
}

/// One of the files: its images' bytes (16x16 each, in order) and their
/// labels (0 to 9).
pub fn read_file(path: &Path) -> Result<(Vec<u8>, Vec<i64>)> {
    let packed = read_regular(path, "a USPS file", MAX_FILE)?;
    let mut text = Vec::new();
    let name = path.display().to_string();
    let bz = MultiBzDecoder::new(&packed[..]);
    unpack_capped(bz, &mut text, MAX_TEXT, (&name, "bzip2"))?;
    let text = String::from_utf8(text)
        .with_context(|| format!("{}: not LIBSVM's text", path.display()))?;
    parse(&text).with_context(|| format!("{}", path.display()))
}

/// LIBSVM's lines of USPS: `<label 1-10> 1:<v> 2:<v> ... 256:<v>`.
pub fn parse(text: &str) -> Result<(Vec<u8>, Vec<i64>)> {
    let (mut gray, mut labels) = (Vec::new(), Vec::new());
    for (n, line) in text.lines().enumerate() {
        let at = n + 1;
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else {
            bail!("line {at} is blank");
        };
        match first.parse::<i64>() {
            Ok(label @ 1..=10) => labels.push(label - 1),
            _ => bail!("line {at}: label '{first}' is not 1 to 10"),
        }
        let mut values = 0;
        for (k, field) in fields.enumerate() {
            let value = field
                .split_once(':')
                .filter(|(i, _)| i.parse::<usize>() == Ok(k + 1) && k < STORED * STORED)
                .and_then(|(_, v)| v.parse::<f64>().ok())
                .filter(|v| (-1.0..=1.0).contains(v));
            let Some(v) = value else {
                bail!(
                    "line {at}: '{field}' is not '{}:<value from -1 to 1>'",
                    k + 1
                );
            };
            gray.push(byte(v));
            values += 1;
        }
        if values != STORED * STORED {
            bail!("line {at}: {values} values, where an image of USPS has 256");
        }
    }
    if labels.is_empty() {
        bail!("no images");
    }
    Ok((gray, labels))
}

/// torchvision's byte of a value: parsed to float32, `(v + 1) / 2 * 255`
/// in float32, truncated (numpy's `astype(uint8)`).
fn byte(v: f64) -> u8 {
    let v = v as f32;
    ((v + 1.0) / 2.0 * 255.0) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(label: &str, values: &[&str]) -> String {
        let pairs: Vec<String> = (values.iter().enumerate())
            .map(|(i, v)| format!("{}:{v}", i + 1))
            .collect();
        format!("{label} {}", pairs.join(" "))
    }

    #[test]
    fn values_become_torchvisions_bytes_and_labels_digits() {
        let mut values = vec!["-1"; 256];
        values[0] = "1";
        values[1] = "0";
        values[2] = "-0.999999";
        let text = format!("{}\n{}\n", line("10", &values), line("1", &values));
        let (gray, labels) = parse(&text).unwrap();
        assert_eq!(labels, [9, 0]);
        assert_eq!(gray.len(), 512);
        // 0 -> 127.5 truncated; -0.999999 -> 1.3e-4 truncated.
        assert_eq!(gray[..4], [255, 127, 0, 0]);
    }

    #[test]
    fn bad_lines_name_their_line() {
        let values = vec!["0.5"; 256];
        let short = line("3", &values[..255]);
        let cases = [
            (format!("{}\n\n", line("3", &values)), "line 2 is blank"),
            (line("11", &values), "line 1: label '11' is not 1 to 10"),
            (line("3.0", &values), "label '3.0' is not 1 to 10"),
            (short, "line 1: 255 values, where an image of USPS has 256"),
            (line("3", &[&values[..], &["0"]].concat()), "'257:0' is not"),
            (
                line("3", &["1.5"; 256]),
                "'1:1.5' is not '1:<value from -1 to 1>'",
            ),
            (line("3", &["nan"; 256]), "'1:nan' is not"),
            (line("3", &values).replace("2:", "3:"), "'3:0.5' is not '2:"),
            (String::new(), "no images"),
        ];
        for (text, want) in cases {
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.contains(want), "{e} lacks {want}");
        }
    }
}
