//! What the update rule is and its hyper-parameters, as a run's
//! configuration records them, and the values torch.optim would refuse.

use crate::num::Num;
use serde::{Deserialize, Serialize};

use crate::choice::{Choice, Takers};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    Sgd,
    Adam,
    Adamw,
    Rmsprop,
    Nadam,
    Radam,
    Adamax,
    Adagrad,
    Adadelta,
}

impl Choice for OptimizerKind {
    const ALL: &'static [Self] = &[
        OptimizerKind::Sgd,
        OptimizerKind::Adam,
        OptimizerKind::Adamw,
        OptimizerKind::Rmsprop,
        OptimizerKind::Nadam,
        OptimizerKind::Radam,
        OptimizerKind::Adamax,
        OptimizerKind::Adagrad,
        OptimizerKind::Adadelta,
    ];
    fn name(self) -> &'static str {
        match self {
            OptimizerKind::Sgd => "sgd",
            OptimizerKind::Adam => "adam",
            OptimizerKind::Adamw => "adamw",
            OptimizerKind::Rmsprop => "rmsprop",
            OptimizerKind::Nadam => "nadam",
            OptimizerKind::Radam => "radam",
            OptimizerKind::Adamax => "adamax",
            OptimizerKind::Adagrad => "adagrad",
            OptimizerKind::Adadelta => "adadelta",
        }
    }
    fn help(self) -> &'static str {
        match self {
            OptimizerKind::Sgd => "SGD with momentum (PyTorch's semantics), optionally Nesterov",
            OptimizerKind::Adam => {
                "Adam (torch.optim.Adam: the weight decay is an L2 term added to the gradient)"
            }
            OptimizerKind::Adamw => "AdamW (decoupled weight decay)",
            OptimizerKind::Rmsprop => {
                "RMSprop (torch.optim.RMSprop: --alpha, --eps, --momentum; weight decay as an L2 term)"
            }
            OptimizerKind::Nadam => {
                "NAdam, Adam with Nesterov momentum (torch.optim.NAdam: --betas, --eps, --momentum-decay; weight decay as an L2 term)"
            }
            OptimizerKind::Radam => {
                "RAdam, Adam with its early steps' variance rectified (torch.optim.RAdam: --betas, --eps; weight decay as an L2 term)"
            }
            OptimizerKind::Adamax => {
                "Adamax, Adam with the infinity norm for the second moment (torch.optim.Adamax: --betas, --eps; weight decay as an L2 term)"
            }
            OptimizerKind::Adagrad => {
                "Adagrad, each weight's step over the root of its squared gradients' sum (torch.optim.Adagrad: --lr-decay, --initial-accumulator-value, --eps; weight decay as an L2 term)"
            }
            OptimizerKind::Adadelta => {
                "Adadelta, each weight's step scaled by the root of its past steps' average over its gradients' (torch.optim.Adadelta: --rho, --eps; weight decay as an L2 term; torch's LR is 1.0, so give --lr 1)"
            }
        }
    }
    fn other_forms() -> &'static [(&'static str, &'static str)] {
        Self::OTHER_FORMS
    }
}

impl OptimizerKind {
    /// torchvision's and timm's names for a rule with an option.
    const OTHER_FORMS: &[(&str, &str)] = &[
        ("sgd_nesterov", "--optimizer sgd --nesterov"),
        ("nesterov", "--optimizer sgd --nesterov"),
        ("nadamw", "--optimizer nadam --decoupled-weight-decay"),
        ("radamw", "--optimizer radam --decoupled-weight-decay"),
    ];

    /// Adam or AdamW (libtorch's fused kernels; AMSGrad).
    pub fn is_adam(self) -> bool {
        matches!(self, OptimizerKind::Adam | OptimizerKind::Adamw)
    }

    /// Whether libtorch has a fused (multi-tensor) kernel for it.
    pub fn is_fused(self) -> bool {
        matches!(self, OptimizerKind::Sgd) || self.is_adam()
    }

    /// Adam's family: first and second moments, --betas and --eps.
    pub fn has_betas(self) -> bool {
        self.is_adam()
            || matches!(
                self,
                OptimizerKind::Nadam | OptimizerKind::Radam | OptimizerKind::Adamax
            )
    }

    /// The default of `eps` (torch.optim's: Adagrad's is 1e-10,
    /// Adadelta's 1e-6).
    pub fn default_eps(self) -> f64 {
        match self {
            OptimizerKind::Adagrad => 1e-10,
            OptimizerKind::Adadelta => 1e-6,
            _ => 1e-8,
        }
    }

    /// Whether it has a momentum (SGD's and RMSprop's).
    pub fn has_momentum(self) -> bool {
        matches!(self, OptimizerKind::Sgd | OptimizerKind::Rmsprop)
    }

    /// Whether `eps` is in its denominator (all but SGD's).
    pub fn has_eps(self) -> bool {
        self != OptimizerKind::Sgd
    }
}

/// The update rules' own options, each with the rules that take it: the
/// one list that says which options an optimizer has a use for.
pub const RULE_OPTIONS: &[Takers<OptimizerKind>] = &[
    (&["momentum"], OptimizerKind::has_momentum),
    (&["nesterov"], |k| k == OptimizerKind::Sgd),
    (&["betas"], OptimizerKind::has_betas),
    (&["eps"], OptimizerKind::has_eps),
    (&["alpha", "centered"], |k| k == OptimizerKind::Rmsprop),
    (&["amsgrad"], OptimizerKind::is_adam),
    (&["momentum_decay"], |k| k == OptimizerKind::Nadam),
    (&["decoupled_weight_decay"], |k| {
        matches!(k, OptimizerKind::Nadam | OptimizerKind::Radam)
    }),
    (&["lr_decay", "initial_accumulator_value"], |k| {
        k == OptimizerKind::Adagrad
    }),
    (&["rho"], |k| k == OptimizerKind::Adadelta),
];

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct OptimizerConfig {
    pub kind: OptimizerKind,
    pub momentum: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
    pub betas: (f64, f64),
    pub eps: f64,
    /// RMSprop's smoothing constant of the squared gradients' average.
    #[serde(default = "default_alpha", skip_serializing_if = "is_default_alpha")]
    pub alpha: f64,
    /// The weight decay of BatchNorm's weights and biases where it is not
    /// `weight_decay` (torchvision's `--norm-weight-decay`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub norm_weight_decay: Option<f64>,
    /// The weight decay of every bias where it is not the others'
    /// (torchvision's `--bias-weight-decay`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bias_weight_decay: Option<f64>,
    /// Adam's and AdamW's AMSGrad: the denominator from the largest second
    /// moment so far (torch.optim's `amsgrad`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub amsgrad: bool,
    /// RMSprop's centered form: the squared average less the square of
    /// the gradients' average (torch.optim's `centered`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub centered: bool,
    /// NAdam's momentum decay ψ: the momentum of step t is
    /// `beta1·(1 − 0.96^(tψ)/2)` (torch.optim.NAdam's `momentum_decay`).
    #[serde(
        default = "default_momentum_decay",
        skip_serializing_if = "is_default_momentum_decay"
    )]
    pub momentum_decay: f64,
    /// NAdam's and RAdam's weight decay decoupled, as AdamW's: the weights
    /// shrink by `lr·wd` before the step (torch.optim's
    /// `decoupled_weight_decay`; timm's NAdamW).
    #[serde(default, skip_serializing_if = "is_false")]
    pub decoupled_weight_decay: bool,
    /// Adagrad's decay of the learning rate: update t's is
    /// `lr / (1 + (t − 1)·lr_decay)` (torch.optim.Adagrad's `lr_decay`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub lr_decay: f64,
    /// Adagrad's starting value of the squared gradients' sum
    /// (torch.optim.Adagrad's `initial_accumulator_value`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub initial_accumulator_value: f64,
    /// Adadelta's coefficient of its running averages of the squared
    /// gradients and steps (torch.optim.Adadelta's `rho`).
    #[serde(default = "default_rho", skip_serializing_if = "is_default_rho")]
    pub rho: f64,
}

/// Adadelta's default `rho` (PyTorch's).
pub const DEFAULT_RHO: f64 = 0.9;

fn default_rho() -> f64 {
    DEFAULT_RHO
}

fn is_default_rho(v: &f64) -> bool {
    *v == DEFAULT_RHO
}

fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

fn is_false(v: &bool) -> bool {
    !*v
}

/// RMSprop's default `alpha` (PyTorch's).
pub const DEFAULT_ALPHA: f64 = 0.99;

fn default_alpha() -> f64 {
    DEFAULT_ALPHA
}

fn is_default_alpha(v: &f64) -> bool {
    *v == DEFAULT_ALPHA
}

/// NAdam's default `momentum_decay` (PyTorch's).
pub const DEFAULT_MOMENTUM_DECAY: f64 = 4e-3;

fn default_momentum_decay() -> f64 {
    DEFAULT_MOMENTUM_DECAY
}

fn is_default_momentum_decay(v: &f64) -> bool {
    *v == DEFAULT_MOMENTUM_DECAY
}

impl OptimizerConfig {
    /// The CIFAR recipe's SGD: momentum 0.9, weight decay 5e-4, no
    /// Nesterov, one group; torch's defaults for the other optimizers'
    /// values.
    pub fn recipe_sgd() -> OptimizerConfig {
        OptimizerConfig {
            kind: OptimizerKind::Sgd,
            momentum: 0.9,
            weight_decay: 5e-4,
            nesterov: false,
            betas: (0.9, 0.999),
            eps: 1e-8,
            alpha: DEFAULT_ALPHA,
            norm_weight_decay: None,
            bias_weight_decay: None,
            amsgrad: false,
            centered: false,
            momentum_decay: DEFAULT_MOMENTUM_DECAY,
            decoupled_weight_decay: false,
            lr_decay: 0.0,
            initial_accumulator_value: 0.0,
            rho: DEFAULT_RHO,
        }
    }

    /// Sets what OneCycleLR's momentum cycling moves: the Adam family's
    /// beta1, else the momentum (as PyTorch's scheduler picks `betas` when
    /// the optimizer has them).
    pub fn set_cycled_momentum(&mut self, m: f64) {
        match self.kind.has_betas() {
            true => self.betas.0 = m,
            false => self.momentum = m,
        }
    }

    /// Why torch.optim would refuse these values, or could not train with
    /// them: a momentum, weight decay or eps below 0, not finite or beyond
    /// float32's range (the update's), NAdam's momentum decay and Adagrad's
    /// LR decay and starting sum too, Nesterov
    /// without momentum, Adam's betas outside [0, 1), RMSprop's alpha and
    /// Adadelta's rho outside [0, 1] (above 1 their averages go negative);
    /// `name` says how a field is named (a state file's key, a flag).
    pub fn problem(&self, name: impl Fn(&str) -> String) -> Option<String> {
        let values = [
            ("momentum", Some(self.momentum)),
            ("weight_decay", Some(self.weight_decay)),
            ("norm_weight_decay", self.norm_weight_decay),
            ("bias_weight_decay", self.bias_weight_decay),
            ("eps", Some(self.eps)),
            ("momentum_decay", Some(self.momentum_decay)),
            ("lr_decay", Some(self.lr_decay)),
            (
                "initial_accumulator_value",
                Some(self.initial_accumulator_value),
            ),
        ];
        let (b1, b2) = self.betas;
        if let Some((field, v)) = values
            .into_iter()
            .find_map(|(field, v)| Some((field, v.filter(|v| !(*v >= 0.0 && v.is_finite()))?)))
        {
            Some(format!(
                "{} {} must be a finite number, 0 or more",
                name(field),
                Num(v)
            ))
        } else if let Some((field, v)) = values
            .into_iter()
            .find_map(|(field, v)| Some((field, v.filter(|v| *v > f32::MAX as f64)?)))
        {
            Some(format!(
                "{} {} is beyond float32's largest value {:.3e}, in which the update computes",
                name(field),
                Num(v),
                f32::MAX
            ))
        } else if self.nesterov && self.momentum == 0.0 {
            Some(format!(
                "{} needs a {} above 0",
                name("nesterov"),
                name("momentum")
            ))
        } else if !((0.0..1.0).contains(&b1) && (0.0..1.0).contains(&b2)) {
            Some(format!(
                "{} {},{} must each be in [0, 1)",
                name("betas"),
                Num(b1),
                Num(b2)
            ))
        } else if let Some((field, v)) = [("alpha", self.alpha), ("rho", self.rho)]
            .into_iter()
            .find(|(_, v)| !(0.0..=1.0).contains(v))
        {
            Some(format!("{} {} must be in [0, 1]", name(field), Num(v)))
        } else {
            None
        }
    }
}
