//! The learning-rate schedule's choices (`TrainConfig::lr_at` gives each
//! epoch's LR from them): a warm-up over `warmup_epochs` (vggctl's ramp, or
//! torchvision's LinearLR / ConstantLR from a factor, joined to the main
//! schedule by SequentialLR as torchvision's reference `train.py` joins
//! them), then MultiStepLR, cosine annealing, StepLR or ExponentialLR.

use serde::{Deserialize, Serialize};

use crate::choice::Choice;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SchedulerKind {
    Multistep,
    Cosine,
    Step,
    Exponential,
}

impl Choice for SchedulerKind {
    const ALL: &'static [Self] = &[
        SchedulerKind::Multistep,
        SchedulerKind::Cosine,
        SchedulerKind::Step,
        SchedulerKind::Exponential,
    ];
    fn name(self) -> &'static str {
        match self {
            SchedulerKind::Multistep => "multistep",
            SchedulerKind::Cosine => "cosine",
            SchedulerKind::Step => "step",
            SchedulerKind::Exponential => "exponential",
        }
    }
    fn help(self) -> &'static str {
        match self {
            SchedulerKind::Multistep => {
                "MultiStepLR: the LR times --gamma at each milestone (epochs from the run's start)"
            }
            SchedulerKind::Cosine => {
                "CosineAnnealingLR: from --lr to --lr-min over the epochs after the warm-up"
            }
            SchedulerKind::Step => "StepLR: the LR times --gamma every --step-size epochs",
            SchedulerKind::Exponential => "ExponentialLR: the LR times --gamma every epoch",
        }
    }
    /// torchvision's reference `--lr-scheduler` names.
    fn aliases(self) -> &'static [&'static str] {
        match self {
            SchedulerKind::Multistep => &["multisteplr"],
            SchedulerKind::Cosine => &["cosineannealinglr"],
            SchedulerKind::Step => &["steplr"],
            SchedulerKind::Exponential => &["exponentiallr"],
        }
    }
}

/// StepLR's period, as torchvision's reference `--lr-step-size`.
pub const DEFAULT_STEP_SIZE: usize = 30;

/// torchvision's `--lr-warmup-method`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WarmupMethod {
    Linear,
    Constant,
}

impl Choice for WarmupMethod {
    const ALL: &'static [Self] = &[WarmupMethod::Linear, WarmupMethod::Constant];
    fn name(self) -> &'static str {
        match self {
            WarmupMethod::Linear => "linear",
            WarmupMethod::Constant => "constant",
        }
    }
    fn help(self) -> &'static str {
        match self {
            WarmupMethod::Linear => "LinearLR: from --lr times --warmup-decay up to --lr",
            WarmupMethod::Constant => "ConstantLR: --lr times --warmup-decay throughout",
        }
    }
}

/// torchvision's warm-up: `LinearLR(start_factor=decay)` or
/// `ConstantLR(factor=decay)` over the warm-up epochs.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Warmup {
    pub method: WarmupMethod,
    pub decay: f64,
}

/// torchvision's `--lr-warmup-decay` default.
pub const DEFAULT_WARMUP_DECAY: f64 = 0.01;

impl Warmup {
    /// Why `decay` cannot be this method's factor (LinearLR's start factor
    /// is in (0, 1], ConstantLR's factor in [0, 1]), if it cannot.
    pub fn problem(&self) -> Option<String> {
        let ok = match self.method {
            WarmupMethod::Linear => self.decay > 0.0 && self.decay <= 1.0,
            WarmupMethod::Constant => (0.0..=1.0).contains(&self.decay),
        };
        let range = match self.method {
            WarmupMethod::Linear => "(0, 1]",
            WarmupMethod::Constant => "[0, 1]",
        };
        (!ok).then(|| {
            format!(
                "warm-up decay {} must be in {range} for the {} warm-up",
                self.decay,
                self.method.name()
            )
        })
    }
}
