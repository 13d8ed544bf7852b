//! Prepared datasets (`vggctl prepare`, written by `pack`): a folder's
//! images in one file, so that a run reads one file's pages instead of a
//! million small files. Each image is kept as its file's own bytes when its shorter side
//! is at most `max_side` (then it decodes to exactly the folder's pixels,
//! so the same seed gives the same batches), else resized so that side is
//! `max_side` (torchvision's antialiased `Resize`) and stored again (JPEG
//! as JPEG of the given quality, other formats as PNG); or, with `--raw`, every image
//! as its decoded RGB bytes (nothing to decode when read, about ten times
//! the size).
//!
//! Layout: `VGGCTL-PREPARED1`, the images' bytes one after another, the
//! index (JSON: classes, splits, and per image its name, label, offset,
//! length and CRC-32), then the index's offset, length and CRC-32 (u64,
//! u64, u32, little-endian) and `VGGCTLPX`. Every image's checksum is
//! checked when it is read; a damaged file is an error, not skipped data.
//! Images are read with positioned reads, not a memory mapping: a file cut
//! while a run maps it would kill the run (SIGBUS) where a read returns an
//! error that names it.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use super::image::{MAX_IMAGE_PIXELS, decode_rows};

pub const MAGIC: &[u8; 16] = b"VGGCTL-PREPARED1";
pub const END: &[u8; 8] = b"VGGCTLPX";
const TRAILER: usize = 8 + 8 + 4 + 8;
/// The most bytes one stored image may have (as an image file).
pub const MAX_IMAGE_BYTES: u64 = 1 << 30;

/// Where one image's bytes lie in the file.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Entry {
    /// The image's path in the folder, relative to it (for messages).
    pub name: String,
    pub label: i64,
    pub offset: u64,
    pub len: u64,
    pub crc: u32,
    /// Stored as decoded RGB bytes (`prepare --raw`) of this height and
    /// width; None: an image file's bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw: Option<[u32; 2]>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Index {
    /// The class folders' names, sorted (WordNet ids for ImageNet).
    pub classes: Vec<String>,
    pub max_side: i64,
    /// `train`, and `val` when the folder had a validation folder.
    pub train: Vec<Entry>,
    pub val: Option<Vec<Entry>>,
    /// The partition packed (DTD's; None for other data).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<usize>,
    /// How many of `train`'s last images are the dataset's own val split
    /// (Oxford 102 Flowers', DTD's; None for other data).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub own_val: Option<usize>,
}

/// An opened prepared dataset: the open file and its index.
pub struct Prepared {
    pub path: PathBuf,
    file: File,
    pub index: Index,
}

/// Whether `path` is a prepared dataset (a file that starts with the magic).
pub fn is_prepared(path: &Path) -> bool {
    let mut head = [0u8; 16];
    path.is_file()
        && File::open(path)
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head))
            .is_ok()
        && &head == MAGIC
}

impl Prepared {
    pub fn open(path: &Path) -> Result<Arc<Prepared>> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let damaged = |what: &str| anyhow!("{}: damaged prepared dataset: {what}", path.display());
        let n = file
            .metadata()
            .with_context(|| format!("reading {}", path.display()))?
            .len();
        let read = |at: u64, len: usize| -> Result<Vec<u8>> {
            let mut buf = vec![0u8; len];
            file.read_exact_at(&mut buf, at)
                .with_context(|| format!("reading {}", path.display()))?;
            Ok(buf)
        };
        let ends =
            n >= (MAGIC.len() + TRAILER) as u64 && read(0, 16)? == MAGIC && read(n - 8, 8)? == END;
        if !ends {
            return Err(damaged("its start or end marker is missing (cut short?)"));
        }
        let t = read(n - TRAILER as u64, TRAILER)?;
        let word = |at: usize| u64::from_le_bytes(t[at..at + 8].try_into().expect("8 bytes"));
        let (offset, len) = (word(0), word(8));
        let crc = u32::from_le_bytes(t[16..20].try_into().expect("4 bytes"));
        let data_end = n - TRAILER as u64;
        if offset < 16 || offset.checked_add(len).is_none_or(|e| e > data_end) {
            return Err(damaged("its index lies outside the file"));
        }
        let bytes = read(offset, len as usize)?;
        if crc32fast::hash(&bytes) != crc {
            return Err(damaged("its index fails its checksum"));
        }
        let index: Index =
            serde_json::from_slice(&bytes).map_err(|e| damaged(&format!("its index: {e}")))?;
        let classes = index.classes.len() as i64;
        for e in index.train.iter().chain(index.val.iter().flatten()) {
            let inside = e.offset >= 16 && e.offset.saturating_add(e.len) <= offset;
            let raw_fits = e.raw.is_none_or(|[h, w]| {
                let pixels = h as u64 * w as u64;
                pixels > 0 && pixels <= MAX_IMAGE_PIXELS && pixels * 3 == e.len
            });
            if !inside || !raw_fits || !(0..classes).contains(&e.label) || e.len > MAX_IMAGE_BYTES {
                return Err(damaged(&format!(
                    "entry {} lies outside its data or has no class",
                    e.name
                )));
            }
        }
        Ok(Arc::new(Prepared {
            path: path.to_path_buf(),
            file,
            index,
        }))
    }

    /// The image of entry `e` from its checked bytes: decoded (calling
    /// `header(height, width)` first, which gives a value and the rows
    /// needed, as for `decode_rows`), or as stored when raw. `name` names
    /// it in messages.
    pub fn image<T>(
        &self,
        e: &Entry,
        bytes: Vec<u8>,
        name: &Path,
        header: impl FnOnce(i64, i64) -> (T, usize),
    ) -> Result<(image::RgbImage, T)> {
        match e.raw {
            Some([h, w]) => {
                let (told, _) = header(h as i64, w as i64);
                let img = image::RgbImage::from_raw(w, h, bytes).with_context(|| {
                    format!("{}: a raw image of the wrong size", name.display())
                })?;
                Ok((img, told))
            }
            None => decode_rows(&bytes, name, header),
        }
    }

    /// An image's bytes, checked against its checksum.
    pub fn bytes(&self, e: &Entry) -> Result<Vec<u8>> {
        let mut bytes = vec![0u8; e.len as usize];
        self.file
            .read_exact_at(&mut bytes, e.offset)
            .with_context(|| format!("reading {} from {}", e.name, self.path.display()))?;
        if crc32fast::hash(&bytes) != e.crc {
            bail!(
                "{}: damaged prepared dataset: image {} fails its checksum",
                self.path.display(),
                e.name
            );
        }
        Ok(bytes)
    }
}
