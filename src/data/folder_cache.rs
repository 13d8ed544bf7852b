//! The on-disk cache of image folders held in memory: a folder's decoded
//! canvases, labels, layout rows and which of its files they hold, in one
//! safetensors file per file list and side, outside the data (by default
//! `$XDG_CACHE_HOME/vggctl/folders`). A cache is trusted while its key
//! holds (absolute paths, sizes, modification times, side) and its tensors
//! could be the folder's; anything else is rebuilt, never an error.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use sha2::{Digest, Sha256};
use tch::{Kind, Tensor};

use super::Split;
use super::augment::{LAYOUT, canvas_width};
use super::resize::Filter;
use crate::choice::Choice;
use crate::formats::safetensors::{read_safetensors, write_safetensors};

/// The cache a folder's images are kept in by default: under the user's
/// cache directory (`$XDG_CACHE_HOME/vggctl/folders`), not in the data.
pub fn default_cache_dir() -> Option<PathBuf> {
    Some(
        crate::fsutil::user_cache_dir()?
            .join("vggctl")
            .join("folders"),
    )
}

pub(super) fn key(files: &[(PathBuf, i64)], side: i64, filter: Filter) -> String {
    let mut h = Sha256::new();
    // v5: absolute paths, as one cache directory serves every folder (v4:
    // whole images in canvases; v3: centre squares; v2's 4:3 squares were
    // a column off). Images resized bicubically are cached apart; the
    // bilinear ones keep the key they had.
    let filter = match filter {
        Filter::Bilinear => String::new(),
        other => format!(" {}", other.name()),
    };
    h.update(format!("vggctl-folder-v5 {side}{filter}\n"));
    for (p, label) in files {
        let p = fs::canonicalize(p).unwrap_or_else(|_| p.clone());
        let meta = fs::metadata(&p).ok();
        let size = meta.as_ref().map(|m| m.len()).unwrap_or(0);
        let mtime = meta
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        h.update(format!("{} {label} {size} {mtime}\n", p.display()));
    }
    h.finalize()
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether a cache's tensors can be what `folder::load_dir` built for `files`:
/// uint8 canvases of the side's shape, one label (of the files' labels),
/// one layout row inside the canvas and one file (increasing indices of
/// `files`) per image.
fn cache_fits(cached: &Cached, files: &[(PathBuf, i64)], side: i64) -> bool {
    let Cached {
        images,
        labels,
        layout,
        kept,
    } = cached;
    let width = canvas_width(side);
    let n = labels.numel() as i64;
    let increasing = kept.windows(2).all(|w| w[0] < w[1]);
    let classes = files.iter().map(|(_, l)| l + 1).max().unwrap_or(0);
    let in_range = |t: &Tensor, lo: i64, hi: i64| {
        t.numel() == 0 || (t.min().int64_value(&[]) >= lo && t.max().int64_value(&[]) <= hi)
    };
    if !(1..=files.len() as i64).contains(&n)
        || images.kind() != Kind::Uint8
        || images.size() != [n, 3, side, width]
        || labels.kind() != Kind::Int64
        || labels.size() != [n]
        || layout.kind() != Kind::Int64
        || layout.size() != [n, LAYOUT]
        || kept.len() as i64 != n
        || !increasing
        || kept.last().is_some_and(|&k| k >= files.len())
    {
        return false;
    }
    let (first, visible, transposed, long) = (
        layout.select(1, 0),
        layout.select(1, 1),
        layout.select(1, 2),
        layout.select(1, 3),
    );
    // An image that fits its canvas is visible whole; a longer one was cut.
    let whole = long.le(width);
    let cut_wrong = whole.logical_and(&visible.ne_tensor(&long));
    in_range(labels, 0, classes - 1)
        && in_range(&first, 0, width - 1)
        && in_range(&visible, 1, width)
        && in_range(&(&first + &visible), 1, width)
        && in_range(&transposed, 0, 1)
        && in_range(&(&long - &visible), 0, i64::MAX)
        && cut_wrong.any().int64_value(&[]) == 0
}

/// A cache's tensors, and which of its folder's files they hold.
struct Cached {
    images: Tensor,
    labels: Tensor,
    layout: Tensor,
    kept: Vec<usize>,
}

/// The cached split for `files`, with the indices of the files it holds,
/// if `cache` describes them. A cache that does not (damaged, or edited) is
/// rebuilt: labels, shapes, layout rows and files are checked before use.
pub(super) fn read(
    cache: &Path,
    files: &[(PathBuf, i64)],
    side: i64,
) -> Option<(Split, Vec<usize>)> {
    let sd = read_safetensors(cache).ok()?;
    let labels = sd.tensors.get("labels")?;
    // Caches written before "kept" hold every file or do not say which.
    let kept = match sd.tensors.get("kept") {
        Some(k) if k.kind() == Kind::Int64 && k.dim() == 1 => Vec::<i64>::try_from(k).ok()?,
        Some(_) => return None,
        None if labels.numel() == files.len() => (0..files.len() as i64).collect(),
        None => return None,
    };
    let cached = Cached {
        images: sd.tensors.get("images")?.shallow_clone(),
        labels: labels.shallow_clone(),
        layout: sd.tensors.get("layout")?.shallow_clone(),
        kept: kept
            .iter()
            .map(|&k| usize::try_from(k))
            .collect::<Result<_, _>>()
            .ok()?,
    };
    if !cache_fits(&cached, files, side) {
        return None;
    }
    let split = Split {
        images: cached.images,
        labels: cached.labels,
        layout: Some(cached.layout),
    };
    Some((split, cached.kept))
}

/// Keeps `split` (of the files at `kept`) in `cache` for the next run. The
/// cache is an optimization: failing to write it is not an error.
pub(super) fn write(cache: &Path, split: &Split, kept: &[usize]) {
    if cache
        .parent()
        .is_none_or(|d| fs::create_dir_all(d).is_err())
    {
        return;
    }
    let kept: Vec<i64> = kept.iter().map(|&k| k as i64).collect();
    let mut tensors = vec![
        ("images".to_string(), split.images.shallow_clone()),
        ("labels".to_string(), split.labels.shallow_clone()),
        ("kept".to_string(), Tensor::from_slice(&kept)),
    ];
    if let Some(layout) = &split.layout {
        tensors.push(("layout".to_string(), layout.shallow_clone()));
    }
    let _ = write_safetensors(cache, &tensors, &HashMap::new());
}
