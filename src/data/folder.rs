//! Image-folder datasets (`DIR/<class>/**/<image>`, read as torchvision's
//! `ImageFolder` reads them: the same files, classes and order): each image is decoded once, in parallel on all cores,
//! resized so its shorter side is the cache size and kept whole as uint8 in
//! a 3:2 canvas (`augment::canvas_width`); the result is cached on disk
//! (keyed by the file list, sizes, modification times and the cache size)
//! for the next run. Folders whose canvases would not fit `cache_mem` are
//! streamed from their files instead (`stream`).

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use anyhow::{Context, Result, bail};
use rayon::prelude::*;
use sha2::{Digest, Sha256};
use tch::{Kind, Tensor};

use super::augment::{canvas_width, pack_canvas};
use super::image::{resized_window, shorter_size};
use super::resize::Resize;
use super::stream::{Item, Streamed};
use super::{Dataset, Images, Split};
use crate::formats::safetensors::{read_safetensors, write_safetensors};

pub struct FolderOptions {
    pub dir: PathBuf,
    pub val_dir: Option<PathBuf>,
    /// Fraction held out for validation when there is no `val_dir`.
    pub val_split: f64,
    pub seed: u64,
    /// Shorter side of the cached images (256 for a 224 input).
    pub cache_size: i64,
    /// Where decoded images are cached between runs (None: not at all).
    pub cache_dir: Option<PathBuf>,
    /// Fail on the first unreadable image instead of skipping it.
    pub strict: bool,
    /// The memory the decoded images may take (`--cache-mem`); a folder
    /// whose canvases need more is streamed.
    pub cache_mem: u64,
    /// Streaming's decoding threads.
    pub workers: usize,
    /// ImageNet's layout: the class folders are WordNet ids, named by
    /// torchvision's class names.
    pub imagenet: bool,
    /// Evaluation only: with a `val_dir`, that folder alone is read (every
    /// image of it a test image; `dir` is not needed).
    pub test_only: bool,
}

/// The memory the canvases of `n` images of `side` take.
pub fn canvas_bytes(n: usize, side: i64) -> u64 {
    n as u64 * 3 * side as u64 * canvas_width(side) as u64
}

/// Image files with their class index.
pub type LabeledFiles = Vec<(PathBuf, i64)>;

/// The file extensions torchvision's `ImageFolder` takes (its
/// `IMG_EXTENSIONS`), compared without regard to case.
pub const EXTENSIONS: [&str; 9] = [
    "jpg", "jpeg", "png", "ppm", "bmp", "pgm", "tif", "tiff", "webp",
];

/// [`EXTENSIONS`] for messages: `.jpg, .jpeg, ...`.
pub fn extension_list() -> String {
    EXTENSIONS.map(|e| format!(".{e}")).join(", ")
}

/// Class names (sorted subfolders, those whose names start with a dot
/// left out) and every image file with its class, in `ImageFolder`'s
/// order. A class folder without images is an error naming it, as it is
/// for torchvision.
pub fn scan(dir: &Path) -> Result<(Vec<String>, LabeledFiles)> {
    let entries = fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    let mut classes = Vec::new();
    for e in entries.flatten().filter(|e| e.path().is_dir()) {
        let Some(name) = e.file_name().to_str().map(str::to_string) else {
            bail!(
                "{}: a class folder's name is not UTF-8 (class names go into the checkpoint as text): rename it",
                e.path().display()
            );
        };
        if !name.starts_with('.') {
            classes.push(name);
        }
    }
    classes.sort();
    if classes.is_empty() {
        bail!(
            "{}: no class folders (expected {}/<class>/<image>.jpg)",
            dir.display(),
            dir.display()
        );
    }
    let mut files = Vec::new();
    let mut empty = Vec::new();
    for (label, class) in classes.iter().enumerate() {
        let imgs = image_files(&dir.join(class))?;
        if imgs.is_empty() {
            empty.push(class.as_str());
        }
        files.extend(imgs.into_iter().map(|p| (p, label as i64)));
    }
    if files.is_empty() {
        bail!(
            "{}: no images in its class folders (images are {})",
            dir.display(),
            extension_list()
        );
    }
    if !empty.is_empty() {
        bail!(
            "{}: no images in class folder(s) {}: every class needs one (images are {})",
            dir.display(),
            empty.join(", "),
            extension_list()
        );
    }
    Ok((classes, files))
}

/// The image files under `dir` (by [`EXTENSIONS`]) in `ImageFolder`'s
/// order: its folders (itself and every subfolder, links followed) sorted
/// by path as strings, each one's files sorted by name. Folders whose
/// names start with a dot are left out, and a folder reached again
/// through a link (a loop, or two links to one place) is read once. A
/// file that is not a regular file (a broken link, a FIFO) is listed, so
/// that reading it reports it.
pub fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::MetadataExt;
    let reading = |d: &Path| format!("reading {}", d.display());
    let mut seen = std::collections::HashSet::new();
    let mut folders = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let meta = fs::metadata(&d).with_context(|| reading(&d))?;
        if !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        let mut files = Vec::new();
        for entry in fs::read_dir(&d).with_context(|| reading(&d))? {
            let path = entry.with_context(|| reading(&d))?.path();
            let name = path.file_name().unwrap_or_default().as_bytes();
            if path.is_dir() {
                if !name.starts_with(b".") {
                    todo.push(path);
                }
            } else if is_image_name(name) {
                files.push(path);
            }
        }
        files.sort();
        folders.push((d, files));
    }
    folders.sort_by(|a, b| a.0.as_os_str().as_bytes().cmp(b.0.as_os_str().as_bytes()));
    Ok(folders.into_iter().flat_map(|(_, files)| files).collect())
}

/// Whether a file name ends in one of [`EXTENSIONS`] (any case).
fn is_image_name(name: &[u8]) -> bool {
    let name = name.to_ascii_lowercase();
    EXTENSIONS.iter().any(|e| {
        name.len() > e.len()
            && name.ends_with(e.as_bytes())
            && name[name.len() - e.len() - 1] == b'.'
    })
}

/// Decodes an image into its canvas (`3 x side x canvas_width(side)`
/// uint8) and layout row: the shorter side resized to `side` by the same
/// code as `predict`'s eval transform (torchvision's antialiased bilinear
/// `Resize`), so the centre crop of a cached image is exactly what
/// `predict` feeds the model for that file.
pub fn decode_canvas(path: &Path, side: i64) -> Result<(Vec<u8>, [i64; 3])> {
    let img = super::image::decode_rgb(path)?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (nh, nw) = shorter_size(h as i64, w as i64, side);
    let resized = resized_window(
        img.as_raw(),
        w,
        &Resize::whole((h, w), (nh as usize, nw as usize)),
    );
    let (canvas, layout) = pack_canvas(&resized);
    Ok((Vec::<u8>::try_from(canvas.view([-1]))?, layout))
}

/// The cache a folder's images are kept in by default: under the user's
/// cache directory (`$XDG_CACHE_HOME/vggctl/folders`), not in the data.
pub fn default_cache_dir() -> Option<PathBuf> {
    Some(
        crate::fsutil::user_cache_dir()?
            .join("vggctl")
            .join("folders"),
    )
}

fn cache_key(files: &[(PathBuf, i64)], side: i64) -> String {
    let mut h = Sha256::new();
    // v5: absolute paths, as one cache directory serves every folder (v4:
    // whole images in canvases; v3: centre squares; v2's 4:3 squares were
    // a column off).
    h.update(format!("vggctl-folder-v5 {side}\n"));
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

/// Whether a cache's tensors can be what [`load_dir`] built for `files`:
/// uint8 canvases of the side's shape, one label (of the files' labels)
/// and one layout row inside the canvas per image, at most one per file.
fn cache_fits(
    images: &Tensor,
    labels: &Tensor,
    layout: &Tensor,
    files: &[(PathBuf, i64)],
    side: i64,
) -> bool {
    let width = canvas_width(side);
    let n = labels.numel() as i64;
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
        || layout.size() != [n, 3]
    {
        return false;
    }
    let (first, visible, transposed) = (
        layout.select(1, 0),
        layout.select(1, 1),
        layout.select(1, 2),
    );
    in_range(labels, 0, classes - 1)
        && in_range(&first, 0, width - 1)
        && in_range(&visible, 1, width)
        && in_range(&(&first + &visible), 1, width)
        && in_range(&transposed, 0, 1)
}

/// The cached split for `files`, with its count of unreadable files, if
/// `cache` describes them. A cache that does not (damaged, or edited) is
/// rebuilt: labels, shapes and layout rows are checked before use.
fn read_cache(cache: &Path, files: &[(PathBuf, i64)], side: i64) -> Option<(Split, usize)> {
    let sd = read_safetensors(cache).ok()?;
    let (images, labels, layout) = (
        sd.tensors.get("images")?,
        sd.tensors.get("labels")?,
        sd.tensors.get("layout")?,
    );
    if !cache_fits(images, labels, layout, files, side) {
        return None;
    }
    let skipped = sd.metadata.get("skipped").and_then(|s| s.parse().ok());
    let split = Split {
        images: images.shallow_clone(),
        labels: labels.shallow_clone(),
        layout: Some(layout.shallow_clone()),
    };
    Some((split, skipped.unwrap_or(0)))
}

/// Keeps `split` in `cache` for the next run. The cache is an
/// optimization: failing to write it is not an error.
fn write_cache(cache: &Path, split: &Split, skipped: usize) {
    if cache
        .parent()
        .is_none_or(|d| fs::create_dir_all(d).is_err())
    {
        return;
    }
    let meta = HashMap::from([("skipped".to_string(), skipped.to_string())]);
    let mut tensors = vec![
        ("images".to_string(), split.images.shallow_clone()),
        ("labels".to_string(), split.labels.shallow_clone()),
    ];
    if let Some(layout) = &split.layout {
        tensors.push(("layout".to_string(), layout.shallow_clone()));
    }
    let _ = write_safetensors(cache, &tensors, &meta);
}

/// Loads (or builds and caches) every image of `dir`. Returns the split and
/// how many files could not be read.
fn load_dir(
    dir: &Path,
    files: &[(PathBuf, i64)],
    side: i64,
    opts: &FolderOptions,
) -> Result<(Split, usize)> {
    let strict = opts.strict;
    let cache = opts
        .cache_dir
        .as_ref()
        .map(|d| d.join(format!("{}.safetensors", cache_key(files, side))));
    if let Some(found) = cache.as_deref().and_then(|c| read_cache(c, files, side)) {
        // --strict must name the unreadable file, so it decodes again.
        if !(strict && found.1 > 0) {
            return Ok(found);
        }
    }
    let decoded: Vec<Result<(Vec<u8>, [i64; 3])>> = files
        .par_iter()
        .map(|(p, _)| decode_canvas(p, side))
        .collect();
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    let mut layout = Vec::new();
    let mut skipped = 0;
    for (r, (_, label)) in decoded.into_iter().zip(files) {
        match r {
            Ok((px, row)) => {
                pixels.extend_from_slice(&px);
                labels.push(*label);
                layout.extend_from_slice(&row);
            }
            Err(e) if strict => return Err(e.context("unreadable image (--strict)")),
            Err(_) => skipped += 1,
        }
    }
    if labels.is_empty() {
        bail!(
            "{}: none of its {} images could be read",
            dir.display(),
            files.len()
        );
    }
    let n = labels.len() as i64;
    let split = Split {
        images: Tensor::from_slice(&pixels).view([n, 3, side, canvas_width(side)]),
        labels: Tensor::from_slice(&labels),
        layout: Some(Tensor::from_slice(&layout).view([n, 3])),
    };
    if let Some(cache) = &cache {
        write_cache(cache, &split, skipped);
    }
    Ok((split, skipped))
}

/// A seeded shuffle (splitmix64-driven Fisher-Yates), independent of libtorch.
pub fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    let mut s = seed ^ 0x5851_F42D_4C95_7F2D;
    let mut next = || {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    for i in (1..n).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        idx.swap(i, j);
    }
    idx
}

fn take(split: &Split, idx: &[usize]) -> Split {
    split.select(&Tensor::from_slice(
        &idx.iter().map(|&i| i as i64).collect::<Vec<_>>(),
    ))
}

/// The class names and files of a training folder, and the files of its
/// validation folder if there is one (which must have the same classes).
pub fn scan_splits(
    dir: &Path,
    val_dir: Option<&Path>,
) -> Result<(Vec<String>, LabeledFiles, Option<LabeledFiles>)> {
    let (classes, files) = scan(dir)?;
    let Some(vdir) = val_dir else {
        return Ok((classes, files, None));
    };
    let (vclasses, vfiles) = scan(vdir)?;
    if vclasses != classes {
        bail!(
            "{}: class folders {:?} differ from {}'s {:?}",
            vdir.display(),
            vclasses,
            dir.display(),
            classes
        );
    }
    Ok((classes, files, Some(vfiles)))
}

/// Loads an image-folder dataset; `warn` hears about skipped images.
pub fn load(opts: &FolderOptions, warn: &mut dyn FnMut(String)) -> Result<Dataset> {
    if opts.test_only
        && let Some(vdir) = &opts.val_dir
    {
        return load_test(opts, vdir, warn);
    }
    let (folders, files, val) = scan_splits(&opts.dir, opts.val_dir.as_deref())?;
    if val.is_none() {
        check_val_split(opts.val_split)?;
    }
    let (classes, wnids) = named(opts, &opts.dir, folders)?;
    let total = files.len() + val.as_ref().map_or(0, Vec::len);
    let (train, test) = match canvas_bytes(total, opts.cache_size) > opts.cache_mem {
        true => streamed(opts, files, val)?,
        false => resident(opts, files, val, warn)?,
    };
    Ok(Dataset {
        name: if opts.imagenet { "imagenet" } else { "folder" }.into(),
        train,
        test,
        classes,
        mean: super::imagenet::MEAN,
        std: super::imagenet::STD,
        source: opts.dir.display().to_string(),
        wnids,
    })
}

/// Evaluation's dataset: every image of the folder `vdir` a test image,
/// no training split.
fn load_test(opts: &FolderOptions, vdir: &Path, warn: &mut dyn FnMut(String)) -> Result<Dataset> {
    let (folders, files) = scan(vdir)?;
    let (classes, wnids) = named(opts, vdir, folders)?;
    let test = match canvas_bytes(files.len(), opts.cache_size) > opts.cache_mem {
        true => streamed_split(opts, files),
        false => {
            let (split, skipped) = load_dir(vdir, &files, opts.cache_size, opts)?;
            if skipped > 0 {
                warn(format!(
                    "skipped {skipped} unreadable image(s) in {} (--strict makes this an error)",
                    vdir.display()
                ));
            }
            Images::Resident(split)
        }
    };
    Ok(Dataset {
        name: if opts.imagenet { "imagenet" } else { "folder" }.into(),
        train: streamed_split(opts, Vec::new()),
        test,
        classes,
        mean: super::imagenet::MEAN,
        std: super::imagenet::STD,
        source: vdir.display().to_string(),
        wnids,
    })
}

/// A folder's class names, and for ImageNet's layout, torchvision's names
/// of its WordNet ids beside the ids themselves.
fn named(
    opts: &FolderOptions,
    dir: &Path,
    folders: Vec<String>,
) -> Result<(Vec<String>, Option<Vec<String>>)> {
    Ok(match opts.imagenet {
        true => (super::imagenet::names(dir, &folders)?, Some(folders)),
        false => (folders, None),
    })
}

/// A fraction to hold out for validation.
pub fn check_val_split(val_split: f64) -> Result<()> {
    if !(val_split > 0.0 && val_split < 1.0) {
        bail!("--val-split {val_split} must be between 0 and 1 (or give --val-dir)");
    }
    Ok(())
}

/// The number of held-out images of `n`, or an error if `n` cannot be split.
pub fn held_out(opts: &FolderOptions, n: usize) -> Result<usize> {
    if n < 2 {
        bail!(
            "{}: {n} readable image(s) cannot be split into training and validation",
            opts.dir.display()
        );
    }
    Ok(((n as f64 * opts.val_split).round() as usize).clamp(1, n - 1))
}

/// Both splits streamed from their files; without a validation folder,
/// the held-out files are drawn as the in-memory path draws its images.
fn streamed(
    opts: &FolderOptions,
    files: LabeledFiles,
    val: Option<LabeledFiles>,
) -> Result<(Images, Images)> {
    let (train, val) = match val {
        Some(v) => (files, v),
        None => {
            let idx = shuffled(files.len(), opts.seed);
            let n_val = held_out(opts, files.len())?;
            let pick = |ids: &[usize]| ids.iter().map(|&i| files[i].clone()).collect();
            (pick(&idx[n_val..]), pick(&idx[..n_val]))
        }
    };
    Ok((streamed_split(opts, train), streamed_split(opts, val)))
}

/// A split read from its files as it goes.
fn streamed_split(opts: &FolderOptions, files: LabeledFiles) -> Images {
    Images::Streamed(Streamed {
        items: Arc::new(files.into_iter().map(|(p, l)| Item::file(p, l)).collect()),
        store: None,
        side: opts.cache_size,
        strict: opts.strict,
        workers: opts.workers,
        pin: false,
    })
}

/// Both splits decoded into memory (or read from the cache).
fn resident(
    opts: &FolderOptions,
    files: LabeledFiles,
    val: Option<LabeledFiles>,
    warn: &mut dyn FnMut(String),
) -> Result<(Images, Images)> {
    let (all, skipped) = load_dir(&opts.dir, &files, opts.cache_size, opts)?;
    if skipped > 0 {
        warn(format!(
            "skipped {skipped} unreadable image(s) in {} (--strict makes this an error)",
            opts.dir.display()
        ));
    }
    let (train, test) = match (val, &opts.val_dir) {
        (Some(vfiles), Some(vdir)) => {
            let (val, vskipped) = load_dir(vdir, &vfiles, opts.cache_size, opts)?;
            if vskipped > 0 {
                warn(format!(
                    "skipped {vskipped} unreadable image(s) in {}",
                    vdir.display()
                ));
            }
            (all, val)
        }
        _ => {
            let n = all.len() as usize;
            let n_val = held_out(opts, n)?;
            let idx = shuffled(n, opts.seed);
            (take(&all, &idx[n_val..]), take(&all, &idx[..n_val]))
        }
    };
    Ok((Images::Resident(train), Images::Resident(test)))
}
