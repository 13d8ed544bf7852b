//! Image-folder datasets (`DIR/<class>/**/<image>`, read as torchvision's
//! `ImageFolder` reads them: the same files, classes and order): each image is decoded once, in parallel on all cores,
//! resized so its shorter side is the cache size and kept whole as uint8 in
//! a 3:2 canvas (`augment::canvas_width`); the result is cached on disk
//! (`folder_cache`: keyed by the file list, sizes, modification times and
//! the cache size) for the next run. Folders whose canvases would not fit `cache_mem` are
//! streamed from their files instead (`stream`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::num::Num;
use anyhow::{Context, Result, bail};
use rayon::prelude::*;
use tch::Tensor;

use super::augment::{LAYOUT, canvas_keeps, canvas_width, pack_canvas};
use super::folder_cache;
pub use super::folder_cache::default_cache_dir;
use super::folder_scan::{LabeledFiles, scan};
use super::image::{resized_window, shorter_size};
use super::resize::{Filter, Resize};
use super::stream::{Item, Streamed};
use super::{Dataset, Images, Split};

pub struct FolderOptions {
    pub dir: PathBuf,
    pub val_dir: Option<PathBuf>,
    /// Fraction held out for validation when there is no `val_dir`.
    pub val_split: f64,
    pub seed: u64,
    /// Shorter side of the cached images (256 for a 224 input).
    pub cache_size: i64,
    /// The filter of every resize on the host (`--interpolation`): the
    /// cached images, streamed evaluation and random resized crops.
    pub filter: Filter,
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
    /// A prepared listed dataset validated (or evaluated) on its own val
    /// split instead of its test split (`--val-on val`).
    pub own_val: bool,
}

/// The memory the canvases of `n` images of `side` take.
pub fn canvas_bytes(n: usize, side: i64) -> u64 {
    n as u64 * 3 * side as u64 * canvas_width(side) as u64
}

/// Decodes an image into its canvas (`3 x side x canvas_width(side)`
/// uint8) and layout row: the shorter side resized to `side` by the same
/// code as `predict`'s eval transform (torchvision's antialiased `Resize`
/// with `filter`), so the centre crop of a cached image is exactly what
/// `predict` feeds the model for that file. Only what the canvas keeps is
/// computed (a 1 x 60000 image would resize to 256 x 15,360,000).
pub fn decode_canvas(path: &Path, side: i64, filter: Filter) -> Result<(Vec<u8>, [i64; 4])> {
    let img = super::image::decode_rgb(path)?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (nh, nw) = shorter_size(h as i64, w as i64, side);
    let (start, len) = canvas_keeps((nh, nw));
    let (start, len) = (start as usize, len as usize);
    let keep = match nh > nw {
        true => (start, 0, len, nw as usize),
        false => (0, start, nh as usize, len),
    };
    let resize = Resize {
        keep,
        ..Resize::whole((h, w), (nh as usize, nw as usize)).with(filter)
    };
    let kept = resized_window(img.as_raw(), w, &resize);
    let (canvas, layout) = pack_canvas(&kept, (nh, nw));
    Ok((Vec::<u8>::try_from(canvas.view([-1]))?, layout))
}

/// Loads (or builds and caches) every image of `dir`. Returns the split and
/// the indices of the files it holds (those that could be read).
fn load_dir(
    dir: &Path,
    files: &[(PathBuf, i64)],
    side: i64,
    opts: &FolderOptions,
) -> Result<(Split, Vec<usize>)> {
    let strict = opts.strict;
    let cache = opts.cache_dir.as_ref().map(|d| {
        d.join(format!(
            "{}.safetensors",
            folder_cache::key(files, side, opts.filter)
        ))
    });
    if let Some(found) = cache
        .as_deref()
        .and_then(|c| folder_cache::read(c, files, side))
    {
        // --strict must name the unreadable file, so it decodes again.
        if !(strict && found.1.len() < files.len()) {
            return Ok(found);
        }
    }
    let decoded: Vec<Result<(Vec<u8>, [i64; 4])>> = files
        .par_iter()
        .map(|(p, _)| decode_canvas(p, side, opts.filter))
        .collect();
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    let mut layout = Vec::new();
    let mut kept = Vec::new();
    for (i, (r, (_, label))) in decoded.into_iter().zip(files).enumerate() {
        match r {
            Ok((px, row)) => {
                pixels.extend_from_slice(&px);
                labels.push(*label);
                layout.extend_from_slice(&row);
                kept.push(i);
            }
            Err(e) if strict => return Err(e.context("unreadable image (--strict)")),
            Err(_) => {}
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
        layout: Some(Tensor::from_slice(&layout).view([n, LAYOUT])),
    };
    if let Some(cache) = &cache {
        folder_cache::write(cache, &split, &kept);
    }
    Ok((split, kept))
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
/// For evaluation with a `val_dir`, only that folder is read.
pub fn load(opts: &FolderOptions, warn: &mut dyn FnMut(String)) -> Result<Dataset> {
    let name = if opts.imagenet { "imagenet" } else { "folder" };
    if opts.test_only
        && let Some(vdir) = &opts.val_dir
    {
        let (folders, files) = scan(vdir)?;
        let (classes, wnids) = named(opts, vdir, folders)?;
        let listed = Listed {
            classes,
            wnids,
            train: Vec::new(),
            val: Some(files),
            partition: None,
            own_val: 0,
        };
        return load_listed(opts, name, listed, warn);
    }
    let (folders, files, val) = scan_splits(&opts.dir, opts.val_dir.as_deref())?;
    if val.is_none() {
        check_val_split(opts.val_split)?;
    }
    let (classes, wnids) = named(opts, &opts.dir, folders)?;
    let listed = Listed {
        classes,
        wnids,
        train: files,
        val,
        partition: None,
        own_val: 0,
    };
    load_listed(opts, name, listed, warn)
}

/// A dataset's image files: its class names (and ImageNet's WordNet
/// ids), the training images, the validation images (those of
/// `FolderOptions::val_dir`; None: a held-out fraction of the training
/// images), and the partition they are (DTD's; None elsewhere).
pub struct Listed {
    pub classes: Vec<String>,
    pub wnids: Option<Vec<String>>,
    pub train: LabeledFiles,
    pub val: Option<LabeledFiles>,
    pub partition: Option<usize>,
    /// How many of `train`'s last images are the dataset's own val split
    /// (Oxford 102 Flowers', DTD's; 0 elsewhere).
    pub own_val: usize,
}

impl Listed {
    /// A dataset without splits (EuroSAT's, the Caltechs'): every image,
    /// for `--val-split` to hold a part out of.
    pub fn unsplit(classes: Vec<String>, train: LabeledFiles) -> Listed {
        Listed {
            classes,
            wnids: None,
            train,
            val: None,
            partition: None,
            own_val: 0,
        }
    }

    /// An unsplit dataset whose images are the class folders of `dir`
    /// (EuroSAT's, the Caltechs'): `found` (its classes with every image)
    /// if it has the `want` classes the dataset `title` has, else an error
    /// naming `dir` and the number of `counted` ("class folders") found.
    pub fn unsplit_in(
        dir: PathBuf,
        found: (Vec<String>, LabeledFiles),
        (title, want): (&str, i64),
        counted: &str,
    ) -> Result<(PathBuf, Listed)> {
        let (classes, train) = found;
        if classes.len() as i64 != want {
            bail!(
                "{}: {} {counted}, where {title} has {want}",
                dir.display(),
                classes.len()
            );
        }
        Ok((dir, Listed::unsplit(classes, train)))
    }

    /// A dataset of a training split and a test split validated on, without
    /// a val split of its own.
    pub fn split(classes: Vec<String>, train: LabeledFiles, test: LabeledFiles) -> Listed {
        Listed {
            val: Some(test),
            ..Listed::unsplit(classes, train)
        }
    }

    /// The dataset `name` validated on its own val split (`--val-on val`):
    /// trained on the images before it, its test images left out.
    pub fn on_own_val(mut self, name: &str) -> Result<Listed> {
        if self.own_val == 0 {
            bail!(no_own_val(name));
        }
        let at = self.train.len() - self.own_val;
        self.val = Some(self.train.split_off(at));
        self.own_val = 0;
        Ok(self)
    }
}

/// The error of `--val-on val` where the dataset `name`'s val split is
/// missing (a file packed without it).
pub fn no_own_val(name: &str) -> String {
    format!("--val-on val: no val split of {name} listed (prepare the file again)")
}

/// The dataset `name` of the files `listed` names, decoded into memory
/// (or read from the cache) if they fit `cache_mem`, else streamed; for
/// evaluation (`test_only`) its validation images alone.
pub fn load_listed(
    opts: &FolderOptions,
    name: &str,
    listed: Listed,
    warn: &mut dyn FnMut(String),
) -> Result<Dataset> {
    let Listed {
        classes,
        wnids,
        train,
        val,
        ..
    } = listed;
    let (dir, (train, test, test_names)) = match (opts.test_only, val, &opts.val_dir) {
        (true, Some(files), Some(vdir)) => (vdir, test_split(opts, vdir, files, warn)?),
        (_, val, _) => {
            let total = train.len() + val.as_ref().map_or(0, Vec::len);
            let splits = match canvas_bytes(total, opts.cache_size) > opts.cache_mem {
                true => streamed(opts, train, val)?,
                false => resident(opts, train, val, warn)?,
            };
            (&opts.dir, splits)
        }
    };
    Ok(Dataset {
        name: name.into(),
        train,
        test,
        classes,
        mean: super::imagenet::MEAN,
        std: super::imagenet::STD,
        source: dir.display().to_string(),
        wnids,
        test_names,
    })
}

/// Evaluation's splits: every image of `files` (in `vdir`) a test image,
/// no training split.
fn test_split(
    opts: &FolderOptions,
    vdir: &Path,
    files: LabeledFiles,
    warn: &mut dyn FnMut(String),
) -> Result<Splits> {
    let train = streamed_split(opts, Vec::new());
    Ok(
        match canvas_bytes(files.len(), opts.cache_size) > opts.cache_mem {
            true => (train, streamed_split(opts, files), None),
            false => {
                let (split, kept) = load_resident(vdir, &files, opts, warn)?;
                (train, Images::Resident(split), Some(kept))
            }
        },
    )
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

/// The fraction of a folder held out for validation where nothing says
/// otherwise (`--val-split`).
pub const DEFAULT_VAL_SPLIT: f64 = 0.1;

/// A fraction to hold out for validation.
pub fn check_val_split(val_split: f64) -> Result<()> {
    if let Some(problem) = val_split_problem(val_split) {
        bail!("--val-split {problem} (or give --val-dir)");
    }
    Ok(())
}

/// What is wrong with `val_split` as a fraction to hold out, if anything
/// (e.g. "1.5 must be between 0 and 1").
pub fn val_split_problem(val_split: f64) -> Option<String> {
    let fraction = val_split > 0.0 && val_split < 1.0;
    (!fraction).then(|| format!("{} must be between 0 and 1", Num(val_split)))
}

/// The number of held-out images of `n`, or an error if `n` cannot be split.
pub fn held_out(opts: &FolderOptions, n: usize) -> Result<usize> {
    held_out_count(n, opts.val_split).with_context(|| {
        format!(
            "{}: {n} readable image(s) cannot be split into training and validation",
            opts.dir.display()
        )
    })
}

/// How many of `n` images the fraction `val_split` holds out: at least
/// one, leaving at least one (None where `n` is under 2).
pub fn held_out_count(n: usize, val_split: f64) -> Option<usize> {
    (n >= 2).then(|| ((n as f64 * val_split).round() as usize).clamp(1, n - 1))
}

/// A folder's training and test splits, and the test images' files where
/// the split does not name them (`Dataset::test_names`).
type Splits = (Images, Images, Option<Vec<String>>);

/// Both splits streamed from their files; without a validation folder,
/// the held-out files are drawn as the in-memory path draws its images.
fn streamed(
    opts: &FolderOptions,
    files: LabeledFiles,
    val: Option<LabeledFiles>,
) -> Result<Splits> {
    let (train, val) = match val {
        Some(v) => (files, v),
        None => {
            let idx = shuffled(files.len(), opts.seed);
            let n_val = held_out(opts, files.len())?;
            let pick = |ids: &[usize]| ids.iter().map(|&i| files[i].clone()).collect();
            (pick(&idx[n_val..]), pick(&idx[..n_val]))
        }
    };
    Ok((streamed_split(opts, train), streamed_split(opts, val), None))
}

/// A split read from its files as it goes.
fn streamed_split(opts: &FolderOptions, files: LabeledFiles) -> Images {
    Images::Streamed(Streamed {
        items: Arc::new(files.into_iter().map(|(p, l)| Item::file(p, l)).collect()),
        store: None,
        side: opts.cache_size,
        filter: opts.filter,
        strict: opts.strict,
        workers: opts.workers,
        pin: false,
    })
}

/// The readable images of `files` (in `dir`) in memory, or from the
/// cache, with their files' names; `warn` hears how many were skipped.
fn load_resident(
    dir: &Path,
    files: &[(PathBuf, i64)],
    opts: &FolderOptions,
    warn: &mut dyn FnMut(String),
) -> Result<(Split, Vec<String>)> {
    let (split, kept) = load_dir(dir, files, opts.cache_size, opts)?;
    let skipped = files.len() - kept.len();
    if skipped > 0 {
        warn(format!(
            "skipped {skipped} unreadable image(s) in {} (--strict makes this an error)",
            dir.display()
        ));
    }
    let names = kept.iter().map(|&i| files[i].0.display().to_string());
    Ok((split, names.collect()))
}

/// Both splits decoded into memory (or read from the cache).
fn resident(
    opts: &FolderOptions,
    files: LabeledFiles,
    val: Option<LabeledFiles>,
    warn: &mut dyn FnMut(String),
) -> Result<Splits> {
    let (all, all_files) = load_resident(&opts.dir, &files, opts, warn)?;
    let (train, test, test_names) = match (val, &opts.val_dir) {
        (Some(vfiles), Some(vdir)) => {
            let (val, val_files) = load_resident(vdir, &vfiles, opts, warn)?;
            (all, val, val_files)
        }
        _ => {
            let n = all.len() as usize;
            let n_val = held_out(opts, n)?;
            let idx = shuffled(n, opts.seed);
            let held = idx[..n_val].iter().map(|&i| all_files[i].clone()).collect();
            (take(&all, &idx[n_val..]), take(&all, &idx[..n_val]), held)
        }
    };
    Ok((
        Images::Resident(train),
        Images::Resident(test),
        Some(test_names),
    ))
}
