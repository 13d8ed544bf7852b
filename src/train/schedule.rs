//! The learning-rate schedule's choices (`TrainConfig::lr_at`, in `lr`,
//! gives each epoch's LR from them): a warm-up over `warmup_epochs` (vggctl's ramp, or torchvision's
//! LinearLR / ConstantLR from a factor, joined to the main schedule by
//! SequentialLR as torchvision's reference `train.py` joins them), then
//! MultiStepLR, cosine annealing (with warm restarts too), StepLR,
//! ExponentialLR or PolynomialLR; or
//! ReduceLROnPlateau on the validation loss, or OneCycleLR over the run's
//! updates (`onecycle`) or CyclicLR's cycles of updates (`cyclic`), which
//! no warm-up precedes; and SWALR, which takes over from the epoch after
//! the weight average starts (`SwaConfig`).

use crate::num::Num;
use serde::{Deserialize, Serialize};

use super::onecycle::Anneal;
use crate::choice::{Choice, Takers};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SchedulerKind {
    Multistep,
    Cosine,
    Step,
    Exponential,
    Plateau,
    Onecycle,
    Poly,
    #[serde(rename = "cosine-restarts")]
    CosineRestarts,
    Cyclic,
}

impl Choice for SchedulerKind {
    const ALL: &'static [Self] = &[
        SchedulerKind::Multistep,
        SchedulerKind::Cosine,
        SchedulerKind::Step,
        SchedulerKind::Exponential,
        SchedulerKind::Plateau,
        SchedulerKind::Onecycle,
        SchedulerKind::Poly,
        SchedulerKind::CosineRestarts,
        SchedulerKind::Cyclic,
    ];
    fn name(self) -> &'static str {
        match self {
            SchedulerKind::Multistep => "multistep",
            SchedulerKind::Cosine => "cosine",
            SchedulerKind::Step => "step",
            SchedulerKind::Exponential => "exponential",
            SchedulerKind::Plateau => "plateau",
            SchedulerKind::Onecycle => "onecycle",
            SchedulerKind::Poly => "poly",
            SchedulerKind::CosineRestarts => "cosine-restarts",
            SchedulerKind::Cyclic => "cyclic",
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
            SchedulerKind::Plateau => {
                "ReduceLROnPlateau: the LR times --gamma (below 1) once the validation loss has not improved for more than --patience epochs, then --cooldown epochs before counting again; never below --lr-min"
            }
            SchedulerKind::Onecycle => {
                "OneCycleLR, stepped after every update: from --lr/--div-factor up to --lr over the first --pct-start of the run, then down to that over --final-div-factor, the momentum (Adam's beta1) cycled the other way (--cycle-momentum)"
            }
            SchedulerKind::Poly => {
                "PolynomialLR: from --lr towards 0 as (1 - t/T)^--power, T the epochs after the warm-up"
            }
            SchedulerKind::CosineRestarts => {
                "CosineAnnealingWarmRestarts (SGDR): cosine annealing from --lr to --lr-min over --restart-epochs epochs, then again from --lr, each cycle --restart-mult times the one before"
            }
            SchedulerKind::Cyclic => {
                "CyclicLR, stepped after every update: from --lr-min up to --lr over --cycle-steps UP updates and back over DOWN, again and again (--cyclic-mode), the momentum (Adam's beta1) cycled the other way (--cycle-momentum)"
            }
        }
    }
    /// torchvision's reference `--lr-scheduler` names.
    fn aliases(self) -> &'static [&'static str] {
        match self {
            SchedulerKind::Multistep => &["multisteplr"],
            SchedulerKind::Cosine => &["cosineannealinglr"],
            SchedulerKind::Step => &["steplr"],
            SchedulerKind::Exponential => &["exponentiallr"],
            SchedulerKind::Plateau => &["reducelronplateau"],
            SchedulerKind::Onecycle => &["onecyclelr"],
            SchedulerKind::Poly => &["polynomiallr", "polynomial"],
            SchedulerKind::CosineRestarts => &["cosineannealingwarmrestarts", "sgdr"],
            SchedulerKind::Cyclic => &["cycliclr"],
        }
    }
}

/// The schedules' own options, each with the schedules that take it: the
/// one list that says which options a schedule has a use for (CyclicLR's
/// `exp_range` mode takes `gamma` too).
pub const SCHEDULE_OPTIONS: &[Takers<SchedulerKind>] = &[
    (&["gamma"], |k| {
        matches!(
            k,
            SchedulerKind::Multistep
                | SchedulerKind::Step
                | SchedulerKind::Exponential
                | SchedulerKind::Plateau
        )
    }),
    (&["step_size"], |k| k == SchedulerKind::Step),
    (&["lr_min"], |k| {
        matches!(
            k,
            SchedulerKind::Cosine
                | SchedulerKind::CosineRestarts
                | SchedulerKind::Plateau
                | SchedulerKind::Cyclic
        )
    }),
    (&["power"], |k| k == SchedulerKind::Poly),
    (&["restart_epochs", "restart_mult"], |k| {
        k == SchedulerKind::CosineRestarts
    }),
    (&["patience", "cooldown"], |k| k == SchedulerKind::Plateau),
    (
        &[
            "pct_start",
            "div_factor",
            "final_div_factor",
            "anneal_strategy",
            "three_phase",
        ],
        |k| k == SchedulerKind::Onecycle,
    ),
    (&["cycle_steps", "cyclic_mode"], |k| {
        k == SchedulerKind::Cyclic
    }),
    (&["cycle_momentum", "no_cycle_momentum"], |k| {
        matches!(k, SchedulerKind::Onecycle | SchedulerKind::Cyclic)
    }),
    (&["milestones"], |k| k == SchedulerKind::Multistep),
];

/// StepLR's period, as torchvision's reference `--lr-step-size`.
pub const DEFAULT_STEP_SIZE: usize = 30;

/// PolynomialLR's default power (PyTorch's).
pub const DEFAULT_POWER: f64 = 1.0;

/// CosineAnnealingWarmRestarts' cycles: the first's epochs (`T_0`) and
/// what each next one's are multiplied by (`T_mult`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Restarts {
    pub epochs: usize,
    pub mult: usize,
}

impl Restarts {
    /// Where epoch `t` of the schedule (counted from the warm-up's end) is
    /// in its cycle: epochs since the last restart, and the cycle's
    /// length. PyTorch's `T_cur += 1; if T_cur >= T_i: T_cur -= T_i;
    /// T_i *= T_mult`, in whole numbers (its closed form for an explicit
    /// epoch goes through a floating-point logarithm).
    pub fn position(&self, t: usize) -> (usize, usize) {
        let (mut cur, mut len) = (t, self.epochs.max(1));
        while cur >= len {
            cur -= len;
            len = len.saturating_mul(self.mult.max(1));
        }
        (cur, len)
    }

    /// Why these cannot be CosineAnnealingWarmRestarts' cycles (torch
    /// wants a positive `T_0` and a whole `T_mult` of 1 or more).
    pub fn problem(&self) -> Option<String> {
        (self.epochs < 1 || self.mult < 1).then(|| {
            format!(
                "restart epochs {} and restart mult {} must each be at least 1",
                self.epochs, self.mult
            )
        })
    }
}

/// ReduceLROnPlateau's default patience (PyTorch's).
pub const DEFAULT_PATIENCE: usize = 10;

/// `ReduceLROnPlateau(mode="min", factor, patience, threshold=1e-4,
/// threshold_mode="rel", cooldown, min_lr)` stepped with each of `losses`
/// (the validation losses of the epochs so far, in order): the LR it leaves
/// for the next epoch, starting from `lr`. PyTorch's own arithmetic, in
/// f64 as Python's floats: a loss improves on the best below `best · (1 −
/// 1e-4)`; more than `patience` epochs without one (not counting those in
/// a cooldown) multiply the LR by `factor`, down to `min_lr`, unless that
/// changes it by 1e-8 or less; then `cooldown` epochs are not counted.
pub fn plateau_lr(
    lr: f64,
    factor: f64,
    min_lr: f64,
    (patience, cooldown): (usize, usize),
    losses: &[f64],
) -> f64 {
    const THRESHOLD: f64 = 1e-4;
    const EPS: f64 = 1e-8;
    let (mut lr, mut best, mut bad, mut cooling) = (lr, f64::INFINITY, 0, 0);
    for &loss in losses {
        if loss < best * (1.0 - THRESHOLD) {
            (best, bad) = (loss, 0);
        } else {
            bad += 1;
        }
        if cooling > 0 {
            (cooling, bad) = (cooling - 1, 0);
        }
        if bad > patience {
            let reduced = (lr * factor).max(min_lr);
            if lr - reduced > EPS {
                lr = reduced;
            }
            (cooling, bad) = (cooldown, 0);
        }
    }
    lr
}

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
                Num(self.decay),
                self.method.name()
            )
        })
    }
}

/// SWALR's `anneal_epochs` default.
pub const ANNEAL_EPOCHS: usize = 10;

/// What `config.json` records of `--swa-start` and its options.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct SwaConfig {
    /// The first epoch (1-based) whose end the average takes.
    pub start: usize,
    /// The learning rate the schedule anneals to (SWALR's `swa_lr`).
    pub lr: f64,
    /// The epochs the annealing takes (SWALR's `anneal_epochs`).
    pub anneal_epochs: usize,
    /// Its shape (SWALR's `anneal_strategy`).
    pub anneal: Anneal,
}

impl SwaConfig {
    /// Whether the weights at the end of `epoch` (0-based) join the average.
    pub fn averages(&self, epoch: usize) -> bool {
        epoch + 1 >= self.start
    }

    /// SWALR's learning rate for `epoch` (0-based), an epoch after the
    /// first average (`epoch >= start`): `lr_then`, the LR of the first
    /// averaged epoch, moved toward `lr` by α(min(1, k/anneal_epochs))
    /// after k averages, α(t) = (1 − cos πt)/2 or t; torch recovers
    /// `lr_then` from the LR it set the epoch before, to the same value.
    pub fn lr_at(&self, epoch: usize, lr_then: f64) -> f64 {
        let k = (epoch + 1).saturating_sub(self.start);
        let t = (k as f64 / self.anneal_epochs.max(1) as f64).min(1.0);
        let alpha = match self.anneal {
            Anneal::Cos => (1.0 - (std::f64::consts::PI * t).cos()) / 2.0,
            Anneal::Linear => t,
        };
        self.lr * alpha + lr_then * (1.0 - alpha)
    }

    /// Why these values make no schedule (`flag` names a field as the
    /// command line or config.json does).
    pub fn problem(&self, flag: impl Fn(&str) -> String) -> Option<String> {
        if self.start < 1 {
            return Some(format!("{} must be at least 1", flag("swa_start")));
        }
        let lr = self.lr;
        (!(lr >= 0.0 && lr <= f32::MAX as f64)).then(|| {
            format!(
                "{} {} must be 0 or more and within float32's range, in which the weights are updated",
                flag("swa_lr"),
                Num(lr)
            )
        })
    }
}
