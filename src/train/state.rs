//! Where a run stands: one record per finished epoch (`metrics.jsonl`), the
//! sums of the epoch in progress, the resume state saved with the weights,
//! and what a finished run reports.

use std::path::PathBuf;

use crate::choice::Choice;
use crate::num::Num;
use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

use super::config::{SchedulerKind, TrainConfig};
use super::profile::StepProfile;
use crate::checkpoint::ModelMeta;
use crate::data::augment::Augment;
use crate::data::auto_augment::{AUGMIX_BINS, RA_BINS};
use crate::dist::sampler::MAX_REPEATS;
use crate::optim::LossScaler;

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
    /// The validation images evaluated (0 in files written before it was).
    #[serde(default)]
    pub test_images: i64,
    /// `--model-ema`: the moving average's validation figures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ema: Option<EmaMetrics>,
    /// `--swa-start`, the run's last epoch: the weight average's figures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swa: Option<EmaMetrics>,
    pub images_per_s: f64,
    pub seconds: f64,
    /// With `--profile`: where the training steps' time went.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<StepProfile>,
    /// fp16: the loss scale at the end of the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<f64>,
    /// What the epoch ran as: precision, layout, CUDA graphs.
    #[serde(default)]
    pub ran_as: String,
    /// CUDA: the most memory tensors held during the epoch (training and evaluation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_gpu_bytes: Option<i64>,
}

/// The validation figures of an average of the weights (`--model-ema`'s,
/// `--swa-start`'s).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EmaMetrics {
    pub loss: f64,
    pub top1: f64,
    pub top5: f64,
}

/// Running sums of the epoch in progress (saved on interrupt).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Partial {
    pub loss_sum: f64,
    pub correct: i64,
    pub seen: i64,
    pub seconds: f64,
}

impl EpochMetrics {
    /// The validation top-1's 95 % Wilson interval, in percent (None where
    /// the count of images was not recorded).
    pub fn top1_interval(&self) -> Option<[f64; 2]> {
        let n = self.test_images as f64;
        (self.test_images > 0).then(|| {
            let k = (self.test_top1 * n / 100.0).round();
            crate::eval::wilson_interval(k, n).map(|v| 100.0 * v)
        })
    }
}

impl Partial {
    pub fn mean_loss(&self) -> f64 {
        self.loss_sum / self.seen.max(1) as f64
    }

    pub fn accuracy(&self) -> f64 {
        100.0 * self.correct as f64 / self.seen.max(1) as f64
    }

    pub fn images_per_s(&self) -> f64 {
        self.seen as f64 / self.seconds.max(1e-9)
    }
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
    /// Drawn when the run starts: tells this run's resume points from
    /// another's in the same directory.
    #[serde(default)]
    pub run_id: u64,
    /// At an epoch's end: the resume point whose weights `last.safetensors`
    /// holds (the resume file then holds none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights_in_last: Option<String>,
    /// `--model-ema`: how many updates the average has had.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ema_averaged: Option<i64>,
    /// `--swa-start`: how many epochs' weights the average holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swa_averaged: Option<i64>,
}

impl TrainState {
    /// The learning rate of `epoch` (0-based): the schedule's, which for
    /// ReduceLROnPlateau follows the validation losses of the epochs
    /// before it in `history` (gathered for that scheduler only: this runs
    /// every step).
    pub fn lr_at(&self, epoch: usize) -> f64 {
        self.config.lr_at(epoch, &self.val_losses())
    }

    /// The LR and the cycled momentum (OneCycleLR's) of the `update`-th
    /// optimizer update of the epoch in progress.
    pub fn update_hypers(&self, update: usize) -> (f64, Option<f64>) {
        self.config
            .update_hypers(self.epoch, update, &self.val_losses())
    }

    fn val_losses(&self) -> Vec<f64> {
        match self.config.scheduler {
            SchedulerKind::Plateau => self.history.iter().map(|m| m.test_loss).collect(),
            _ => Vec::new(),
        }
    }

    /// What a saved state must say to be continued: a usable model file's
    /// metadata, at least one epoch and one image per batch, a schedule,
    /// optimizer and recipe torch and the update can run, and a position
    /// inside the run.
    pub fn check(&self) -> Result<()> {
        let c = &self.config;
        self.meta(0, None).check()?;
        check_schedule(c)?;
        check_recipe(c)?;
        if self.epoch > c.epochs {
            bail!("epoch {} is past the run's {} epochs", self.epoch, c.epochs);
        }
        Ok(())
    }

    /// A number no other run draws (std seeds each `RandomState` from the
    /// operating system's random source).
    pub fn new_run_id() -> u64 {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.finish()
    }

    /// This resume point's name: the run and the epochs done.
    pub fn point_id(&self) -> String {
        format!("{:016x}-{}", self.run_id, self.epoch)
    }

    /// The metadata a checkpoint of this run carries after `epoch` epochs,
    /// with its test accuracy then.
    pub fn meta(&self, epoch: usize, accuracy: Option<f64>) -> ModelMeta {
        let c = &self.config;
        ModelMeta {
            arch: c.model.arch,
            bn: c.model.bn,
            head: c.model.head,
            classes: c.model.classes,
            class_names: self.class_names.clone(),
            mean: self.mean,
            std: self.std,
            input_size: c.input_size,
            dataset: c.dataset.clone(),
            resize: match c.augment {
                Augment::ResizedCrop => Some(c.val_resize()),
                Augment::CropFlip { .. } => None,
            },
            interpolation: c.interpolation,
            epoch,
            accuracy,
        }
    }
}

/// The sizes, the learning rate's schedule and the optimizer's values of a
/// saved configuration (what torch.optim and the update can run).
fn check_schedule(c: &TrainConfig) -> Result<()> {
    if c.epochs < 1 || c.batch_size < 1 || c.test_batch_size < 1 {
        bail!(
            "epochs {}, batch_size {} and test_batch_size {} must each be at least 1",
            c.epochs,
            c.batch_size,
            c.test_batch_size
        );
    }
    if !(c.lr > 0.0 && c.lr.is_finite() && c.gamma > 0.0 && c.gamma.is_finite()) {
        bail!(
            "lr {} and gamma {} must be positive and finite",
            Num(c.lr),
            Num(c.gamma)
        );
    }
    if let Some(problem) = c.warmup.and_then(|w| w.problem()) {
        bail!("{problem}");
    }
    if c.scheduler == SchedulerKind::Plateau && !(c.gamma < 1.0 && c.warmup_epochs == 0) {
        bail!(
            "the plateau scheduler takes a gamma below 1 ({}) and no warmup_epochs ({})",
            Num(c.gamma),
            c.warmup_epochs
        );
    }
    check_scheduler_values(c)?;
    if let Some(problem) = c.lr_problem() {
        bail!("{problem}");
    }
    if let Some(problem) = c.optimizer.problem(str::to_string) {
        bail!("{problem}");
    }
    for (name, clip) in [
        ("clip_grad_norm", c.clip_grad_norm),
        ("clip_grad_value", c.clip_grad_value),
    ] {
        if let Some(n) = clip.filter(|n| !(*n > 0.0 && n.is_finite())) {
            bail!("{name} {} must be a positive number", Num(n));
        }
    }
    if c.clip_grad_norm.is_some() && c.clip_grad_value.is_some() {
        bail!("clip_grad_norm and clip_grad_value exclude each other");
    }
    if !(c.lr_min >= 0.0 && c.lr_min.is_finite() && c.step_size >= 1) {
        bail!(
            "lr_min {} must be finite and 0 or more, step_size {} at least 1",
            Num(c.lr_min),
            c.step_size
        );
    }
    Ok(())
}

/// Each scheduler with values of its own (OneCycleLR's, CyclicLR's,
/// the restarts') has them and no other has; those stepped after every
/// update take no warm-up; the values make a schedule.
fn check_scheduler_values(c: &TrainConfig) -> Result<()> {
    use SchedulerKind::*;
    for (kind, has, field, warms_up) in [
        (Onecycle, c.onecycle.is_some(), "onecycle", false),
        (Cyclic, c.cyclic.is_some(), "cyclic", false),
        (CosineRestarts, c.restarts.is_some(), "restarts", true),
    ] {
        let this = c.scheduler == kind;
        if this != has || (this && !warms_up && c.warmup_epochs > 0) {
            let warm = if warms_up {
                ""
            } else {
                " and no warmup_epochs"
            };
            bail!(
                "the {} scheduler takes its {field} values{warm}, and no other scheduler takes them",
                kind.name()
            );
        }
    }
    let problems = [
        c.onecycle.and_then(|o| o.problem(str::to_string)),
        c.cyclic.and_then(|o| o.problem(str::to_string)),
        c.restarts.and_then(|r| r.problem()),
    ];
    if let Some(problem) = problems.into_iter().flatten().next() {
        bail!("{problem}");
    }
    if let Some(s) = &c.swa {
        if let Some(problem) = s.problem(str::to_string) {
            bail!("{problem}");
        }
        if matches!(c.scheduler, Onecycle | Cyclic) {
            bail!(
                "swa takes the place of a scheduler stepped every epoch, not of {}",
                c.scheduler.name()
            );
        }
    }
    if !(c.power >= 0.0 && c.power.is_finite()) {
        bail!("power {} must be finite and 0 or more", Num(c.power));
    }
    Ok(())
}

/// The recipe's values of a saved configuration (augmentation, mixing,
/// the average, the sampler, the launch).
fn check_recipe(c: &TrainConfig) -> Result<()> {
    if !(0.0..1.0).contains(&c.label_smoothing) {
        bail!(
            "label_smoothing {} is not in [0, 1)",
            Num(c.label_smoothing)
        );
    }
    if c.accum_steps < 1 {
        bail!("accum_steps {} must be at least 1", c.accum_steps);
    }
    if let Some(e) = &c.model_ema
        && !(e.steps >= 1 && (0.0..=1.0).contains(&e.update_decay))
    {
        bail!(
            "model_ema steps {} must be at least 1 and its decay {} in [0, 1]",
            e.steps,
            Num(e.update_decay)
        );
    }
    let m = &c.mixing;
    let finite = m.mixup_alpha.is_finite() && m.cutmix_alpha.is_finite();
    if !(finite && (0.0..=1.0).contains(&c.random_erase)) {
        bail!(
            "mixup/cutmix alphas {} and {} must be finite, random_erase {} in [0, 1]",
            Num(m.mixup_alpha),
            Num(m.cutmix_alpha),
            Num(c.random_erase)
        );
    }
    if let Augment::CropFlip { padding } = c.augment
        && !(0..=c.input_size).contains(&padding)
    {
        bail!(
            "augment padding {padding} is not 0 to the input size {}",
            c.input_size
        );
    }
    if c.world_size < 1 {
        bail!("world_size 0 must be at least 1");
    }
    if !(0..RA_BINS).contains(&c.ra_magnitude) {
        bail!(
            "ra_magnitude {} is not one of RandAugment's bins 0 to {}",
            c.ra_magnitude,
            RA_BINS - 1
        );
    }
    if !(0.0..=1.0).contains(&c.dropout) {
        bail!("dropout {} is not a probability in [0, 1]", c.dropout);
    }
    if let Some(problem) = c.crop_range.problem(|f| format!("crop_range {f}")) {
        bail!("{problem}");
    }
    if !(0.0..=1.0).contains(&c.hflip) {
        bail!("hflip {} is not a probability in [0, 1]", Num(c.hflip));
    }
    if !(0.0..=1.0).contains(&c.bn_momentum) {
        bail!("bn_momentum {} is not in [0, 1]", Num(c.bn_momentum));
    }
    if let Some(k) = c.ra_reps.filter(|k| !(1..=MAX_REPEATS).contains(k)) {
        bail!("ra_reps {k} is not 1 to {MAX_REPEATS}");
    }
    if !(1..=AUGMIX_BINS).contains(&c.augmix_severity) {
        bail!(
            "augmix_severity {} is not 1 to {AUGMIX_BINS}",
            c.augmix_severity
        );
    }
    Ok(())
}

/// What a finished run reports.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainSummary {
    pub out: PathBuf,
    pub epochs: usize,
    pub final_metrics: Option<EpochMetrics>,
    pub best_top1: Option<f64>,
    pub last: PathBuf,
    /// None with `--keep last`.
    pub best: Option<PathBuf>,
    /// With `--early-stop`: the best epoch, if the run stopped for want of
    /// a better one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped_early: Option<usize>,
    /// `--swa-start`: the average's weights, once the run has averaged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swa: Option<PathBuf>,
}

/// The epoch (1-based) with the highest validation top-1, the first of
/// equals: the one `best.safetensors` holds.
pub fn best_epoch(history: &[EpochMetrics]) -> Option<usize> {
    let best = history.iter().fold(None::<&EpochMetrics>, |b, m| match b {
        Some(b) if b.test_top1 >= m.test_top1 => Some(b),
        _ => Some(m),
    })?;
    Some(best.epoch)
}

/// With the patience `early_stop`, after the epochs of `history`: the best
/// epoch (1-based, the first of equals) if the epochs since it have reached
/// the patience.
pub fn stopped_early(early_stop: Option<usize>, history: &[EpochMetrics]) -> Option<usize> {
    let patience = early_stop?;
    let best = best_epoch(history)?;
    (history.len() - best >= patience).then_some(best)
}
