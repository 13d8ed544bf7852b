//! `--dataset digits`: scikit-learn's 1,797 real 8x8 handwritten digits
//! (from the UCI "Optical Recognition of Handwritten Digits" data; 17 gray
//! levels 0..16, 10 classes), embedded in the binary so that a machine
//! without a network trains a real dataset on its first run. `digits.bin`
//! (written once by `scripts/make-digits`, checked against scikit-learn by
//! `tests/test_digits.py`) holds them in split order: 297 test examples,
//! then 1,500 training examples (numpy's `RandomState(0).permutation`). The
//! model sees them as 32x32 RGB like CIFAR-10 (and through the same
//! crop/normalize pipeline, with the digits' own mean and std; not
//! mirrored, see `data::default_hflip`).

use std::io::Read;

use anyhow::{Context, Result, bail};
use flate2::read::ZlibDecoder;
use tch::{Kind, Tensor};

use super::{Dataset, Images, Split};

const DATA: &[u8] = include_bytes!("digits.bin");
const MAGIC: &[u8] = b"vggctl-digits 1\n";
/// Examples in the test split (the first ones of `digits.bin`).
pub const TEST: usize = 297;
/// Side of the images the model sees.
pub const SIDE: i64 = 32;
/// Per-channel mean and std of the training images (32x32, [0, 1]); the
/// three channels are equal.
pub const MEAN: [f64; 3] = [0.3054, 0.3054, 0.3054];
pub const STD: [f64; 3] = [0.3237, 0.3237, 0.3237];

/// One embedded example.
pub struct Digit {
    /// Its index in `sklearn.datasets.load_digits()`.
    pub index: u16,
    pub label: u8,
    /// 8x8, row-major, 0..16.
    pub pixels: [u8; 64],
}

/// The embedded examples in split order (the test examples first).
pub fn examples() -> Result<Vec<Digit>> {
    let mut raw = Vec::new();
    ZlibDecoder::new(DATA)
        .read_to_end(&mut raw)
        .context("the embedded digits are damaged")?;
    let Some(rest) = raw.strip_prefix(MAGIC) else {
        bail!("the embedded digits have an unknown format");
    };
    let (count, test) = match rest {
        [a, b, c, d, ..] => (
            u16::from_le_bytes([*a, *b]) as usize,
            u16::from_le_bytes([*c, *d]) as usize,
        ),
        _ => bail!("the embedded digits are truncated"),
    };
    let records = &rest[4..];
    if test != TEST || records.len() != count * 67 {
        bail!(
            "the embedded digits hold {count} examples in {} bytes",
            records.len()
        );
    }
    Ok(records
        .chunks_exact(67)
        .map(|r| Digit {
            index: u16::from_le_bytes([r[0], r[1]]),
            label: r[2],
            pixels: r[3..].try_into().expect("64 pixels"),
        })
        .collect())
}

/// The 32x32 uint8 RGB images of `digits`: 0..16 scaled to 0..255, resized
/// bilinearly (align_corners false), rounded half to even: what
/// `tests/make_datasets.py` writes as CIFAR-10 with torch, bit for bit.
fn images(digits: &[Digit]) -> Tensor {
    let n = digits.len() as i64;
    let pixels: Vec<u8> = digits.iter().flat_map(|d| d.pixels).collect();
    (Tensor::from_slice(&pixels)
        .view([n, 1, 8, 8])
        .to_kind(Kind::Float)
        * (255.0 / 16.0))
        .upsample_bilinear2d([SIDE, SIDE], false, None, None)
        .round()
        .clamp(0.0, 255.0)
        .to_kind(Kind::Uint8)
        .repeat([1, 3, 1, 1])
}

fn split(digits: &[Digit]) -> Split {
    let labels: Vec<i64> = digits.iter().map(|d| d.label as i64).collect();
    Split {
        images: images(digits),
        labels: Tensor::from_slice(&labels),
        layout: None,
    }
}

/// The dataset: 1,500 training and 297 test images, classes "0".."9".
pub fn load() -> Result<Dataset> {
    let all = examples()?;
    let (test, train) = all.split_at(TEST);
    Ok(Dataset {
        name: "digits".into(),
        train: Images::Resident(split(train)),
        test: Images::Resident(split(test)),
        classes: (0..10).map(|c| c.to_string()).collect(),
        mean: MEAN,
        std: STD,
        source: "the embedded digits".into(),
        wnids: None,
        test_names: Some(
            test.iter()
                .map(|d| format!("load_digits()[{}]", d.index))
                .collect(),
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 1,500 + 297 examples with every class in both splits, each sklearn
    /// index once, and the mean/std constants those of the training images.
    #[test]
    fn the_embedded_digits_load_whole_with_their_statistics() {
        let all = examples().unwrap();
        let mut seen: Vec<u16> = all.iter().map(|d| d.index).collect();
        seen.sort();
        assert_eq!(seen, (0..1797).collect::<Vec<u16>>());
        let d = load().unwrap();
        let (train, test) = (
            d.train.as_resident().unwrap(),
            d.test.as_resident().unwrap(),
        );
        assert_eq!((train.len(), test.len()), (1500, 297));
        assert_eq!(train.images.size(), [1500, 3, 32, 32]);
        for split in [train, test] {
            let counts = split.labels.bincount::<Tensor>(None, 10);
            assert!(
                Vec::<i64>::try_from(&counts)
                    .unwrap()
                    .iter()
                    .all(|&c| c > 0)
            );
        }
        let x = train.images.to_kind(Kind::Double) / 255.0;
        let (mean, std) = (x.mean(Kind::Double), x.std(false));
        assert!((mean.double_value(&[]) - MEAN[0]).abs() < 1e-4);
        assert!((std.double_value(&[]) - STD[0]).abs() < 1e-4);
        assert_eq!(train.images.device(), tch::Device::Cpu);
    }
}
