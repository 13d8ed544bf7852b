//! `vggctl prepare`'s writing of a prepared dataset (the format is
//! `prepared`'s), and reading one as the folder it was made of.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use rayon::prelude::*;

use super::folder::{
    FolderOptions, Listed, check_val_split, held_out, no_own_val, scan_splits, shuffled,
};
use super::folder_scan::LabeledFiles;
use super::image::shorter_size;
use super::prepared::{END, Entry, Index, MAGIC, MAX_IMAGE_BYTES, Prepared};
use super::resize::{Resize, resize_window};
use super::stream::{Item, Streamed};
use super::{Dataset, Images};

/// Images prepared at a time (their bytes are held until written).
const CHUNK: usize = 256;

/// What `prepare` did: images stored, and the messages of those skipped.
pub struct Prepare {
    pub images: usize,
    pub resized: usize,
    pub skipped: Vec<String>,
}

/// How `prepare` stores images.
#[derive(Clone, Copy, Debug)]
pub struct PrepareOptions {
    /// Images whose shorter side is longer are resized to it.
    pub max_side: i64,
    /// JPEG quality of resized images.
    pub quality: u8,
    /// Decoded RGB bytes instead of image files.
    pub raw: bool,
    /// An unreadable image is an error instead of skipped.
    pub strict: bool,
}

/// torchvision's `Resize(short)` of an image (host code, no libtorch:
/// `prepare` runs on rayon's threads).
fn shrink(img: &image::RgbImage, short: i64) -> Result<image::RgbImage> {
    let (h, w) = (img.height() as usize, img.width() as usize);
    let (nh, nw) = shorter_size(h as i64, w as i64, short);
    let (nh, nw) = (nh as usize, nw as usize);
    let planes = resize_window(img.as_raw(), w, &Resize::whole((h, w), (nh, nw)));
    let plane = nh * nw;
    let mut px = vec![0u8; 3 * plane];
    for (i, p) in px.chunks_exact_mut(3).enumerate() {
        p.copy_from_slice(&[planes[i], planes[plane + i], planes[2 * plane + i]]);
    }
    image::RgbImage::from_raw(nw as u32, nh as u32, px).context("a resized image")
}

/// What to store for one image file: its own bytes when its shorter side
/// is at most `max_side`, else the resized image encoded again; with
/// `raw`, the (resized) pixels. Returns the bytes, whether it was resized
/// and, raw, its height and width.
fn stored_bytes(path: &Path, o: PrepareOptions) -> Result<(Vec<u8>, bool, Option<[u32; 2]>)> {
    let file = crate::fsutil::read_regular(path, "an image", MAX_IMAGE_BYTES)?;
    let (img, short) = super::image::decode_bytes(&file, path, |h, w| h.min(w))?;
    let resized = short > o.max_side;
    if !resized && !o.raw {
        return Ok((file, false, None));
    }
    let img = match resized {
        true => shrink(&img, o.max_side)?,
        false => img,
    };
    if o.raw {
        let dims = [img.height(), img.width()];
        return Ok((img.into_raw(), resized, Some(dims)));
    }
    let mut out = Vec::new();
    // JPEG stays JPEG; the lossless formats (and WebP) become PNG.
    let encoded = match file.starts_with(&[0xFF, 0xD8]) {
        true => img.write_with_encoder(image::codecs::jpeg::JpegEncoder::new_with_quality(
            &mut out, o.quality,
        )),
        false => img.write_with_encoder(image::codecs::png::PngEncoder::new(&mut out)),
    };
    encoded.with_context(|| format!("encoding {} again", path.display()))?;
    Ok((out, true, None))
}

/// Writes `files` (in order) into `w` from `*at` on; returns their entries.
fn write_split(
    w: &mut impl Write,
    at: &mut u64,
    root: &Path,
    files: &LabeledFiles,
    o: PrepareOptions,
    done: &mut Prepare,
) -> Result<Vec<Entry>> {
    let mut entries = Vec::new();
    for chunk in files.chunks(CHUNK) {
        let stored: Vec<_> = chunk.par_iter().map(|(p, _)| stored_bytes(p, o)).collect();
        for ((path, label), r) in chunk.iter().zip(stored) {
            let (bytes, resized, raw) = match r {
                Ok(b) => b,
                Err(e) if o.strict => return Err(e.context("unreadable image (--strict)")),
                Err(e) => {
                    done.skipped.push(format!("{e:#}"));
                    continue;
                }
            };
            w.write_all(&bytes)
                .context("writing the prepared dataset")?;
            let name = path.strip_prefix(root).unwrap_or(path);
            entries.push(Entry {
                name: name.display().to_string(),
                label: *label,
                offset: *at,
                len: bytes.len() as u64,
                crc: crc32fast::hash(&bytes),
                raw,
            });
            *at += bytes.len() as u64;
            done.images += 1;
            done.resized += resized as usize;
        }
    }
    Ok(entries)
}

/// `vggctl prepare`: the images of `dir` (and of `val_dir`) into `out`,
/// written beside it and renamed into place when whole.
pub fn prepare(
    dir: &Path,
    val_dir: Option<&Path>,
    out: &Path,
    opts: PrepareOptions,
) -> Result<Prepare> {
    let (classes, files, val) = scan_splits(dir, val_dir)?;
    let listed = Listed {
        classes,
        wnids: None,
        train: files,
        val,
        partition: None,
        own_val: 0,
    };
    prepare_listed((dir, val_dir), listed, out, opts)
}

/// `vggctl prepare` of the files `listed` names (in `dir`, and the
/// validation images in `val_dir`; names in the file are relative to them).
pub fn prepare_listed(
    (dir, val_dir): (&Path, Option<&Path>),
    listed: Listed,
    out: &Path,
    opts: PrepareOptions,
) -> Result<Prepare> {
    let Listed {
        classes,
        wnids,
        train: files,
        val,
        partition,
        own_val,
    } = listed;
    // Classes of ImageNet (Imagenette's) are kept as their WordNet ids, as
    // ImageNet's layout's are, and named again when read.
    let classes = wnids.unwrap_or(classes);
    let val = val_dir.zip(val);
    let mut done = Prepare {
        images: 0,
        resized: 0,
        skipped: Vec::new(),
    };
    crate::fsutil::write_atomic(out, |w| {
        w.write_all(MAGIC)?;
        let mut at = MAGIC.len() as u64;
        let train = write_split(w, &mut at, dir, &files, opts, &mut done)?;
        let val = match &val {
            Some((v, vfiles)) => Some(write_split(w, &mut at, v, vfiles, opts, &mut done)?),
            None => None,
        };
        if train.is_empty() {
            bail!("{}: none of its images could be read", dir.display());
        }
        let index = serde_json::to_vec(&Index {
            classes,
            max_side: opts.max_side,
            train,
            val,
            partition,
            own_val: (own_val > 0).then_some(own_val),
        })?;
        w.write_all(&index)?;
        w.write_all(&at.to_le_bytes())?;
        w.write_all(&(index.len() as u64).to_le_bytes())?;
        w.write_all(&crc32fast::hash(&index).to_le_bytes())?;
        w.write_all(END)?;
        Ok(())
    })?;
    Ok(done)
}

/// A prepared dataset (`opts.dir`) as `folder::load` gives its folder
/// (the dataset `name`), streamed: its own validation split, or the same
/// held-out part (of the images it holds) for the same seed.
pub fn load(opts: &FolderOptions, name: &str) -> Result<Dataset> {
    let store = Prepared::open(&opts.dir)?;
    let idx = &store.index;
    let classes = match opts.imagenet {
        true => super::imagenet::names(&opts.dir, &idx.classes)?,
        false => idx.classes.clone(),
    };
    let wnids = opts.imagenet.then(|| idx.classes.clone());
    let item = |e: &Entry| Item {
        path: PathBuf::from(format!("{}:{}", opts.dir.display(), e.name)),
        label: e.label,
        stored: Some(e.clone()),
    };
    let (train, val): (Vec<Item>, Vec<Item>) = match &idx.val {
        _ if opts.own_val => {
            let Some(n) = idx.own_val.filter(|&n| n > 0 && n <= idx.train.len()) else {
                bail!("{}: {}", opts.dir.display(), no_own_val(name));
            };
            let (train, val) = idx.train.split_at(idx.train.len() - n);
            (
                train.iter().map(item).collect(),
                val.iter().map(item).collect(),
            )
        }
        Some(v) => (
            idx.train.iter().map(item).collect(),
            v.iter().map(item).collect(),
        ),
        None => {
            check_val_split(opts.val_split)?;
            let order = shuffled(idx.train.len(), opts.seed);
            let n_val = held_out(opts, idx.train.len())?;
            let pick = |ids: &[usize]| ids.iter().map(|&i| item(&idx.train[i])).collect();
            (pick(&order[n_val..]), pick(&order[..n_val]))
        }
    };
    let split = |items: Vec<Item>| {
        Images::Streamed(Streamed {
            items: Arc::new(items),
            store: Some(store.clone()),
            side: opts.cache_size,
            filter: opts.filter,
            strict: opts.strict,
            workers: opts.workers,
            pin: false,
        })
    };
    Ok(Dataset {
        name: name.into(),
        train: split(train),
        test: split(val),
        classes,
        mean: super::imagenet::MEAN,
        std: super::imagenet::STD,
        source: opts.dir.display().to_string(),
        wnids,
        test_names: None,
    })
}
