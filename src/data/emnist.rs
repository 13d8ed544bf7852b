//! EMNIST (Cohen et al., 2017): NIST's handwritten digits and letters in
//! MNIST's format, read by split as torchvision's `EMNIST(root, split)`
//! reads it: `DIR/EMNIST/raw/emnist-<split>-{train,test}-{images-idx3,
//! labels-idx1}-ubyte`, with torchvision's classes for each split
//! (`letters`: "N/A" then a to z, labels 1 to 26, as torchvision numbers
//! them). Its images are stored transposed (column by column); vggctl turns
//! them upright, as EMNIST's authors show them, so that `predict` reads a
//! photographed character as training saw one (torchvision's `EMNIST`
//! leaves them as stored, and its users transpose them in a transform).
//!
//! Every split comes in one zip, `gzip.zip`, of every split's `.gz` files
//! (`gzip/<file>.gz`). It is downloaded into `EMNIST/raw/` and kept there
//! as torchvision keeps it; the split read is extracted beside it,
//! unpacked, as torchvision's download leaves its files (torchvision
//! extracts every split; vggctl the ones it reads).

use std::fs::File;
use std::io;
use std::path::Path;

use anyhow::{Context, Result};
use flate2::read::GzDecoder;

use super::download::{DownloadSource, fetch_files};
use crate::fsutil::{TempFile, unpack_capped};

/// The archive of every split, as published and as torchvision keeps it.
pub const ZIP: &str = "gzip.zip";
/// Where torchvision downloads it from, and its MD5.
pub const MIRROR: &str = "https://biometrics.nist.gov/cs_links/EMNIST/";
pub const MD5: &str = "58c8d27c78d21e728a6bc7b3cc06412e";
/// The largest split: byclass's (and bymerge's) 697,932 training images,
/// 547 MB unpacked.
pub const MAX_IMAGES: usize = 700_000;
pub const MAX_BYTES: u64 = 600 << 20;

pub const DIGITS: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];

/// torchvision's `sorted(set(string.digits + string.ascii_letters))`.
pub const BYCLASS: [&str; 62] = [
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "A", "B", "C", "D", "E", "F", "G", "H", "I",
    "J", "K", "L", "M", "N", "O", "P", "Q", "R", "S", "T", "U", "V", "W", "X", "Y", "Z", "a", "b",
    "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m", "n", "o", "p", "q", "r", "s", "t", "u",
    "v", "w", "x", "y", "z",
];

/// The same without the lowercase letters merged into their capitals
/// (c i j k l m o p s u v w x y z), bymerge's and balanced's 47.
pub const BYMERGE: [&str; 47] = [
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "A", "B", "C", "D", "E", "F", "G", "H", "I",
    "J", "K", "L", "M", "N", "O", "P", "Q", "R", "S", "T", "U", "V", "W", "X", "Y", "Z", "a", "b",
    "d", "e", "f", "g", "h", "n", "q", "r", "t",
];

/// torchvision's `["N/A"] + list(string.ascii_lowercase)`: no image is
/// labelled 0.
pub const LETTERS: [&str; 27] = [
    "N/A", "a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m", "n", "o", "p", "q",
    "r", "s", "t", "u", "v", "w", "x", "y", "z",
];

/// A split's four files, in [`super::mnist::FILES`]' order.
pub fn files(split: &str) -> [String; 4] {
    [
        "train-images-idx3",
        "train-labels-idx1",
        "test-images-idx3",
        "test-labels-idx1",
    ]
    .map(|f| format!("emnist-{split}-{f}-ubyte"))
}

/// The `missing` files of a split extracted into `raw` from its
/// `gzip.zip`, which is first downloaded from `src` where it is not there
/// (without `src`, it must be).
pub fn fetch(
    raw: &Path,
    missing: &[&str],
    src: Option<&DownloadSource>,
    progress: &mut dyn FnMut(u64, Option<u64>),
) -> Result<()> {
    let zip = raw.join(ZIP);
    if let (false, Some(src)) = (zip.exists(), src) {
        fetch_files(raw, (&[ZIP], &[ZIP]), src, progress, &mut |_| Ok(()))?;
    }
    let file = File::open(&zip).with_context(|| format!("opening {}", zip.display()))?;
    let mut archive = zip::ZipArchive::new(io::BufReader::new(file))
        .with_context(|| format!("{}: not a zip archive, or a damaged one", zip.display()))?;
    for name in missing {
        let member = format!("gzip/{name}.gz");
        let entry = archive.by_name(&member).with_context(|| {
            format!(
                "{}: no {member} in it (EMNIST's gzip.zip holds every split's files)",
                zip.display()
            )
        })?;
        let target = raw.join(name);
        let mut out = TempFile::beside(&target)?;
        let name = format!("{}: {member}", zip.display());
        unpack_capped(
            GzDecoder::new(entry),
            out.file(),
            MAX_BYTES,
            (&name, "gzip"),
        )?;
        out.commit(&target)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lists are torchvision's rule: digits, capitals, then small
    /// letters, in byte order; bymerge leaves out the merged fifteen.
    #[test]
    fn classes_follow_torchvisions_rule() {
        let all: Vec<String> = ('0'..='9')
            .chain('A'..='Z')
            .chain('a'..='z')
            .map(String::from)
            .collect();
        assert_eq!(BYCLASS.to_vec(), all);
        let merged = "cijklmopsuvwxyz";
        let kept: Vec<&String> = (all.iter())
            .filter(|c| !(c.len() == 1 && merged.contains(c.as_str())))
            .collect();
        assert_eq!(BYMERGE.iter().collect::<Vec<_>>(), kept);
        assert_eq!(LETTERS[1..].concat(), ('a'..='z').collect::<String>());
        assert_eq!(files("letters")[2], "emnist-letters-test-images-idx3-ubyte");
    }
}
