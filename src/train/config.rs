//! A training run's options as `config.json` records them (the learning
//! rate schedule they define is in `schedule`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::data::augment::{Augment, HFLIP};
use crate::data::auto_augment::{AUGMIX_SEVERITY, Interpolation, Policy, RA_MAGNITUDE};
use crate::data::mix::Mixing;
use crate::data::resize::Filter;
use crate::data::resized_crop::CropRange;
use crate::model::{BN_MOMENTUM, ModelSpec};
use crate::numerics::{FusedStep, NumericsRequest, Precision, StepPart};
use crate::optim::OptimizerConfig;

use super::cyclic::Cyclic;
use super::ema::EmaConfig;
use super::keep::Keep;
use super::onecycle::OneCycle;
pub use super::schedule::{
    DEFAULT_PATIENCE, DEFAULT_POWER, DEFAULT_STEP_SIZE, Restarts, SchedulerKind, SwaConfig, Warmup,
    WarmupMethod,
};

/// Every resolved option of a training run (written to `config.json`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainConfig {
    pub model: ModelSpec,
    pub dataset: String,
    pub data_dir: String,
    /// Image folders: the validation folder, or the fraction held out.
    pub val_dir: Option<String>,
    pub val_split: f64,
    /// STL-10: the predefined training fold trained on (None: all images);
    /// DTD: the partition read, for training and evaluation (None: 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fold: Option<usize>,
    /// SVHN: whether its extra split is trained on too.
    #[serde(default, skip_serializing_if = "is_false")]
    pub extra: bool,
    /// Oxford 102 Flowers, DTD: `val` where the run validates on the
    /// dataset's own val split (trained on train alone; None: on test).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_on: Option<String>,
    pub epochs: usize,
    pub batch_size: i64,
    pub test_batch_size: i64,
    pub optimizer: OptimizerConfig,
    pub lr: f64,
    pub scheduler: SchedulerKind,
    pub milestones: Vec<usize>,
    pub gamma: f64,
    /// StepLR's period in epochs.
    #[serde(
        default = "default_step_size",
        skip_serializing_if = "is_default_step_size"
    )]
    pub step_size: usize,
    /// Cosine annealing's floor (`eta_min`), ReduceLROnPlateau's `min_lr`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub lr_min: f64,
    /// ReduceLROnPlateau's epochs without improvement it waits for, and
    /// the epochs after a reduction it does not count.
    #[serde(
        default = "default_patience",
        skip_serializing_if = "is_default_patience"
    )]
    pub patience: usize,
    #[serde(default, skip_serializing_if = "is_zero_count")]
    pub cooldown: usize,
    pub warmup_epochs: usize,
    /// torchvision's warm-up (LinearLR or ConstantLR from a factor); none:
    /// vggctl's ramp `lr · (epoch + 1) / warmup_epochs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup: Option<Warmup>,
    /// `--scheduler onecycle`'s values (none with another scheduler).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub onecycle: Option<OneCycle>,
    /// `--scheduler cyclic`'s values (none with another scheduler).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cyclic: Option<Cyclic>,
    /// PolynomialLR's power.
    #[serde(default = "default_power", skip_serializing_if = "is_default_power")]
    pub power: f64,
    /// `--scheduler cosine-restarts`' cycles (none with another scheduler).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restarts: Option<Restarts>,
    pub label_smoothing: f64,
    pub seed: u64,
    pub limit_train: Option<i64>,
    pub limit_test: Option<i64>,
    pub device: String,
    pub out: PathBuf,
    /// Side of the (square) model input: evaluation's centre crop, and
    /// training's unless `train_crop_size` says otherwise.
    pub input_size: i64,
    /// RandomResizedCrop's side for training images where it is not
    /// `input_size` (`--train-crop-size`, torchvision's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_crop_size: Option<i64>,
    /// Evaluation's resize of the shorter side before the centre crop where
    /// it is not `input_size · 256/224` (`--val-resize-size`, torchvision's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_resize_size: Option<i64>,
    /// The filter of every resize of an image folder's images: the
    /// evaluation's `Resize`, RandomResizedCrop's (`--interpolation`,
    /// torchvision's).
    #[serde(default)]
    pub interpolation: Filter,
    pub augment: Augment,
    /// Training sees the evaluation transform: no random crops or flips.
    #[serde(default)]
    pub no_augment: bool,
    /// BatchNorm statistics over all ranks' batches (SyncBatchNorm).
    #[serde(default)]
    pub sync_bn: bool,
    /// Ranks of a data-parallel run; `batch_size` is per rank.
    #[serde(default = "default_one")]
    pub world_size: usize,
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
    /// CUDA: the fused step (`Numerics::fused_step`) where the model has
    /// something it fuses; `--no-fused-step` runs libtorch's kernels as
    /// they are (the reference).
    #[serde(default = "default_true")]
    pub fused_step: bool,
    /// The fused step's parts left out (`--no-fused-step=PART,...`).
    #[serde(default)]
    pub fused_step_without: Vec<StepPart>,
    /// Time the parts of each step (synchronizing the device) and report them.
    #[serde(default)]
    pub profile: bool,
    /// Which weight files are kept.
    #[serde(default)]
    pub keep: Keep,
    /// The most the gradients' global 2-norm may be (clip_grad_norm_).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_grad_norm: Option<f64>,
    /// The bound on every gradient element (clip_grad_value_).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_grad_value: Option<f64>,
    /// Stop once the validation top-1 has not beaten the best for this many
    /// epochs in a row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub early_stop: Option<usize>,
    /// An exponential moving average of the weights (`--model-ema`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_ema: Option<EmaConfig>,
    /// Stochastic weight averaging (`--swa-start`), and its SWALR schedule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swa: Option<SwaConfig>,
    /// Batch mixing (`--mixup-alpha`, `--cutmix-alpha`; 0 is off).
    #[serde(default, skip_serializing_if = "Mixing::is_off")]
    pub mixing: Mixing,
    /// The automatic augmentation of training images (`--auto-augment`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_augment: Option<Policy>,
    /// The augmentations' geometric interpolation (`--augment-interpolation`;
    /// none: each one's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub augment_interpolation: Option<Interpolation>,
    /// AugMix's severity (`--augmix-severity`).
    #[serde(
        default = "default_augmix_severity",
        skip_serializing_if = "is_default_augmix_severity"
    )]
    pub augmix_severity: i64,
    /// RandAugment's magnitude bin (`--ra-magnitude`).
    #[serde(
        default = "default_ra_magnitude",
        skip_serializing_if = "is_default_ra_magnitude"
    )]
    pub ra_magnitude: i64,
    /// Random erasing's probability per training image (0 is off).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub random_erase: f64,
    /// Batches whose gradients make one optimizer step.
    #[serde(default = "default_one", skip_serializing_if = "is_one")]
    pub accum_steps: usize,
    /// The classifier's dropout probability (`--dropout`; torchvision's
    /// `dropout` argument of its VGG builders).
    #[serde(
        default = "default_dropout",
        skip_serializing_if = "is_default_dropout"
    )]
    pub dropout: f64,
    /// RandomResizedCrop's area and aspect ratio ranges (`--scale`,
    /// `--ratio`).
    #[serde(default, skip_serializing_if = "CropRange::is_default")]
    pub crop_range: CropRange,
    /// The probability that a training image is mirrored left-right
    /// (`--hflip`; 0.5 for runs that predate it).
    #[serde(default = "default_hflip", skip_serializing_if = "is_default_hflip")]
    pub hflip: f64,
    /// How far BatchNorm moves its running statistics in training
    /// (`--bn-momentum`; BatchNorm2d's `momentum`).
    #[serde(
        default = "default_bn_momentum",
        skip_serializing_if = "is_default_bn_momentum"
    )]
    pub bn_momentum: f64,
    /// Repeated augmentation (`--ra-sampler`, `--ra-reps`): each example
    /// this many times per epoch, on different ranks (`dist::Sampler`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ra_reps: Option<usize>,
    /// TensorBoard event files in the run directory.
    #[serde(default, skip_serializing_if = "is_false")]
    pub tensorboard: bool,
    /// Image folders: read from the files as they are used (too large for
    /// memory) rather than decoded into memory; decided when the run starts
    /// and kept on resume, as the two differ in rounding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streamed: Option<bool>,
}

/// torchvision's VGG dropout probability.
pub const DROPOUT: f64 = 0.5;

fn default_hflip() -> f64 {
    HFLIP
}

fn is_default_hflip(v: &f64) -> bool {
    *v == HFLIP
}

fn default_dropout() -> f64 {
    DROPOUT
}

fn is_default_dropout(v: &f64) -> bool {
    *v == DROPOUT
}

fn default_bn_momentum() -> f64 {
    BN_MOMENTUM
}

fn is_default_bn_momentum(v: &f64) -> bool {
    *v == BN_MOMENTUM
}

fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

fn is_one(v: &usize) -> bool {
    *v == 1
}

fn is_false(v: &bool) -> bool {
    !*v
}

fn default_precision() -> Precision {
    Precision::Auto
}

fn default_true() -> bool {
    true
}

fn default_one() -> usize {
    1
}

fn default_patience() -> usize {
    DEFAULT_PATIENCE
}

fn is_default_patience(v: &usize) -> bool {
    *v == DEFAULT_PATIENCE
}

fn is_zero_count(v: &usize) -> bool {
    *v == 0
}

fn default_power() -> f64 {
    DEFAULT_POWER
}

fn is_default_power(v: &f64) -> bool {
    *v == DEFAULT_POWER
}

fn default_step_size() -> usize {
    DEFAULT_STEP_SIZE
}

fn is_default_step_size(v: &usize) -> bool {
    *v == DEFAULT_STEP_SIZE
}

fn default_augmix_severity() -> i64 {
    AUGMIX_SEVERITY
}

fn is_default_augmix_severity(v: &i64) -> bool {
    *v == AUGMIX_SEVERITY
}

fn default_ra_magnitude() -> i64 {
    RA_MAGNITUDE
}

fn is_default_ra_magnitude(v: &i64) -> bool {
    *v == RA_MAGNITUDE
}

impl TrainConfig {
    /// Whether the run validates on a val split (`--val-on val`: the
    /// dataset's own, or a held-out part of its training split).
    pub fn validates_on_val(&self) -> bool {
        self.val_on.as_deref() == Some("val")
    }

    /// The settings (`config.json` keys) in which `self` and `other`
    /// differ, leaving out those named in `free`.
    pub fn differing(&self, other: &TrainConfig, free: &[&str]) -> Vec<String> {
        use serde_json::Value;
        match (serde_json::to_value(self), serde_json::to_value(other)) {
            (Ok(Value::Object(a)), Ok(Value::Object(b))) => a
                .iter()
                .filter(|(k, v)| !free.contains(&k.as_str()) && b.get(*k) != Some(*v))
                .map(|(k, _)| k.clone())
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The side training images are cropped to.
    pub fn train_crop(&self) -> i64 {
        self.train_crop_size.unwrap_or(self.input_size)
    }

    /// The shorter side images are resized to before evaluation's centre
    /// crop (and image folders' in-memory copies are kept at), as
    /// torchvision's reference resizes to 256 for a 224 crop.
    pub fn val_resize(&self) -> i64 {
        self.val_resize_size
            .unwrap_or(crate::data::image::default_resize(self.input_size))
    }

    /// The numerics this configuration asks for (its layout and CUDA-graph
    /// choices were settled when the run started or resumed).
    pub fn numerics_request(&self, deterministic: bool) -> NumericsRequest {
        NumericsRequest {
            precision: self.precision,
            channels_last: Some(self.channels_last),
            cuda_graphs: Some(self.cuda_graphs),
            fused: self.fused,
            fused_step: match self.fused_step {
                true => FusedStep::without(&self.fused_step_without),
                false => FusedStep::NONE,
            },
            deterministic,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::{Arch, Head};

    /// The CIFAR recipe's configuration with this schedule.
    pub(crate) fn config(scheduler: SchedulerKind, epochs: usize, warmup: usize) -> TrainConfig {
        TrainConfig {
            model: ModelSpec::new(Arch::Vgg11, false, Head::Cifar, 10),
            dataset: "cifar10".into(),
            data_dir: "data".into(),
            val_dir: None,
            val_split: 0.1,
            fold: None,
            extra: false,
            val_on: None,
            epochs,
            batch_size: 128,
            test_batch_size: 100,
            optimizer: OptimizerConfig::recipe_sgd(),
            lr: 0.1,
            scheduler,
            milestones: vec![50, 80],
            gamma: 0.1,
            step_size: DEFAULT_STEP_SIZE,
            lr_min: 0.0,
            patience: DEFAULT_PATIENCE,
            cooldown: 0,
            warmup_epochs: warmup,
            warmup: None,
            onecycle: None,
            cyclic: None,
            power: DEFAULT_POWER,
            restarts: None,
            label_smoothing: 0.0,
            seed: 0,
            limit_train: None,
            limit_test: None,
            device: "cpu".into(),
            out: "runs/x".into(),
            input_size: 32,
            train_crop_size: None,
            val_resize_size: None,
            interpolation: Filter::Bilinear,
            augment: Augment::CropFlip { padding: 4 },
            no_augment: false,
            sync_bn: false,
            world_size: 1,
            imagenet_normalization: false,
            freeze_prefix: 0,
            weights: None,
            precision: Precision::Auto,
            cuda_graphs: false,
            channels_last: false,
            fused: true,
            fused_step: true,
            fused_step_without: Vec::new(),
            profile: false,
            keep: Keep::Best,
            clip_grad_norm: None,
            clip_grad_value: None,
            early_stop: None,
            model_ema: None,
            swa: None,
            mixing: Mixing::default(),
            auto_augment: None,
            ra_magnitude: RA_MAGNITUDE,
            augmix_severity: AUGMIX_SEVERITY,
            augment_interpolation: None,
            random_erase: 0.0,
            accum_steps: 1,
            dropout: DROPOUT,
            bn_momentum: BN_MOMENTUM,
            crop_range: CropRange::default(),
            hflip: HFLIP,
            ra_reps: None,
            tensorboard: false,
            streamed: None,
        }
    }

    /// A resumed run continues with the very floats it started with:
    /// config.json and the resume state give them back bit for bit
    /// (serde_json's float_roundtrip; its default parser reads the
    /// average's decay for 2 ranks, batch 16, 1 epoch, 0.9795199999999795,
    /// an ulp off, which made `--resume auto` refuse the run).
    #[test]
    fn floats_survive_json_bit_for_bit() {
        let mut c = config(SchedulerKind::Cosine, 1, 0);
        c.model_ema = Some(EmaConfig::new(32, 0.99998, 2, 16, 1));
        c.lr = 0.1 * 3.0f64.sqrt();
        let text = serde_json::to_string(&c).unwrap();
        assert!(text.contains("0.9795199999999795"), "{text}");
        let back: TrainConfig = serde_json::from_str(&text).unwrap();
        assert_eq!(back, c);
    }

    /// The request carries the configuration's settled choices.
    #[test]
    fn numerics_request_repeats_the_configuration() {
        let mut c = config(SchedulerKind::Multistep, 1, 0);
        c.channels_last = true;
        c.fused = false;
        let r = c.numerics_request(true);
        assert_eq!(r.channels_last, Some(true));
        assert_eq!(r.cuda_graphs, Some(false));
        assert!(!r.fused && r.deterministic);
    }
}
