//! The training options of torchvision's reference recipe and timm beyond
//! the CIFAR basics (`train` and `finetune` share them): the weights'
//! moving average, AutoAugment, MixUp/CutMix, random erasing, gradient
//! accumulation, repeated augmentation, and the run's TensorBoard events
//! and log lines.

use anyhow::Result;
use vggctl::data::augment::Augment;
use vggctl::data::auto_augment::{
    AUGMIX_BINS, AUGMIX_SEVERITY, Interpolation, Policy, RA_BINS, RA_MAGNITUDE,
};
use vggctl::data::default_hflip;
use vggctl::data::mix::Mixing;
use vggctl::data::resize::Filter;
use vggctl::data::resized_crop::CropRange;
use vggctl::dist::sampler::MAX_REPEATS;
use vggctl::model::{BN_MOMENTUM, check_run_side};
use vggctl::num::Num;
use vggctl::train::config::{DROPOUT, TrainConfig};
use vggctl::train::ema::EmaConfig;

use super::opts::choice;
use super::output::{non_negative, pair, usage, whole};
use super::progress::LogInterval;

#[derive(clap::Args, Debug, Clone)]
pub struct RecipeOpts {
    /// The model's input side: training crops and evaluation's centre crop
    /// (torchvision's --val-crop-size) [default: 32; 224 with --dataset
    /// imagenet and for finetune].
    #[arg(long, aliases = ["val-crop-size", "img-size"], value_name = "H", value_parser = whole::<i64>, help_heading = "Data")]
    pub input: Option<i64>,
    /// RandomResizedCrop's side for training images, where it is not
    /// --input (torchvision's --train-crop-size; ImageNet-style training).
    #[arg(long, value_name = "H", value_parser = whole::<i64>, help_heading = "Data")]
    pub train_crop_size: Option<i64>,
    /// Evaluation resizes the shorter side to this before the --input crop
    /// (torchvision's --val-resize-size; ImageNet-style training) [default:
    /// --input x 256/224].
    #[arg(long, value_name = "R", value_parser = whole::<i64>, help_heading = "Data")]
    pub val_resize_size: Option<i64>,
    /// RandomResizedCrop's range of box areas, as fractions of the image's
    /// (timm's --scale; torchvision's scale) [default: 0.08,1].
    #[arg(long, value_name = "LOW,HIGH", value_parser = pair, help_heading = "Data")]
    pub scale: Option<(f64, f64)>,
    /// RandomResizedCrop's range of box aspect ratios, width over height,
    /// drawn log-uniformly (timm's --ratio; torchvision's ratio) [default:
    /// 0.75,1.3333333333333333].
    #[arg(long, value_name = "LOW,HIGH", value_parser = pair, help_heading = "Data")]
    pub ratio: Option<(f64, f64)>,
    /// How image folders' images are resized (torchvision's
    /// --interpolation): the evaluation's Resize and RandomResizedCrop,
    /// both antialiased; recorded in the checkpoint for eval and predict.
    #[arg(long, value_name = "MODE", default_value = "bilinear", value_parser = choice::<Filter>(), help_heading = "Data")]
    pub interpolation: Filter,
    /// The probability that a training image is mirrored left-right
    /// (torchvision's RandomHorizontalFlip(p), timm's --hflip) [default:
    /// 0.5; mnist, kmnist, qmnist, emnist-*, svhn, usps, digits: 0, as a mirrored digit
    /// or character is none].
    #[arg(long, value_name = "P", help_heading = "Data")]
    pub hflip: Option<f64>,
    /// Keep an exponential moving average of the weights (torchvision's
    /// reference --model-ema): evaluated after every epoch beside the
    /// weights and saved as ema.safetensors.
    #[arg(long, help_heading = "Optimizer")]
    pub model_ema: bool,
    /// Optimizer steps between updates of the average.
    #[arg(
        long,
        default_value_t = 32,
        value_name = "N",
        help_heading = "Optimizer",
        value_parser = whole::<usize>
    )]
    pub model_ema_steps: usize,
    /// The average's decay per optimizer step; as torchvision's recipe,
    /// each update applies 1 - min(1, (1 - decay) * ranks * batch * steps / epochs).
    #[arg(long, default_value_t = 0.99998, help_heading = "Optimizer")]
    pub model_ema_decay: f64,
    /// Sum the gradients of N batches into each optimizer step (an
    /// effective batch of N x --batch-size; each batch's loss counts 1/N).
    #[arg(
        long,
        default_value_t = 1,
        value_name = "N",
        help_heading = "Optimizer",
        value_parser = whole::<usize>
    )]
    pub accum_steps: usize,
    /// The probability of the classifier's Dropout layers while training
    /// (torchvision's `vgg16(dropout=P)`, timm's --drop).
    #[arg(long, alias = "drop", value_name = "P", default_value_t = DROPOUT, help_heading = "Model")]
    pub dropout: f64,
    /// How far BatchNorm moves its running statistics toward each training
    /// batch's (BatchNorm2d's momentum; timm's --bn-momentum).
    #[arg(long, value_name = "M", default_value_t = BN_MOMENTUM, help_heading = "Model")]
    pub bn_momentum: f64,
    /// Repeated augmentation (torchvision's --ra-sampler, its RASampler):
    /// each epoch takes about 1/--ra-reps of the images, each --ra-reps
    /// times in a row, dealt to the ranks in turn, every copy with its own
    /// augmentation; a rank's epoch keeps floor(N/256)*256/ranks images
    /// (ceil(N/ranks) below 256, as timm's). One process is a world of one
    /// (torchvision's train.py applies it only when distributed).
    #[arg(long, help_heading = "Data")]
    pub ra_sampler: bool,
    /// The copies of each image in an epoch of --ra-sampler.
    #[arg(
        long,
        default_value_t = 3,
        value_name = "K",
        help_heading = "Data",
        value_parser = whole::<usize>
    )]
    pub ra_reps: usize,
    /// MixUp: blend each training batch with itself rolled by one, in a
    /// Beta(alpha, alpha) proportion, labels alike (torchvision's v2.MixUp); 0 is off.
    #[arg(
        long,
        default_value_t = 0.0,
        value_name = "ALPHA",
        help_heading = "Data"
    )]
    pub mixup_alpha: f64,
    /// CutMix: paste a box of the batch rolled by one (torchvision's
    /// v2.CutMix); with --mixup-alpha too, each batch takes one of the two.
    #[arg(
        long,
        default_value_t = 0.0,
        value_name = "ALPHA",
        help_heading = "Data"
    )]
    pub cutmix_alpha: f64,
    /// Augment each training image automatically, as torchvision's
    /// reference train.py --auto-augment: AutoAugment with the policy
    /// searched on a dataset, RandAugment, TrivialAugment Wide or AugMix
    /// (after the crop and flip, before normalization).
    #[arg(long, value_name = "POLICY", value_parser = choice::<Policy>(), help_heading = "Data")]
    pub auto_augment: Option<Policy>,
    /// The augmentations' shears, translations and rotations: nearest or
    /// bilinear [default: each transform's own: nearest, bilinear for augmix].
    #[arg(long, value_name = "MODE", value_parser = choice::<Interpolation>(), help_heading = "Data")]
    pub augment_interpolation: Option<Interpolation>,
    /// AugMix's severity, 1 to 10 (torchvision's --augmix-severity).
    #[arg(long, value_name = "N", default_value_t = AUGMIX_SEVERITY, value_parser = whole::<i64>, help_heading = "Data")]
    pub augmix_severity: i64,
    /// RandAugment's magnitude, 0 to 30 (torchvision's --ra-magnitude).
    #[arg(long, value_name = "M", default_value_t = RA_MAGNITUDE, value_parser = whole::<i64>, help_heading = "Data")]
    pub ra_magnitude: i64,
    /// Erase a random box of each training image with this probability
    /// (torchvision's RandomErasing after normalization); 0 is off.
    #[arg(long, default_value_t = 0.0, value_name = "P", help_heading = "Data")]
    pub random_erase: f64,
    /// Write TensorBoard event files into the run directory (`tensorboard
    /// --logdir runs`); may be turned on at --resume.
    #[arg(long, help_heading = "Output")]
    pub tensorboard: bool,
    /// When stderr is not a terminal, a progress line every N steps (`50`)
    /// or every N seconds (`30s`).
    #[arg(
        long,
        alias = "print-freq",
        default_value = "30s",
        value_name = "N|Ns",
        env = "VGGCTL_LOG_INTERVAL",
        help_heading = "Output"
    )]
    pub log_interval: LogInterval,
}

impl RecipeOpts {
    pub fn validate(&self) -> Result<()> {
        if self.model_ema_steps < 1 {
            return Err(usage("--model-ema-steps must be at least 1"));
        }
        if !(self.model_ema_decay > 0.0 && self.model_ema_decay < 1.0) {
            return Err(usage(format!(
                "--model-ema-decay {} must be between 0 and 1",
                Num(self.model_ema_decay)
            )));
        }
        if self.accum_steps < 1 {
            return Err(usage("--accum-steps must be at least 1"));
        }
        if !(0.0..=1.0).contains(&self.dropout) {
            return Err(usage(format!(
                "--dropout {} must be a probability in [0, 1]",
                Num(self.dropout)
            )));
        }
        if !(0.0..=1.0).contains(&self.bn_momentum) {
            return Err(usage(format!(
                "--bn-momentum {} must be in [0, 1]",
                Num(self.bn_momentum)
            )));
        }
        if !(1..=MAX_REPEATS).contains(&self.ra_reps) {
            return Err(usage(format!(
                "--ra-reps {} must be 1 to {MAX_REPEATS}",
                self.ra_reps
            )));
        }
        if !(1..=AUGMIX_BINS).contains(&self.augmix_severity) {
            return Err(usage(format!(
                "--augmix-severity {} must be 1 to {AUGMIX_BINS}",
                self.augmix_severity
            )));
        }
        if !(0..RA_BINS).contains(&self.ra_magnitude) {
            return Err(usage(format!(
                "--ra-magnitude {} must be 0 to {} (RandAugment's bins)",
                self.ra_magnitude,
                RA_BINS - 1
            )));
        }
        for (flag, side) in [
            ("--input", self.input),
            ("--train-crop-size", self.train_crop_size),
            ("--val-resize-size", self.val_resize_size),
        ] {
            if let Some(side) = side {
                check_run_side(flag, side).map_err(|e| usage(e.to_string()))?;
            }
        }
        if let Some(problem) = self.crop_range().problem(|f| format!("--{f}")) {
            return Err(usage(problem));
        }
        non_negative("--mixup-alpha", self.mixup_alpha)?;
        non_negative("--cutmix-alpha", self.cutmix_alpha)?;
        if let Some(p) = self.hflip.filter(|p| !(0.0..=1.0).contains(p)) {
            return Err(usage(format!(
                "--hflip {} must be a probability in [0, 1]",
                Num(p)
            )));
        }
        if !(0.0..=1.0).contains(&self.random_erase) {
            return Err(usage(format!(
                "--random-erase {} must be a probability in [0, 1]",
                Num(self.random_erase)
            )));
        }
        Ok(())
    }

    /// A usage error for image sides a new run cannot go with, before
    /// anything is read: `--train-crop-size` and `--val-resize-size` are
    /// RandomResizedCrop training's (`augment`; CIFAR-style training crops
    /// a padded square at `--input`), and evaluation's centre crop (`--input`,
    /// else `default_input`) must fit in its resize.
    pub fn check_sides(&self, augment: Augment, default_input: i64, dataset: &str) -> Result<()> {
        if augment != Augment::ResizedCrop {
            for (flag, given) in [
                ("--train-crop-size", self.train_crop_size),
                ("--val-resize-size", self.val_resize_size),
            ] {
                if given.is_some() {
                    return Err(usage(format!(
                        "{flag} applies to ImageNet-style training (RandomResizedCrop: --dataset imagenet, or finetune on a folder); {dataset} training crops and evaluates at --input"
                    )));
                }
            }
        }
        let crop = self.input.unwrap_or(default_input);
        match self.val_resize_size {
            Some(r) if r < crop => Err(usage(format!(
                "--val-resize-size {r} is smaller than evaluation's centre crop, --input {crop}"
            ))),
            _ => Ok(()),
        }
    }

    /// RandomResizedCrop's ranges, torchvision's where not given.
    fn crop_range(&self) -> CropRange {
        let d = CropRange::default();
        CropRange {
            scale: self.scale.unwrap_or(d.scale),
            ratio: self.ratio.unwrap_or(d.ratio),
        }
    }

    /// Writes these options into a new run's configuration; the average's
    /// decay is settled by [`settle_ema`] once the ranks are known.
    pub fn configure(&self, config: &mut TrainConfig) {
        if let Some(side) = self.input {
            config.input_size = side;
        }
        config.train_crop_size = self.train_crop_size;
        config.val_resize_size = self.val_resize_size;
        config.interpolation = self.interpolation;
        config.crop_range = self.crop_range();
        config.hflip = (self.hflip).unwrap_or_else(|| default_hflip(&config.dataset));
        config.accum_steps = self.accum_steps;
        config.ra_reps = self.ra_sampler.then_some(self.ra_reps);
        config.dropout = self.dropout;
        config.bn_momentum = self.bn_momentum;
        config.model_ema = self.model_ema.then(|| {
            EmaConfig::new(
                self.model_ema_steps,
                self.model_ema_decay,
                1,
                config.batch_size * config.accum_steps as i64,
                config.epochs,
            )
        });
        config.mixing = Mixing {
            mixup_alpha: self.mixup_alpha,
            cutmix_alpha: self.cutmix_alpha,
        };
        config.random_erase = self.random_erase;
        config.auto_augment = self.auto_augment;
        config.ra_magnitude = self.ra_magnitude;
        config.augmix_severity = self.augmix_severity;
        config.augment_interpolation = self.augment_interpolation;
        config.tensorboard = self.tensorboard;
    }
}

/// A new run's moving-average decay for its number of ranks (torchvision
/// adjusts it by the global batch: ranks × batch, here × --accum-steps).
pub fn settle_ema(config: &mut TrainConfig) {
    if let Some(e) = config.model_ema {
        config.model_ema = Some(EmaConfig::new(
            e.steps,
            e.decay,
            config.world_size,
            config.batch_size * config.accum_steps as i64,
            config.epochs,
        ));
    }
}

/// `--dataset imagenet` from scratch: torchvision's reference recipe
/// for VGG (SGD 0.01, momentum 0.9, weight decay 1e-4, the LR times
/// 0.1 every 30 epochs, 90 epochs, batch 32 per GPU; RandomResizedCrop
/// 224 and flips, evaluation at Resize 256 + CenterCrop 224) for what
/// the command line leaves out (`typed`: the options it gives); the
/// crops and their side are `train`'s, decided before the data is read.
pub fn imagenet_recipe(typed: &[String], config: &mut TrainConfig) {
    let typed = |id: &str| typed.iter().any(|t| t == id);
    if !typed("weight_decay") {
        config.optimizer.weight_decay = 1e-4;
    }
    if !typed("milestones") {
        config.milestones = vec![30, 60];
    }
    if !typed("batch_size") {
        config.batch_size = 32;
    }
    if !typed("epochs") {
        config.epochs = 90;
    }
    config.imagenet_normalization = true;
}
