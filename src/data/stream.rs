//! Image folders read as they are used, for folders too large to keep in
//! memory (ImageNet): each batch's images are read, decoded and transformed
//! by a pool of worker threads into one uint8 batch, a few batches ahead of
//! the step that takes them, in order. Memory holds the batches in the
//! queue and one image per worker, whatever the folder's size.
//!
//! The transforms are the in-memory path's, one image at a time: the
//! evaluation crop is `predict`'s code (bit for bit), and a training crop's
//! box comes from the same draws and arithmetic as a canvas batch's
//! (`augment::crop_box`), in the file's own pixels.

use std::path::PathBuf;
use std::sync::mpsc::{Receiver, Sender, SyncSender, channel, sync_channel};
use std::sync::{Arc, OnceLock};

use anyhow::{Context, Result, anyhow};
use rayon::prelude::*;
use tch::{Device, Tensor};

use super::Split;
use super::augment::Transform;
use super::image::{decode_sized, eval_window, recycle, to_luma};
use super::prepared::{Entry, Prepared};
use super::resize::{Filter, Resize, resize_window_into};
use super::resized_crop::{ImageDraws, crop_box};

/// Batches prepared ahead of the one in use.
pub const AHEAD: usize = 3;

/// What the binary lends the data-loading threads from the shim (the
/// library's `data` does not import it): see [`set_loader_hooks`].
#[derive(Clone, Copy)]
pub struct LoaderHooks {
    /// What each decoding thread runs first: `shim::data_worker_setup`
    /// (libtorch's CPU operators there use that thread alone, and batches
    /// are kept out of malloc's heaps).
    pub worker_setup: fn(),
    /// A new uint8 batch of a shape, its bytes written in place by the
    /// function given: `shim::filled_u8` (no copy, memory reused).
    pub new_batch: NewBatch,
}

/// A new uint8 batch of a shape whose bytes the given function writes.
pub type NewBatch = fn(&[i64], &mut dyn FnMut(&mut [u8])) -> Result<Tensor>;

static LOADER_HOOKS: OnceLock<LoaderHooks> = OnceLock::new();

/// Sets the data-loading threads' hooks (once per process); without them
/// the threads run as they start and batches are written into a buffer,
/// then copied into their tensor.
pub fn set_loader_hooks(hooks: LoaderHooks) {
    let _ = LOADER_HOOKS.set(hooks);
}

/// A new uint8 batch of `shape` that `fill` writes ([`LoaderHooks::new_batch`]).
fn new_batch(shape: &[i64], fill: &mut dyn FnMut(&mut [u8])) -> Result<Tensor> {
    if let Some(hooks) = LOADER_HOOKS.get() {
        return (hooks.new_batch)(shape, fill);
    }
    let mut bytes = vec![0u8; shape.iter().product::<i64>() as usize];
    fill(&mut bytes);
    Ok(Tensor::from_slice(&bytes).view(shape))
}

/// One image of a streamed split: a file, or an entry of a prepared
/// dataset (`path` then names it in messages).
#[derive(Clone, Debug)]
pub struct Item {
    pub path: PathBuf,
    pub label: i64,
    pub stored: Option<Entry>,
}

impl Item {
    pub fn file(path: PathBuf, label: i64) -> Item {
        Item {
            path,
            label,
            stored: None,
        }
    }
}

/// Why an image is missing from its batch: it could not be read (the
/// batch goes on without it), or the prepared dataset is damaged (the run
/// stops).
enum Missing {
    Unreadable(anyhow::Error),
    Damaged(anyhow::Error),
}

/// A split whose images stay in their files.
#[derive(Clone)]
pub struct Streamed {
    pub items: Arc<Vec<Item>>,
    /// The prepared dataset holding the items' bytes, if they are entries.
    pub store: Option<Arc<Prepared>>,
    /// The evaluation transform's `Resize` (shorter side), 256 for 224.
    pub side: i64,
    /// The filter of every resize (`--interpolation`).
    pub filter: Filter,
    /// Stop on an unreadable image (naming it) instead of skipping it.
    pub strict: bool,
    /// Decoding threads.
    pub workers: usize,
    /// Copy batches through pinned host memory (training on CUDA).
    pub pin: bool,
}

/// One batch to prepare: the split's examples at `indices`, with each
/// image's draws for [`Transform::Random`].
pub struct Job {
    pub indices: Vec<i64>,
    pub draws: Vec<ImageDraws>,
}

/// A prepared batch: the images that could be read, their indices in the
/// split, and the messages of those that could not.
pub struct Loaded {
    pub batch: Split,
    pub kept: Vec<i64>,
    pub skipped: Vec<String>,
}

impl Streamed {
    pub fn len(&self) -> i64 {
        self.items.len() as i64
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The first `n` examples.
    pub fn limit(self, n: Option<i64>) -> Streamed {
        match n {
            Some(n) if n < self.len() => Streamed {
                items: Arc::new(self.items[..n as usize].to_vec()),
                ..self
            },
            _ => self,
        }
    }

    /// Decodes item `i` as far as the resize `header(height, width)`
    /// gives (called first) reads; returns the image and the resize.
    fn decode(
        &self,
        i: usize,
        header: impl FnOnce(i64, i64) -> Resize,
    ) -> Result<(image::RgbImage, Resize), Missing> {
        let header = |h, w| {
            let r = header(h, w);
            (r, r.rows_read())
        };
        let item = &self.items[i];
        match (&self.store, &item.stored) {
            (Some(store), Some(e)) => {
                let bytes = store.bytes(e).map_err(Missing::Damaged)?;
                store
                    .image(e, bytes, &item.path, header)
                    .map_err(Missing::Unreadable)
            }
            _ => decode_sized(&item.path, header).map_err(Missing::Unreadable),
        }
    }

    /// One image, transformed, into `planes` (`3 x s x s`, `s` the
    /// transform's side).
    fn image(
        &self,
        i: usize,
        transform: Transform,
        draws: Option<&ImageDraws>,
        planes: &mut [u8],
    ) -> Result<(), Missing> {
        let (img, resize) = match (transform, draws) {
            (Transform::Square | Transform::Eval { .. }, _) => {
                let size = self.out_side(transform);
                let window = |h, w| {
                    eval_window((h as usize, w as usize), Some(self.side), size).with(self.filter)
                };
                let (img, resize) = self.decode(i, window)?;
                if (resize.keep.2 as i64, resize.keep.3 as i64) != (size, size) {
                    return Err(Missing::Damaged(anyhow!(
                        "a resize to {} is smaller than the crop {size}",
                        self.side
                    )));
                }
                (img, resize)
            }
            (Transform::Squeeze { size, gray }, _) => {
                let (mut img, resize) = self.decode(i, |h, w| {
                    eval_window((h as usize, w as usize), None, size).with(self.filter)
                })?;
                if gray {
                    to_luma(&mut img);
                }
                (img, resize)
            }
            (Transform::Random { size }, Some(d)) => self.decode(i, |h, w| {
                let s = size as usize;
                let [top, left, h, w] = crop_box(d, h, w).map(|v| v as usize);
                Resize {
                    src: (top, left, h, w),
                    out: (s, s),
                    keep: (0, 0, s, s),
                    flip: d.flip,
                    filter: self.filter,
                }
            })?,
            (Transform::Random { .. }, None) => {
                return Err(Missing::Damaged(anyhow!("a random crop without its draws")));
            }
        };
        resize_window_into(img.as_raw(), img.width() as usize, &resize, planes);
        recycle(img);
        Ok(())
    }

    /// The side of the square images `transform` makes.
    fn out_side(&self, transform: Transform) -> i64 {
        match transform {
            Transform::Square => self.side,
            Transform::Eval { size }
            | Transform::Random { size }
            | Transform::Squeeze { size, .. } => size,
        }
    }

    /// The images of `job`, in order, as one batch; an unreadable image is
    /// left out (or, `strict`, ends the batch with its error). Each worker
    /// writes its images into their places in the batch's tensor.
    fn batch(&self, job: &Job, transform: Transform) -> Result<Loaded> {
        let side = self.out_side(transform);
        let per = (3 * side * side) as usize;
        let n = job.indices.len();
        let mut results = Vec::new();
        let images = new_batch(&[n as i64, 3, side, side], &mut |pixels| {
            results = pixels
                .par_chunks_mut(per.max(1))
                .zip(&job.indices)
                .enumerate()
                .map(|(k, (planes, &i))| {
                    self.image(i as usize, transform, job.draws.get(k), planes)
                })
                .collect();
            // Close the gaps of the images left out.
            let ok = results.iter().enumerate().filter(|(_, r)| r.is_ok());
            for (kept, (k, _)) in ok.enumerate() {
                if kept < k {
                    pixels.copy_within(k * per..(k + 1) * per, kept * per);
                }
            }
        })?;
        let (mut labels, mut kept, mut skipped) = (Vec::new(), Vec::new(), Vec::new());
        for (r, &i) in results.into_iter().zip(&job.indices) {
            match r {
                Ok(()) => {
                    labels.push(self.items[i as usize].label);
                    kept.push(i);
                }
                Err(Missing::Damaged(e)) => return Err(e),
                Err(Missing::Unreadable(e)) if self.strict => {
                    return Err(e.context("unreadable image (--strict)"));
                }
                Err(Missing::Unreadable(e)) => skipped.push(format!("{e:#}")),
            }
        }
        let images = images.narrow(0, 0, labels.len() as i64);
        let images = match self.pin {
            true => images.pin_memory(Device::Cuda(0)),
            false => images,
        };
        let batch = Split {
            images,
            labels: Tensor::from_slice(&labels),
            layout: None,
        };
        Ok(Loaded {
            batch,
            kept,
            skipped,
        })
    }
}

/// A thread that prepares the jobs it is given, in the order given, on
/// its own pool of workers, holding at most [`AHEAD`] finished batches.
pub struct Loader {
    jobs: Sender<Job>,
    ready: Receiver<Result<Loaded>>,
    /// Jobs given and not yet taken.
    pub pending: usize,
}

impl Loader {
    pub fn new(data: &Streamed, transform: Transform) -> Result<Self> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(data.workers.max(1))
            .thread_name(|i| format!("vggctl-data-{i}"))
            .start_handler(|_| {
                if let Some(hooks) = LOADER_HOOKS.get() {
                    (hooks.worker_setup)();
                }
            })
            .build()
            .context("starting the data-loading threads")?;
        let (jobs, todo) = channel::<Job>();
        let (done, ready): (SyncSender<Result<Loaded>>, _) = sync_channel(AHEAD);
        let data = data.clone();
        std::thread::Builder::new()
            .name("vggctl-loader".into())
            .spawn(move || {
                for job in todo {
                    let loaded = pool.install(|| data.batch(&job, transform));
                    // The receiver is gone: the epoch or evaluation ended.
                    if done.send(loaded).is_err() {
                        return;
                    }
                }
            })
            .context("starting the data-loading thread")?;
        Ok(Loader {
            jobs,
            ready,
            pending: 0,
        })
    }

    pub fn submit(&mut self, job: Job) {
        // The thread lives as long as `ready`, which this loader holds.
        let _ = self.jobs.send(job);
        self.pending += 1;
    }

    /// The next batch, in the order submitted.
    pub fn take(&mut self) -> Result<Loaded> {
        self.pending = self.pending.saturating_sub(1);
        self.ready
            .recv()
            .map_err(|_| anyhow!("the data-loading thread stopped"))?
    }
}

/// Examples `first..first + n` of a streamed split in batches of `batch`,
/// in order, through `transform`; counts what it skipped.
pub struct InOrder {
    loader: Loader,
    end: i64,
    batch: i64,
    next_job: i64,
    pub skipped: Vec<String>,
    /// The indices of the last batch's images.
    pub last: Vec<i64>,
}

impl InOrder {
    pub fn new(data: &Streamed, first: i64, n: i64, batch: i64, t: Transform) -> Result<Self> {
        Ok(InOrder {
            loader: Loader::new(data, t)?,
            end: first + n,
            batch,
            next_job: first,
            skipped: Vec::new(),
            last: Vec::new(),
        })
    }

    /// The next batch, or None after the last.
    pub fn next_batch(&mut self) -> Result<Option<Split>> {
        while self.loader.pending <= AHEAD && self.next_job < self.end {
            let len = self.batch.min(self.end - self.next_job);
            self.loader.submit(Job {
                indices: (self.next_job..self.next_job + len).collect(),
                draws: Vec::new(),
            });
            self.next_job += len;
        }
        if self.loader.pending == 0 {
            return Ok(None);
        }
        let loaded = self.loader.take()?;
        self.skipped.extend(loaded.skipped);
        self.last = loaded.kept;
        Ok(Some(loaded.batch))
    }
}
