//! `--scheduler onecycle`: PyTorch's `OneCycleLR`, stepped after every
//! optimizer update as PyTorch users step it (not once per epoch as the
//! other schedules): the LR rises from `lr / div_factor` to `lr` over the
//! first `pct_start` of the run's updates and falls to `lr / div_factor /
//! final_div_factor` by its last (or, with `three_phase`, falls back to the
//! start and then to that floor), while the momentum (Adam's beta1) moves
//! the other way between its `(base, max)`. PyTorch's arithmetic, in f64
//! as Python's floats.

use serde::{Deserialize, Serialize};

use crate::choice::Choice;
use crate::num::Num;

/// How each phase moves from its start to its end value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Anneal {
    Cos,
    Linear,
}

impl Choice for Anneal {
    const ALL: &'static [Self] = &[Anneal::Cos, Anneal::Linear];
    fn name(self) -> &'static str {
        match self {
            Anneal::Cos => "cos",
            Anneal::Linear => "linear",
        }
    }
    fn help(self) -> &'static str {
        match self {
            Anneal::Cos => "half a cosine (OneCycleLR's and SWALR's default)",
            Anneal::Linear => "a straight line",
        }
    }
}

impl Anneal {
    /// From `start` (at `pct` 0) to `end` (at 1), as PyTorch's
    /// `_annealing_cos` / `_annealing_linear` compute it.
    fn between(self, start: f64, end: f64, pct: f64) -> f64 {
        match self {
            Anneal::Cos => end + (start - end) / 2.0 * ((std::f64::consts::PI * pct).cos() + 1.0),
            Anneal::Linear => (end - start) * pct + start,
        }
    }
}

/// OneCycleLR's defaults (PyTorch's).
pub const PCT_START: f64 = 0.3;
pub const DIV_FACTOR: f64 = 25.0;
pub const FINAL_DIV_FACTOR: f64 = 1e4;
pub const CYCLE_MOMENTUM: (f64, f64) = (0.85, 0.95);

/// A OneCycleLR schedule; its peak LR is the run's `lr` (`max_lr`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct OneCycle {
    pub pct_start: f64,
    pub div_factor: f64,
    pub final_div_factor: f64,
    pub anneal: Anneal,
    pub three_phase: bool,
    /// The momentum's (base, max), cycled against the LR; none: the
    /// optimizer's own momentum throughout (`cycle_momentum=False`).
    pub momentum: Option<(f64, f64)>,
    /// Optimizer updates per epoch (the data's, known once the run has
    /// its split; 0 before): the schedule spans `epochs` of them, as
    /// `OneCycleLR(epochs=, steps_per_epoch=)`.
    #[serde(default)]
    pub steps_per_epoch: usize,
}

impl Default for OneCycle {
    fn default() -> Self {
        OneCycle {
            pct_start: PCT_START,
            div_factor: DIV_FACTOR,
            final_div_factor: FINAL_DIV_FACTOR,
            anneal: Anneal::Cos,
            three_phase: false,
            momentum: Some(CYCLE_MOMENTUM),
            steps_per_epoch: 0,
        }
    }
}

/// One phase: the last update it covers, and its LR's and momentum's
/// start and end values.
#[derive(Clone, Copy)]
struct Phase {
    end: f64,
    lr: (f64, f64),
    momentum: (f64, f64),
}

impl OneCycle {
    /// The schedule's two or three phases (a fixed array and how many of
    /// it are used: `at` runs every update, and allocates nothing).
    fn phases(&self, max_lr: f64, total: usize) -> ([Phase; 3], usize) {
        let initial = max_lr / self.div_factor;
        let min = initial / self.final_div_factor;
        let (base, max) = self.momentum.unwrap_or_default();
        let (p, t) = (self.pct_start, total as f64);
        let rise = Phase {
            end: p * t - 1.0,
            lr: (initial, max_lr),
            momentum: (max, base),
        };
        match self.three_phase {
            true => (
                [
                    rise,
                    Phase {
                        end: 2.0 * p * t - 2.0,
                        lr: (max_lr, initial),
                        momentum: (base, max),
                    },
                    Phase {
                        end: t - 1.0,
                        lr: (initial, min),
                        momentum: (max, max),
                    },
                ],
                3,
            ),
            false => {
                let fall = Phase {
                    end: t - 1.0,
                    lr: (max_lr, min),
                    momentum: (base, max),
                };
                ([rise, fall, fall], 2)
            }
        }
    }

    /// The LR and the cycled momentum (none without cycling) of update
    /// `update` (0-based) of `total`, peaking at `max_lr`: PyTorch's
    /// `get_lr` after `update` scheduler steps.
    pub fn at(&self, max_lr: f64, update: usize, total: usize) -> (f64, Option<f64>) {
        let (all, n) = self.phases(max_lr, total);
        let phases = &all[..n];
        let s = update as f64;
        let mut start = 0.0;
        for (i, ph) in phases.iter().enumerate() {
            if s <= ph.end || i + 1 == phases.len() {
                let pct = (s - start) / (ph.end - start);
                let lr = self.anneal.between(ph.lr.0, ph.lr.1, pct);
                let m = self.momentum.map(|_| {
                    let (a, b) = ph.momentum;
                    self.anneal.between(a, b, pct)
                });
                return (lr, m);
            }
            start = ph.end;
        }
        unreachable!("the last phase takes every update")
    }

    /// The LR of `epoch`'s first update, as metrics.jsonl records it.
    pub fn lr_of_epoch(&self, max_lr: f64, epoch: usize, epochs: usize) -> f64 {
        let s = self.steps_per_epoch.max(1);
        self.at(max_lr, epoch * s, epochs * s).0
    }

    /// Why these values cannot make a schedule (PyTorch refuses a
    /// pct_start outside [0, 1]; the rest would make the LR infinite or
    /// NaN, or a momentum no optimizer takes); `name` says how a field
    /// is named (a state file's key, a flag).
    pub fn problem(&self, name: impl Fn(&str) -> String) -> Option<String> {
        if !(0.0..=1.0).contains(&self.pct_start) {
            return Some(format!(
                "{} {} must be in [0, 1]",
                name("pct_start"),
                Num(self.pct_start)
            ));
        }
        let factors = [
            ("div_factor", self.div_factor),
            ("final_div_factor", self.final_div_factor),
        ];
        if let Some((field, v)) = factors
            .into_iter()
            .find(|(_, v)| !(*v > 0.0 && v.is_finite()))
        {
            return Some(format!(
                "{} {} must be a positive number",
                name(field),
                Num(v)
            ));
        }
        let (base, max) = self.momentum?;
        let ok = |m: f64| (0.0..1.0).contains(&m);
        (!(ok(base) && ok(max) && base <= max)).then(|| {
            format!(
                "{} {},{} must be a base and a maximum in [0, 1), the base not above the maximum",
                name("cycle_momentum"),
                Num(base),
                Num(max)
            )
        })
    }

    /// Why a run of `total` updates cannot follow the schedule: where the
    /// first phase ends at update 0 (`pct_start · total = 1`), PyTorch
    /// divides 0 by 0 there (the only phase of no length an update falls
    /// in: a later one of no length takes none).
    pub fn total_problem(&self, total: usize) -> Option<String> {
        (self.pct_start * total as f64 - 1.0 == 0.0).then(|| {
            format!(
                "--pct-start {} of the run's {total} updates ends the rise at its first update, where OneCycleLR divides by zero; give another --pct-start, or more epochs",
                Num(self.pct_start)
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values worked by hand from PyTorch's formulas: 10 updates, peak 1,
    /// the rise ends at update 2 (0.3·10 − 1).
    #[test]
    fn follows_pytorchs_phases() {
        let c = OneCycle::default();
        let (lr, m) = c.at(1.0, 0, 10);
        assert!((lr - 0.04).abs() < 1e-15 && (m.unwrap() - 0.95).abs() < 1e-15);
        let (lr, m) = c.at(1.0, 1, 10);
        assert!((lr - (1.0 + (0.04 - 1.0) / 2.0)).abs() < 1e-15, "{lr}");
        assert!((m.unwrap() - 0.90).abs() < 1e-15);
        let (lr, m) = c.at(1.0, 2, 10);
        assert!((lr - 1.0).abs() < 1e-15 && (m.unwrap() - 0.85).abs() < 1e-15);
        let (lr, m) = c.at(1.0, 9, 10);
        assert!((lr - 0.04 / 1e4).abs() < 1e-18 && (m.unwrap() - 0.95).abs() < 1e-15);
        let linear = OneCycle {
            anneal: Anneal::Linear,
            momentum: None,
            ..c
        };
        // Half-way down the second phase (from 2 to 9): 1 → 4e-6.
        let (lr, m) = linear.at(1.0, 5, 10);
        let want = 1.0 + (4e-6 - 1.0) * 3.0 / 7.0;
        assert!((lr - want).abs() < 1e-15 && m.is_none(), "{lr}");
        let three = OneCycle {
            three_phase: true,
            anneal: Anneal::Linear,
            ..c
        };
        // Phases end at 2, 4 and 9: back at the start LR at 4.
        assert!((three.at(1.0, 4, 10).0 - 0.04).abs() < 1e-15);
        assert!((three.at(1.0, 4, 10).1.unwrap() - 0.95).abs() < 1e-15);
    }

    /// Only a rise ending at update 0 divides by zero: every other
    /// (pct_start, total) gives finite values at every update.
    #[test]
    fn only_a_rise_ending_at_the_first_update_is_degenerate() {
        for three_phase in [false, true] {
            for total in 1..40 {
                for pct in [0.0, 0.05, 0.1, 0.25, 0.3, 0.5, 0.75, 1.0] {
                    let c = OneCycle {
                        pct_start: pct,
                        three_phase,
                        ..OneCycle::default()
                    };
                    let finite = (0..total).all(|u| {
                        let (lr, m) = c.at(0.1, u, total);
                        lr.is_finite() && m.unwrap().is_finite()
                    });
                    assert_eq!(finite, c.total_problem(total).is_none(), "{pct} {total}");
                }
            }
        }
    }
}
