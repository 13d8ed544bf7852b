//! Reading the dataset that the data options (or a run's configuration)
//! name: which reader, where from, what to download.

use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow};
use vggctl::data::cifar;
use vggctl::data::digits;
use vggctl::data::download::DownloadSource;
use vggctl::data::folder::{self, FolderOptions};
use vggctl::data::imagenet;
use vggctl::data::mnist;
use vggctl::data::pack;
use vggctl::data::prepared;
use vggctl::data::resize::Filter;
use vggctl::data::{Dataset, fer2013, has_own_val, imagenette, stl10, svhn, usps};
use vggctl::dist::World;
use vggctl::train::config::TrainConfig;

use super::data_opts::DataOpts;
use super::listed::{check_packed, is_listed, open_listed, unknown_dataset};
use super::output::{usage, warn};
use super::progress::download_bar;

/// The cores, shared among this machine's ranks (torchrun's
/// `LOCAL_WORLD_SIZE`), one at least.
fn default_workers() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let ranks = std::env::var("LOCAL_WORLD_SIZE")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(1);
    (cores / ranks.max(1)).max(1)
}

/// Half of the memory the kernel says is available (1 GiB if unknown).
fn default_cache_mem() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemAvailable:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()
        })
        .map_or(1 << 30, |kib| kib * 1024 / 2)
}

impl DataOpts {
    /// The dataset a training configuration names.
    pub fn load_for(&self, c: &TrainConfig, quiet: bool) -> Result<Dataset> {
        let mut d = self.load_named(
            &c.dataset,
            Path::new(&c.data_dir),
            c.val_dir.as_deref().map(Path::new),
            c.val_split,
            c.seed,
            c.val_resize(),
            Reading {
                quiet,
                streamed: c.streamed,
                test_only: false,
                filter: c.interpolation,
                fold: c.fold,
                own_val: c.validates_on_val(),
                extra: c.extra,
            },
        )?;
        if c.imagenet_normalization {
            d.mean = imagenet::MEAN;
            d.std = imagenet::STD;
        }
        Ok(d)
    }

    /// The dataset these options name, to evaluate on, images cached at
    /// `cache_size` (resized by `filter`) for folders: with --val-dir, only
    /// that folder is read, and a listed dataset's test split alone unless
    /// `train` (features of the training split) asks for it too; STL-10's
    /// training images those of `fold`.
    pub fn load_test(
        &self,
        seed: u64,
        (cache_size, filter): (i64, Filter),
        (train, fold): (bool, Option<usize>),
    ) -> Result<Dataset> {
        self.check_val_on()?;
        self.check_val_split()?;
        self.load_named(
            self.dataset(),
            &self.dir(),
            self.val_dir.as_deref(),
            self.held_fraction(),
            seed,
            cache_size,
            Reading {
                quiet: false,
                streamed: None,
                test_only: !train,
                filter,
                fold,
                own_val: self.own_val(),
                extra: self.extra,
            },
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn load_named(
        &self,
        name: &str,
        dir: &Path,
        val_dir: Option<&Path>,
        val_split: f64,
        seed: u64,
        cache_size: i64,
        how: Reading,
    ) -> Result<Dataset> {
        let Reading {
            quiet, test_only, ..
        } = how;
        if how.own_val && !has_own_val(name) {
            // Validated on a seeded part of its training split.
            let whole = Reading {
                own_val: false,
                test_only: false,
                ..how
            };
            let d = self.load_named(name, dir, val_dir, val_split, seed, cache_size, whole)?;
            return d.hold_out(val_split, seed);
        }
        if let Some(d) = self.load_downloadable(name, dir, how) {
            return d;
        }
        match name {
            "folder" | "imagenet" => {
                let imagenet = name == "imagenet";
                let file = prepared::is_prepared(dir);
                let (dir, val_dir) = match (imagenet, file) {
                    // Evaluation reads DIR/val (or --val-dir) only.
                    (true, false) => match (test_only, val_dir) {
                        (true, Some(v)) => (dir.join("train"), Some(v.to_path_buf())),
                        (true, None) => (dir.join("train"), Some(imagenet::split_dir(dir, "val")?)),
                        (false, _) => (
                            imagenet::split_dir(dir, "train")?,
                            Some(imagenet::split_dir(dir, "val")?),
                        ),
                    },
                    _ => (dir.to_path_buf(), val_dir.map(Path::to_path_buf)),
                };
                let opts = self.folder_options((dir, val_dir), (val_split, seed, cache_size), how);
                let opts = FolderOptions { imagenet, ..opts };
                match file {
                    true => pack::load(&opts, name),
                    false => folder::load(&opts, &mut warn),
                }
            }
            name if is_listed(name) => {
                let numbers = (val_split, seed, cache_size);
                if prepared::is_prepared(dir) {
                    check_packed(dir, name, how.fold)?;
                    let opts = self.folder_options((dir.to_path_buf(), None), numbers, how);
                    // Imagenette's file holds its WordNet ids, as ImageNet's does.
                    let imagenet = imagenette::named(name).is_some();
                    return pack::load(&FolderOptions { imagenet, ..opts }, name);
                }
                let source = |n: &str, own| self.download_source(n, own);
                let (images, mut listed) = open_listed((name, how.fold), dir, &source, quiet)?;
                if how.own_val {
                    listed = listed.on_own_val(name)?;
                }
                // Evaluation reads the test split alone, where there is one.
                if test_only && listed.val.is_some() {
                    listed.train.clear();
                }
                let opts = self.folder_options((images.clone(), Some(images)), numbers, how);
                folder::load_listed(&opts, name, listed, &mut warn)
            }
            "digits" => digits::load(),
            fer2013::NAME => fer2013::load(dir, test_only),
            other => Err(usage(unknown_dataset(other))),
        }
    }

    /// How an image folder (or the photographs of a dataset read as one)
    /// at `dir` is read, its validation images in `val_dir`.
    fn folder_options(
        &self,
        (dir, val_dir): (PathBuf, Option<PathBuf>),
        (val_split, seed, cache_size): (f64, u64, i64),
        how: Reading,
    ) -> FolderOptions {
        let cache_mem = match how.streamed {
            Some(true) => 0,
            Some(false) => u64::MAX,
            None => self.cache_mem.unwrap_or_else(default_cache_mem),
        };
        FolderOptions {
            dir,
            val_dir,
            val_split,
            seed,
            cache_size,
            filter: how.filter,
            strict: self.strict,
            cache_dir: self.cache_dir.clone().or_else(folder::default_cache_dir),
            cache_mem,
            workers: self.workers.unwrap_or_else(default_workers),
            imagenet: false,
            test_only: how.test_only,
            own_val: how.own_val,
        }
    }

    /// The dataset `name` if it is one vggctl downloads when it is missing
    /// from `dir` (CIFAR, MNIST, SVHN, USPS, STL-10), else None.
    fn load_downloadable(&self, name: &str, dir: &Path, how: Reading) -> Option<Result<Dataset>> {
        let Reading { quiet, fold, .. } = how;
        let downloaded = cifar::named(name).is_some()
            || mnist::named(name).is_some()
            || matches!(name, "svhn" | "stl10" | usps::NAME)
            || is_listed(name) && !prepared::is_prepared(dir);
        if downloaded && dir.exists() && !dir.is_dir() {
            return Some(Err(anyhow!(
                "{}: not a directory (--data-dir names the folder {name} is read from or downloaded into)",
                dir.display()
            )));
        }
        let bar = &mut download_bar(quiet);
        let source =
            |url: String, md5: String| self.download_source(name, DownloadSource { url, md5 });
        if let Some(c) = cifar::named(name) {
            let src = source(c.url.into(), c.md5.into());
            return Some(c.load(dir, how.test_only, src.as_ref(), bar));
        }
        if let Some(m) = mnist::named(name) {
            let (url, md5) = (m.mirrors.join(","), m.md5s.join(","));
            let src = self.download_source(m.env_name(), DownloadSource { url, md5 });
            return Some(m.load(dir, how.test_only, src.as_ref(), bar));
        }
        match name {
            "svhn" => {
                let src = source(svhn::MIRROR.into(), svhn::MD5S.join(","));
                let splits = (how.test_only, how.extra);
                Some(svhn::load(dir, splits, src.as_ref(), bar))
            }
            usps::NAME => {
                let src = source(usps::MIRROR.into(), usps::MD5S.join(","));
                Some(usps::load(dir, how.test_only, src.as_ref(), bar))
            }
            "stl10" => {
                let src = source(stl10::URL.into(), stl10::MD5.into());
                Some(stl10::load(dir, (fold, how.test_only), src.as_ref(), bar))
            }
            _ => None,
        }
    }
}

/// How a dataset is read: `quiet` (no download bar), `streamed` (how a
/// run recorded its folder; None: by --cache-mem), `test_only` (for
/// evaluation: a validation folder alone), `filter` (image folders'
/// resizes), `fold` (STL-10's training fold, DTD's partition), `own_val`
/// (a listed dataset's own val split validated on, `--val-on val`),
/// `extra` (SVHN's extra split trained on too).
#[derive(Clone, Copy)]
struct Reading {
    quiet: bool,
    streamed: Option<bool>,
    test_only: bool,
    filter: Filter,
    fold: Option<usize>,
    own_val: bool,
    extra: bool,
}

/// Rank 0 tells the other ranks (after loading the data, so it also
/// waits for them) whether it streams a folder; returns what it said.
pub fn streamed_as_rank0(world: &World, streamed: Option<bool>) -> Result<Option<bool>> {
    if world.size == 1 {
        return Ok(streamed);
    }
    let code = streamed.map_or(-1, i64::from);
    let t = tch::Tensor::from_slice(&[code]);
    world.broadcast(&t)?;
    Ok(match t.int64_value(&[0]) {
        -1 => None,
        v => Some(v == 1),
    })
}
