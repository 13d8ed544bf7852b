//! The training loop (`train_one_epoch`, `evaluate`, `fit`): the CIFAR recipe
//! on a device-resident dataset, with checkpoints that resume exactly.
//!
//! Exact resume comes from the randomness being a function of the position:
//! each epoch's permutation is drawn after seeding with (seed, epoch), and
//! each step's augmentation and dropout after seeding with (seed, epoch, step).
//! A run restarted at any step therefore draws exactly what the uninterrupted
//! run drew.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Reduction, Tensor};

use crate::Interrupted;
use crate::amp::{LossScaler, Precision, Resolved, resolve};
use crate::checkpoint::{ModelMeta, save_model};
use crate::data::augment::{Augment, Normalizer, Preprocess};
use crate::data::{Dataset, Split};
use crate::fsutil::write_atomic_bytes;
use crate::model::{ModelSpec, Vgg};
use crate::optim::{Optimizer, OptimizerConfig};
use crate::shim::{self, CudaGraph};
use crate::weights::{read_safetensors, write_safetensors};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SchedulerKind {
    Multistep,
    Cosine,
}

/// Every resolved option of a training run (written to `config.json`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainConfig {
    pub model: ModelSpec,
    pub dataset: String,
    pub data_dir: String,
    /// Image folders: the validation folder, or the fraction held out.
    pub val_dir: Option<String>,
    pub val_split: f64,
    pub epochs: usize,
    pub batch_size: i64,
    pub test_batch_size: i64,
    pub optimizer: OptimizerConfig,
    pub lr: f64,
    pub scheduler: SchedulerKind,
    pub milestones: Vec<usize>,
    pub gamma: f64,
    pub warmup_epochs: usize,
    pub label_smoothing: f64,
    pub seed: u64,
    pub limit_train: Option<i64>,
    pub limit_test: Option<i64>,
    pub device: String,
    pub out: PathBuf,
    /// Side of the (square) model input.
    pub input_size: i64,
    pub augment: Augment,
    /// Normalize with ImageNet's mean/std (fine-tuning) instead of the dataset's.
    pub imagenet_normalization: bool,
    /// Modules of `features` that are frozen (not trained, BatchNorm in eval
    /// mode): 0 trains everything.
    pub freeze_prefix: usize,
    /// Where the starting weights came from (fine-tuning), if not from scratch.
    pub weights: Option<String>,
    /// Requested precision; what ran is each epoch's `ran_as` in `metrics.jsonl`.
    #[serde(default = "default_precision")]
    pub precision: Precision,
    /// Capture the full-batch training step in a CUDA graph and replay it.
    #[serde(default)]
    pub cuda_graphs: bool,
    /// NHWC memory layout for inputs and convolution weights.
    #[serde(default)]
    pub channels_last: bool,
    /// One flat parameter buffer and one multi-tensor update (see optim.rs).
    #[serde(default = "default_true")]
    pub fused: bool,
    /// Time the parts of each step (synchronizing the device) and report them.
    #[serde(default)]
    pub profile: bool,
}

fn default_precision() -> Precision {
    Precision::Auto
}

fn default_true() -> bool {
    true
}

impl TrainConfig {
    /// The learning rate of `epoch` (0-based): linear warm-up, then
    /// MultiStepLR or cosine annealing, each a pure function of the epoch
    /// (PyTorch's schedulers stepped once per epoch).
    pub fn lr_at(&self, epoch: usize) -> f64 {
        if epoch < self.warmup_epochs {
            return self.lr * (epoch + 1) as f64 / self.warmup_epochs as f64;
        }
        match self.scheduler {
            SchedulerKind::Multistep => {
                let passed = self.milestones.iter().filter(|&&m| epoch >= m).count();
                self.lr * self.gamma.powi(passed as i32)
            }
            SchedulerKind::Cosine => {
                let span = (self.epochs - self.warmup_epochs).max(1) as f64;
                let t = (epoch - self.warmup_epochs) as f64;
                self.lr * 0.5 * (1.0 + (std::f64::consts::PI * t / span).cos())
            }
        }
    }
}

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EpochMetrics {
    /// 1-based.
    pub epoch: usize,
    pub lr: f64,
    pub train_loss: f64,
    pub train_acc: f64,
    pub test_loss: f64,
    pub test_top1: f64,
    pub test_top5: f64,
    pub images_per_s: f64,
    pub seconds: f64,
    /// With `--profile`: where the training steps' time went.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<StepProfile>,
    /// fp16: steps skipped for non-finite gradients so far, and the loss scale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<f64>,
    /// What the epoch ran as: precision, layout, CUDA graphs.
    #[serde(default)]
    pub ran_as: String,
    /// CUDA: the most memory tensors held during the epoch (training and evaluation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_gpu_bytes: Option<i64>,
}

/// Running sums of the epoch in progress (saved on interrupt).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Partial {
    pub loss_sum: f64,
    pub correct: i64,
    pub seen: i64,
    pub seconds: f64,
}

/// Where a run stands; with the weights and optimizer state it is a resume point.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    pub config: TrainConfig,
    pub class_names: Vec<String>,
    pub mean: [f64; 3],
    pub std: [f64; 3],
    /// 0-based epoch in progress, and batches of it already done.
    pub epoch: usize,
    pub step: usize,
    pub partial: Partial,
    pub optimizer_steps: i64,
    /// fp16 loss scaling state, so a resumed run scales as the original would.
    #[serde(default)]
    pub scaler: Option<LossScaler>,
    pub best_top1: Option<f64>,
    pub history: Vec<EpochMetrics>,
}

/// What a finished run reports.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainSummary {
    pub out: PathBuf,
    pub epochs: usize,
    pub final_metrics: Option<EpochMetrics>,
    pub best_top1: Option<f64>,
    pub last: PathBuf,
    pub best: PathBuf,
}

/// Hooks for whoever shows progress (the CLI's bars and lines).
pub trait Observer {
    fn epoch_start(&mut self, _epoch: usize, _epochs: usize, _steps: usize, _done: usize) {}
    fn progress(&mut self, _step: usize, _loss: f64, _acc: f64, _images_per_s: f64) {}
    fn epoch_end(&mut self, _m: &EpochMetrics) {}
}

pub struct Silent;
impl Observer for Silent {}

/// Full evaluation of a model on a split.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EvalResult {
    pub images: i64,
    pub loss: f64,
    pub top1: f64,
    pub top5: f64,
    pub per_class: Vec<f64>,
    /// `confusion[true][predicted]`.
    pub confusion: Vec<Vec<i64>>,
    /// Throughput after the first batch (which pays for cuDNN's algorithm
    /// search), preprocessing included.
    #[serde(default)]
    pub images_per_s: f64,
}

/// The split on the device: uint8 images, their canvas layout (image
/// folders) and int64 labels, moved once.
pub struct DeviceSplit {
    pub images: Tensor,
    pub labels: Tensor,
    pub layout: Option<Tensor>,
}

/// A batch of a [`DeviceSplit`].
struct Batch {
    x: Tensor,
    layout: Option<Tensor>,
    y: Tensor,
}

impl Batch {
    fn copy(&self) -> Batch {
        Batch {
            x: self.x.copy(),
            layout: self.layout.as_ref().map(Tensor::copy),
            y: self.y.copy(),
        }
    }

    /// Writes `from` into this batch's tensors (a graph's static input).
    fn fill(&mut self, from: &Batch) {
        self.x.copy_(&from.x);
        if let (Some(l), Some(f)) = (&mut self.layout, &from.layout) {
            l.copy_(f);
        }
        self.y.copy_(&from.y);
    }
}

impl DeviceSplit {
    pub fn new(split: &Split, device: Device) -> Self {
        DeviceSplit {
            images: split.images.to_device(device),
            labels: split.labels.to_device(device),
            layout: split.layout.as_ref().map(|l| l.to_device(device)),
        }
    }

    /// Examples `start..start + len`.
    fn narrow(&self, start: i64, len: i64) -> Batch {
        Batch {
            x: self.images.narrow(0, start, len),
            layout: self.layout.as_ref().map(|l| l.narrow(0, start, len)),
            y: self.labels.narrow(0, start, len),
        }
    }

    /// The examples at `idx`.
    fn select(&self, idx: &Tensor) -> Batch {
        Batch {
            x: self.images.index_select(0, idx),
            layout: self.layout.as_ref().map(|l| l.index_select(0, idx)),
            y: self.labels.index_select(0, idx),
        }
    }

    pub fn len(&self) -> i64 {
        self.labels.size()[0]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A seed for libtorch's generator from (seed, epoch, step), well mixed so
/// that neighbouring positions get unrelated streams (splitmix64).
pub fn position_seed(seed: u64, epoch: usize, step: usize) -> i64 {
    let mut z = seed
        ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (step as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) >> 1) as i64
}

const PERMUTATION_STEP: usize = usize::MAX;

/// Running sums of an evaluation, on the device: summed loss, top-5 hits,
/// and the confusion counts (`true * classes + predicted`).
struct EvalSums {
    loss: Tensor,
    top5: Tensor,
    confusion: Tensor,
}

impl EvalSums {
    fn new(classes: i64, dev: Device) -> Self {
        EvalSums {
            loss: Tensor::zeros([], (Kind::Double, dev)),
            top5: Tensor::zeros([], (Kind::Int64, dev)),
            confusion: Tensor::zeros([classes * classes], (Kind::Int64, dev)),
        }
    }

    fn zero(&mut self) {
        let _ = self.loss.zero_();
        let _ = self.top5.zero_();
        let _ = self.confusion.zero_();
    }

    /// Adds one uint8 batch's figures: device work only, in place, no host
    /// synchronization (so a CUDA graph can capture it).
    fn add(&mut self, model: &Vgg, pre: &Preprocess, batch: &Batch) {
        let classes = model.spec.classes;
        let y = &batch.y;
        let logits = pre.logits(model, &batch.x, batch.layout.as_ref(), false);
        let loss = logits.cross_entropy_loss::<Tensor>(y, None, Reduction::Sum, -100, 0.0);
        self.loss += loss.to_kind(Kind::Double);
        let pred = logits.argmax(-1, false);
        // index_add_, not bincount: bincount's output size is read on the host.
        let cell = y * classes + &pred;
        let _ = self
            .confusion
            .index_add_(0, &cell, &pred.ones_like().to_kind(Kind::Int64));
        let topk = logits.topk(classes.min(5), -1, true, true).1;
        self.top5 += topk
            .eq_tensor(&y.unsqueeze(1))
            .any_dim(1, false)
            .sum(Kind::Int64);
    }
}

/// The evaluation step as a CUDA graph (see [`GraphedStep`] for training):
/// preprocessing, forward and the sums on a static full batch; a partial
/// last batch runs eagerly into the same sums.
pub struct EvalGraph {
    graph: CudaGraph,
    /// The static input batch, and the sums the graph adds into.
    io: Option<Batch>,
    sums: EvalSums,
}

impl EvalGraph {
    pub fn new(model: &Vgg) -> Result<Self> {
        let dev = model.device();
        Ok(EvalGraph {
            graph: CudaGraph::new(dev)?,
            io: None,
            sums: EvalSums::new(model.spec.classes, dev),
        })
    }

    fn batch(&mut self, model: &Vgg, pre: &Preprocess, batch: &Batch) -> Result<()> {
        let sums = &mut self.sums;
        if self.graph.warming_up() {
            return self.graph.on_side_stream(|_| {
                sums.add(model, pre, batch);
                Ok(())
            });
        }
        match &mut self.io {
            Some(io) => io.fill(batch),
            None => {
                let io = batch.copy();
                self.graph
                    .on_side_stream(|g| g.capture(|| sums.add(model, pre, &io)))?;
                self.io = Some(io);
            }
        }
        self.graph.replay()
    }
}

/// Loss, top-1/top-5, per-class accuracy and the confusion matrix of
/// `model` on `data`, in `pre`'s precision and layout; full batches through
/// a CUDA graph when one is given.
pub fn evaluate(
    model: &Vgg,
    data: &DeviceSplit,
    batch: i64,
    pre: &Preprocess,
    mut graph: Option<&mut EvalGraph>,
) -> Result<EvalResult> {
    let classes = model.spec.classes;
    let n = data.len();
    let dev = data.images.device();
    tch::no_grad(|| {
        let mut own = EvalSums::new(classes, dev);
        if let Some(g) = graph.as_mut() {
            g.sums.zero();
        }
        let mut start = 0;
        let mut clock: Option<(Instant, i64)> = None;
        while start < n {
            if start > 0 && clock.is_none() {
                sync(dev);
                clock = Some((Instant::now(), start));
            }
            let len = batch.min(n - start);
            let b = data.narrow(start, len);
            match graph.as_mut() {
                Some(g) if len == batch => g.batch(model, pre, &b)?,
                Some(g) => g.sums.add(model, pre, &b),
                None => own.add(model, pre, &b),
            }
            start += len;
        }
        let sums = graph.map_or(&own, |g| &g.sums);
        let confusion: Vec<i64> =
            Vec::<i64>::try_from(sums.confusion.to_device(Device::Cpu)).unwrap_or_default();
        let images_per_s = match clock {
            Some((t, from)) => (n - from) as f64 / t.elapsed().as_secs_f64().max(1e-9),
            None => 0.0,
        };
        let rows: Vec<Vec<i64>> = confusion
            .chunks(classes as usize)
            .map(|r| r.to_vec())
            .collect();
        let correct: i64 = (0..classes as usize).map(|c| rows[c][c]).sum();
        let per_class = rows
            .iter()
            .enumerate()
            .map(|(c, r)| {
                let total: i64 = r.iter().sum();
                if total == 0 {
                    0.0
                } else {
                    100.0 * r[c] as f64 / total as f64
                }
            })
            .collect();
        let nf = n.max(1) as f64;
        Ok(EvalResult {
            images: n,
            loss: sums.loss.double_value(&[]) / nf,
            top1: 100.0 * correct as f64 / nf,
            top5: 100.0 * sums.top5.int64_value(&[]) as f64 / nf,
            per_class,
            confusion: rows,
            images_per_s,
        })
    })
}

/// The files a run writes into its output directory.
pub struct RunFiles {
    pub dir: PathBuf,
}

impl RunFiles {
    pub fn config(&self) -> PathBuf {
        self.dir.join("config.json")
    }
    pub fn metrics(&self) -> PathBuf {
        self.dir.join("metrics.jsonl")
    }
    pub fn last(&self) -> PathBuf {
        self.dir.join("last.safetensors")
    }
    pub fn best(&self) -> PathBuf {
        self.dir.join("best.safetensors")
    }
    pub fn resume(&self) -> PathBuf {
        self.dir.join("resume.safetensors")
    }
    pub fn curves(&self) -> PathBuf {
        self.dir.join("curves.svg")
    }
}

const STATE_KEY: &str = "vggctl_train_state";

/// Reads a resume point: `resume.safetensors` or the run directory holding it.
pub fn read_resume(path: &Path) -> Result<(TrainState, BTreeMap<String, Tensor>)> {
    let file = if path.is_dir() {
        path.join("resume.safetensors")
    } else {
        path.to_path_buf()
    };
    let sd = read_safetensors(&file)?;
    let state = sd.metadata.get(STATE_KEY).ok_or_else(|| {
        anyhow!(
            "{}: not a resume checkpoint (use the run's resume.safetensors; last/best.safetensors hold weights only)",
            file.display()
        )
    })?;
    let state: TrainState = serde_json::from_str(state)
        .with_context(|| format!("{}: unreadable training state", file.display()))?;
    Ok((state, sd.tensors))
}

/// Seconds spent in each part of the training steps of an epoch (`--profile`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct StepProfile {
    pub steps: u64,
    /// Gathering the batch, augmentation, layout.
    pub data: f64,
    /// Forward pass and loss.
    pub forward: f64,
    /// Backward pass.
    #[serde(default)]
    pub backward: f64,
    /// Optimizer update.
    #[serde(default)]
    pub update: f64,
    /// Steps run as one CUDA graph replay (forward, backward and update
    /// together), and their time.
    #[serde(default)]
    pub graphed_steps: u64,
    #[serde(default)]
    pub graphed: f64,
}

/// Waits for the device's queued work (a no-op on the CPU).
fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Times the parts of a step when profiling; each lap synchronizes the
/// device so the time is the work's, not the launch's.
struct StepTimer {
    on: bool,
    device: Device,
    at: Instant,
}

impl StepTimer {
    fn start(on: bool, device: Device) -> Self {
        let t = StepTimer {
            on,
            device,
            at: Instant::now(),
        };
        t.sync();
        StepTimer {
            at: Instant::now(),
            ..t
        }
    }

    fn sync(&self) {
        if self.on {
            sync(self.device);
        }
    }

    fn lap(self, into: &mut f64) -> Self {
        if !self.on {
            return self;
        }
        self.sync();
        *into += self.at.elapsed().as_secs_f64();
        StepTimer {
            at: Instant::now(),
            ..self
        }
    }
}

/// Removes temporary files that a killed run left mid-write (their
/// checkpoints were never renamed into place, so nothing refers to them).
fn remove_stale_temp_files(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && name.contains(".tmp-") {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Everything a training run holds.
pub struct Trainer<'a> {
    pub state: TrainState,
    pub model: Vgg,
    opt: Optimizer,
    train: DeviceSplit,
    test: DeviceSplit,
    pre: Preprocess,
    run: Resolved,
    graph: Option<GraphedStep>,
    eval_graph: Option<EvalGraph>,
    profile: StepProfile,
    files: RunFiles,
    stop: &'a AtomicBool,
}

/// The full-batch training step as a CUDA graph: forward, loss, backward and
/// the fused update, replayed on static input and output tensors. The
/// learning rate and step number are device tensors the optimizer fills
/// before each replay; the data pipeline stays eager (its randomness is
/// seeded per step, so a resumed run replays the same batches).
struct GraphedStep {
    graph: CudaGraph,
    /// Static tensors, set at the capture.
    io: Option<GraphIo>,
    /// What one replay adds to each BatchNorm's `num_batches_tracked`.
    bn_delta: Vec<i64>,
}

struct GraphIo {
    x: Tensor,
    y: Tensor,
    loss: Tensor,
    correct: Tensor,
}

impl<'a> Trainer<'a> {
    /// A new run (`resume` None) or the continuation of a saved one.
    pub fn new(
        config: TrainConfig,
        data: &Dataset,
        model: Vgg,
        resume: Option<(TrainState, BTreeMap<String, Tensor>)>,
        stop: &'a AtomicBool,
    ) -> Result<Self> {
        let device = model.device();
        let train = DeviceSplit::new(&data.train, device);
        let test = DeviceSplit::new(&data.test, device);
        if train.is_empty() || test.is_empty() {
            bail!(
                "{}: the training and test splits must both hold images",
                data.source
            );
        }
        let mut pre = Preprocess::plain(
            config.augment,
            config.input_size,
            Normalizer::new(data.mean, data.std, device),
        );
        let files = RunFiles {
            dir: config.out.clone(),
        };
        let mut model = model;
        model.freeze_features(config.freeze_prefix);
        let mut state = TrainState {
            config: config.clone(),
            class_names: data.classes.clone(),
            mean: data.mean,
            std: data.std,
            epoch: 0,
            step: 0,
            partial: Partial::default(),
            optimizer_steps: 0,
            scaler: None,
            best_top1: None,
            history: Vec::new(),
        };
        let resume_tensors = match resume {
            Some((saved, tensors)) => {
                let source = files.resume().display().to_string();
                let weights: BTreeMap<String, Tensor> = tensors
                    .iter()
                    .filter(|(k, _)| !k.starts_with("optimizer."))
                    .map(|(k, v)| (k.clone(), v.shallow_clone()))
                    .collect();
                model.load_state_dict(&source, &weights)?;
                state = TrainState { config, ..saved };
                Some((source, tensors))
            }
            None => None,
        };
        crate::amp::autotune_cudnn(device);
        let run = resolve(
            state.config.precision,
            state.config.channels_last,
            device,
            "training",
            &mut |w| eprintln!("warning: {w}"),
        );
        let ocfg = state.config.optimizer.clone();
        let mut opt = if state.config.fused || run.precision == Precision::Fp16 {
            let flat = model.flatten_trainable(run.channels_last);
            Optimizer::fused(ocfg, model.trainable_parameters(), flat)
        } else {
            if run.channels_last {
                model.to_channels_last();
            }
            Optimizer::new(ocfg, model.trainable_parameters())
        };
        pre.channels_last = run.channels_last;
        pre.autocast = run.precision.autocast();
        let graph = if !state.config.cuda_graphs {
            None
        } else if !device.is_cuda() {
            eprintln!("warning: --cuda-graphs needs a CUDA device; running eagerly");
            None
        } else if !opt.is_fused() {
            // The per-parameter update accumulates into .grad.
            eprintln!(
                "warning: --cuda-graphs needs the fused update (not --no-fused); running eagerly"
            );
            None
        } else {
            Some(GraphedStep {
                graph: CudaGraph::new(device)?,
                io: None,
                bn_delta: Vec::new(),
            })
        };
        let eval_graph = match graph {
            Some(_) => Some(EvalGraph::new(&model)?),
            None => None,
        };
        if let Some((source, tensors)) = resume_tensors {
            opt.load_state(&source, &tensors, state.optimizer_steps)?;
        }
        if run.precision == Precision::Fp16 {
            opt.enable_loss_scaling(state.scaler.get_or_insert_with(LossScaler::default));
        }
        Ok(Trainer {
            state,
            model,
            opt,
            train,
            test,
            pre,
            run,
            graph,
            eval_graph,
            profile: StepProfile::default(),
            files,
            stop,
        })
    }

    fn meta(&self, epoch: usize, accuracy: Option<f64>) -> ModelMeta {
        let c = &self.state.config;
        ModelMeta {
            arch: c.model.arch,
            bn: c.model.bn,
            head: c.model.head,
            classes: c.model.classes,
            class_names: self.state.class_names.clone(),
            mean: self.state.mean,
            std: self.state.std,
            input_size: c.input_size,
            dataset: c.dataset.clone(),
            resize: match c.augment {
                Augment::ResizedCrop => Some(c.input_size * 256 / 224),
                Augment::CropFlip { .. } => None,
            },
            epoch,
            accuracy,
        }
    }

    /// Writes the resume point: weights, optimizer state and `TrainState`, in one file.
    fn save_resume(&self) -> Result<()> {
        let mut tensors = self.model.state_dict();
        tensors.extend(self.opt.state_tensors());
        let mut meta = self
            .meta(
                self.state.history.len(),
                self.state.history.last().map(|m| m.test_top1),
            )
            .to_metadata();
        let mut state = self.state.clone();
        state.optimizer_steps = self.opt.steps();
        if let Some(scaler) = self.opt.loss_scaler() {
            state.scaler = Some(scaler);
        }
        meta.insert(STATE_KEY.into(), serde_json::to_string(&state)?);
        write_safetensors(&self.files.resume(), &tensors, &meta)
    }

    fn write_metrics(&self) -> Result<()> {
        let mut text = String::new();
        for m in &self.state.history {
            text += &serde_json::to_string(m)?;
            text.push('\n');
        }
        write_atomic_bytes(&self.files.metrics(), text.as_bytes())
    }

    /// Trains until `config.epochs`, or until Ctrl-C (then `Interrupted`).
    pub fn fit(&mut self, obs: &mut dyn Observer) -> Result<TrainSummary> {
        std::fs::create_dir_all(&self.files.dir)
            .with_context(|| format!("creating {}", self.files.dir.display()))?;
        remove_stale_temp_files(&self.files.dir);
        write_atomic_bytes(
            &self.files.config(),
            serde_json::to_string_pretty(&self.state.config)?.as_bytes(),
        )?;
        let device = self.model.device();
        while self.state.epoch < self.state.config.epochs {
            shim::peak_memory(device, true)?;
            self.train_one_epoch(obs)?;
            let epoch = self.state.epoch;
            let eval = evaluate(
                &self.model,
                &self.test,
                self.state.config.test_batch_size,
                &self.pre,
                self.eval_graph.as_mut(),
            )?;
            let p = &self.state.partial;
            let m = EpochMetrics {
                epoch: epoch + 1,
                lr: self.state.config.lr_at(epoch),
                train_loss: p.loss_sum / p.seen.max(1) as f64,
                train_acc: 100.0 * p.correct as f64 / p.seen.max(1) as f64,
                test_loss: eval.loss,
                test_top1: eval.top1,
                test_top5: eval.top5,
                images_per_s: p.seen as f64 / p.seconds.max(1e-9),
                seconds: p.seconds,
                profile: self
                    .state
                    .config
                    .profile
                    .then(|| std::mem::take(&mut self.profile)),
                loss_scale: self.opt.loss_scaler().map(|s| s.scale),
                ran_as: self.ran_as(),
                peak_gpu_bytes: shim::peak_memory(device, false)?,
            };
            self.state.history.push(m.clone());
            self.state.epoch += 1;
            self.state.step = 0;
            self.state.partial = Partial::default();
            let meta = self.meta(epoch + 1, Some(m.test_top1));
            save_model(&self.files.last(), &self.model, &meta)?;
            if self.state.best_top1.is_none_or(|b| m.test_top1 > b) {
                self.state.best_top1 = Some(m.test_top1);
                save_model(&self.files.best(), &self.model, &meta)?;
            }
            self.save_resume()?;
            self.write_metrics()?;
            if let Err(e) = crate::plot::curves(&self.files.curves(), &self.state.history) {
                // A plot is a convenience; its failure must not end a run.
                eprintln!(
                    "warning: could not draw {}: {e:#}",
                    self.files.curves().display()
                );
            }
            obs.epoch_end(&m);
        }
        Ok(TrainSummary {
            out: self.files.dir.clone(),
            epochs: self.state.history.len(),
            final_metrics: self.state.history.last().cloned(),
            best_top1: self.state.best_top1,
            last: self.files.last(),
            best: self.files.best(),
        })
    }

    fn train_one_epoch(&mut self, obs: &mut dyn Observer) -> Result<()> {
        let cfg = self.state.config.clone();
        let epoch = self.state.epoch;
        let lr = cfg.lr_at(epoch);
        let n = self.train.len();
        let b = cfg.batch_size;
        let steps = ((n + b - 1) / b) as usize;
        let dev = self.train.images.device();
        tch::manual_seed(position_seed(cfg.seed, epoch, PERMUTATION_STEP));
        let perm = Tensor::randperm(n, (Kind::Int64, dev));
        obs.epoch_start(epoch + 1, cfg.epochs, steps, self.state.step);

        // Losses and correct counts stay on the device and are read every
        // few steps: a read is a host-device synchronization.
        let report_every = if dev == Device::Cpu { 1 } else { 25 };
        let mut pending: Vec<(usize, Tensor, Tensor, i64)> = Vec::new();
        let mut clock = Instant::now();
        while self.state.step < steps {
            let step = self.state.step;
            if self.stop.load(Ordering::SeqCst) {
                self.save_resume()?;
                return Err(Interrupted(format!(
                    "interrupted at epoch {}, step {step}; resume with --resume {}",
                    epoch + 1,
                    self.files.resume().display()
                ))
                .into());
            }
            tch::manual_seed(position_seed(cfg.seed, epoch, step));
            let start = step as i64 * b;
            let len = b.min(n - start);
            let idx = perm.narrow(0, start, len);
            let Batch { x, layout, y } = self.train.select(&idx);
            let timer = StepTimer::start(cfg.profile, dev);
            let x = self.pre.model_input(&x, layout.as_ref(), true);
            let timer = timer.lap(&mut self.profile.data);
            let (loss, correct) = match self.graph.take() {
                Some(mut g) if len == b => {
                    let out = self.graphed_step(&mut g, &x, &y, lr);
                    self.graph = Some(g);
                    let out = out?;
                    timer.lap(&mut self.profile.graphed);
                    self.profile.graphed_steps += 1;
                    out
                }
                g => {
                    // The last, partial batch runs eagerly.
                    self.graph = g;
                    self.eager_step(&x, &y, lr, Some(timer))?
                }
            };
            self.profile.steps += 1;
            pending.push((step, loss, correct, len));
            self.state.step += 1;
            if pending.len() >= report_every || self.state.step == steps {
                self.flush(&mut pending, epoch, &mut clock)?;
                let p = &self.state.partial;
                obs.progress(
                    self.state.step,
                    p.loss_sum / p.seen.max(1) as f64,
                    100.0 * p.correct as f64 / p.seen.max(1) as f64,
                    p.seen as f64 / p.seconds.max(1e-9),
                );
            }
        }
        Ok(())
    }

    /// One training step, op by op: forward, loss, backward, update. Returns
    /// the loss and the number of correct predictions (on the device).
    fn eager_step(
        &mut self,
        x: &Tensor,
        y: &Tensor,
        lr: f64,
        timer: Option<StepTimer>,
    ) -> Result<(Tensor, Tensor)> {
        let logits = self.pre.forward(&self.model, x, true);
        let loss = logits.cross_entropy_loss::<Tensor>(
            y,
            None,
            Reduction::Mean,
            -100,
            self.state.config.label_smoothing,
        );
        let timer = timer.map(|t| t.lap(&mut self.profile.forward));
        self.opt.prepare(lr);
        let grads = self.opt.backward(&loss);
        let timer = timer.map(|t| t.lap(&mut self.profile.backward));
        self.opt.update(grads)?;
        if let Some(t) = timer {
            t.lap(&mut self.profile.update);
        }
        let correct = logits.argmax(-1, false).eq_tensor(y).sum(Kind::Int64);
        Ok((loss.detach(), correct))
    }

    /// A full-batch step through the CUDA graph: a few eager warm-up steps
    /// on the graph's stream, then one capture (which records without
    /// running), then a replay per step, the captured one included.
    fn graphed_step(
        &mut self,
        g: &mut GraphedStep,
        x: &Tensor,
        y: &Tensor,
        lr: f64,
    ) -> Result<(Tensor, Tensor)> {
        if g.graph.warming_up() {
            return g.graph.on_side_stream(|_| self.eager_step(x, y, lr, None));
        }
        self.opt.prepare(lr);
        match &mut g.io {
            Some(io) => {
                io.x.copy_(x);
                io.y.copy_(y);
                self.model.add_batches_tracked(&g.bn_delta);
            }
            None => {
                let (sx, sy) = (x.copy(), y.copy());
                let before: Vec<i64> = self.counts();
                let smoothing = self.state.config.label_smoothing;
                let (model, pre, opt) = (&self.model, &self.pre, &mut self.opt);
                let (loss, correct) = g.graph.on_side_stream(|graph| {
                    let out = graph.capture(|| {
                        let logits = pre.forward(model, &sx, true);
                        let loss = logits.cross_entropy_loss::<Tensor>(
                            &sy,
                            None,
                            Reduction::Mean,
                            -100,
                            smoothing,
                        );
                        opt.backward_update(&loss)?;
                        let correct = logits.argmax(-1, false).eq_tensor(&sy).sum(Kind::Int64);
                        Ok((loss.detach(), correct))
                    });
                    out.and_then(|step| step)
                })?;
                g.bn_delta = self
                    .counts()
                    .iter()
                    .zip(&before)
                    .map(|(a, b)| a - b)
                    .collect();
                g.io = Some(GraphIo {
                    x: sx,
                    y: sy,
                    loss,
                    correct,
                });
            }
        }
        g.graph.replay()?;
        let io = g.io.as_ref().expect("set above");
        // The outputs are overwritten by the next replay.
        Ok((io.loss.copy(), io.correct.copy()))
    }

    fn counts(&self) -> Vec<i64> {
        self.model
            .num_batches_tracked()
            .into_iter()
            .map(|(_, n)| n)
            .collect()
    }

    /// What this run computes with, for `metrics.jsonl` and the log.
    pub fn ran_as(&self) -> String {
        let mut parts = vec![self.run.precision.name().to_string()];
        if self.run.channels_last {
            parts.push("channels_last".into());
        }
        if self.opt.is_fused() {
            parts.push("fused update".into());
        }
        if self.graph.is_some() {
            parts.push("CUDA graph".into());
        }
        parts.join(", ")
    }

    /// Reads the pending per-step values, stops on a non-finite loss (naming
    /// its epoch and step), and adds them to the epoch's sums.
    fn flush(
        &mut self,
        pending: &mut Vec<(usize, Tensor, Tensor, i64)>,
        epoch: usize,
        clock: &mut Instant,
    ) -> Result<()> {
        let losses = Tensor::stack(
            &pending
                .iter()
                .map(|p| p.1.to_kind(Kind::Double))
                .collect::<Vec<_>>(),
            0,
        );
        let corrects = Tensor::stack(&pending.iter().map(|p| &p.2).collect::<Vec<_>>(), 0);
        let losses: Vec<f64> = Vec::try_from(losses.to_device(Device::Cpu))?;
        let corrects: Vec<i64> = Vec::try_from(corrects.to_device(Device::Cpu))?;
        self.state.partial.seconds += clock.elapsed().as_secs_f64();
        *clock = Instant::now();
        for ((step, _, _, len), (loss, correct)) in pending.iter().zip(losses.iter().zip(corrects))
        {
            if !loss.is_finite() {
                bail!(
                    "loss became {loss} at epoch {}, step {}; stopped without saving (the last good checkpoint is {})",
                    epoch + 1,
                    step + 1,
                    self.files.last().display()
                );
            }
            self.state.partial.loss_sum += loss * *len as f64;
            self.state.partial.correct += correct;
            self.state.partial.seen += len;
        }
        pending.clear();
        Ok(())
    }
}
