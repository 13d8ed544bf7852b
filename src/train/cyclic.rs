//! `--scheduler cyclic`: PyTorch's `CyclicLR`, stepped after every
//! optimizer update as OneCycleLR is (`onecycle`): the LR rises from
//! `base_lr` (`--lr-min`) to `max_lr` (`--lr`) over `step_size_up` updates
//! and falls back over `step_size_down`, over and over; `triangular2`
//! halves each cycle's amplitude, `exp_range` scales it by `gamma` to the
//! power of the update's number. The momentum (Adam's beta1) moves the
//! other way between its `(base, max)`. PyTorch's arithmetic, in f64 as
//! Python's floats.

use serde::{Deserialize, Serialize};

use crate::choice::Choice;
use crate::num::Num;

/// How the cycles' amplitude changes (CyclicLR's `mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CyclicMode {
    Triangular,
    Triangular2,
    ExpRange,
}

impl Choice for CyclicMode {
    const ALL: &'static [Self] = &[
        CyclicMode::Triangular,
        CyclicMode::Triangular2,
        CyclicMode::ExpRange,
    ];
    fn name(self) -> &'static str {
        match self {
            CyclicMode::Triangular => "triangular",
            CyclicMode::Triangular2 => "triangular2",
            CyclicMode::ExpRange => "exp_range",
        }
    }
    fn help(self) -> &'static str {
        match self {
            CyclicMode::Triangular => "every cycle alike (CyclicLR's default)",
            CyclicMode::Triangular2 => "each cycle's amplitude half the one before",
            CyclicMode::ExpRange => "the amplitude times --gamma every update",
        }
    }
}

/// CyclicLR's defaults (PyTorch's): 2,000 updates up, as many down; the
/// momentum between 0.8 and 0.9.
pub const STEP_SIZE_UP: usize = 2000;
pub const CYCLE_MOMENTUM: (f64, f64) = (0.8, 0.9);

/// A CyclicLR schedule between the run's `lr_min` (`base_lr`) and `lr`
/// (`max_lr`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Cyclic {
    pub step_size_up: usize,
    pub step_size_down: usize,
    pub mode: CyclicMode,
    /// `exp_range`'s factor per update (1 for the other modes).
    pub gamma: f64,
    /// The momentum's (base, max), cycled against the LR; none: the
    /// optimizer's own momentum throughout (`cycle_momentum=False`).
    pub momentum: Option<(f64, f64)>,
    /// Optimizer updates per epoch (the data's, known once the run has
    /// its split; 0 before): an update's number in the run is
    /// `epoch · steps_per_epoch + update`.
    #[serde(default)]
    pub steps_per_epoch: usize,
}

impl Cyclic {
    /// The LR and the cycled momentum (none without cycling) of update
    /// `update` (0-based) of the run: PyTorch's `get_lr` after `update`
    /// scheduler steps.
    pub fn at(&self, base_lr: f64, max_lr: f64, update: usize) -> (f64, Option<f64>) {
        let total = (self.step_size_up + self.step_size_down) as f64;
        let ratio = self.step_size_up as f64 / total;
        let it = update as f64;
        let cycle = (1.0 + it / total).floor();
        let x = 1.0 + it / total - cycle;
        let factor = match x <= ratio {
            true => x / ratio,
            false => (x - 1.0) / (ratio - 1.0),
        };
        let scale = match self.mode {
            CyclicMode::Triangular => 1.0,
            CyclicMode::Triangular2 => 1.0 / 2f64.powf(cycle - 1.0),
            CyclicMode::ExpRange => self.gamma.powf(it),
        };
        let lr = base_lr + (max_lr - base_lr) * factor * scale;
        let momentum = self
            .momentum
            .map(|(base, max)| max - (max - base) * factor * scale);
        (lr, momentum)
    }

    /// The LR of `epoch`'s first update, as metrics.jsonl records it.
    pub fn lr_of_epoch(&self, base_lr: f64, max_lr: f64, epoch: usize) -> f64 {
        let s = self.steps_per_epoch.max(1);
        self.at(base_lr, max_lr, epoch.saturating_mul(s)).0
    }

    /// Why these values cannot make a schedule (a rise of 0 updates
    /// divides 0 by 0 in torch; a gamma outside (0, 1] would grow the
    /// cycles without end, a momentum no optimizer takes train to NaN);
    /// `name` says how a field is named (a state file's key, a flag).
    pub fn problem(&self, name: impl Fn(&str) -> String) -> Option<String> {
        if self.step_size_up < 1 {
            return Some(format!(
                "{} {},{} must rise over 1 update or more (a fall of 0 is a sawtooth)",
                name("cycle_steps"),
                self.step_size_up,
                self.step_size_down
            ));
        }
        if !(self.gamma > 0.0 && self.gamma <= 1.0) {
            return Some(format!(
                "{} {} must be in (0, 1] (exp_range's factor per update)",
                name("gamma"),
                Num(self.gamma)
            ));
        }
        match self.momentum {
            Some((base, max)) if !(0.0 <= base && base <= max && max < 1.0) => Some(format!(
                "{} {},{} must be a base and a maximum in [0, 1), the base not above the maximum",
                name("cycle_momentum"),
                Num(base),
                Num(max)
            )),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cyclic(mode: CyclicMode, gamma: f64) -> Cyclic {
        Cyclic {
            step_size_up: 4,
            step_size_down: 2,
            mode,
            gamma,
            momentum: Some(CYCLE_MOMENTUM),
            steps_per_epoch: 0,
        }
    }

    /// Up over 4 updates, down over 2, by hand: 1, 2, 3, 4, 5, 3, 1, ...
    /// (base 1, max 5); the momentum the other way; triangular2 halves the
    /// second cycle; exp_range scales by gamma^update.
    #[test]
    fn cycles_as_pytorch_computes_them() {
        let near = |a: f64, b: f64| (a - b).abs() < 1e-12;
        let c = cyclic(CyclicMode::Triangular, 1.0);
        for (u, want) in [1.0, 2.0, 3.0, 4.0, 5.0, 3.0, 1.0, 2.0]
            .into_iter()
            .enumerate()
        {
            assert!(near(c.at(1.0, 5.0, u).0, want), "update {u}");
        }
        let (_, m) = c.at(1.0, 5.0, 4);
        assert!(near(m.unwrap(), 0.8), "the momentum is lowest at the peak");
        assert!(near(c.at(1.0, 5.0, 6).1.unwrap(), 0.9));
        let c2 = cyclic(CyclicMode::Triangular2, 1.0);
        assert!(
            near(c2.at(1.0, 5.0, 9).0, 1.0 + 4.0 * 0.75 * 0.5),
            "the second cycle is half as high"
        );
        let e = cyclic(CyclicMode::ExpRange, 0.5);
        assert!(near(e.at(1.0, 5.0, 2).0, 1.0 + 4.0 * 0.5 * 0.25));
    }
}
