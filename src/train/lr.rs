//! The learning rate of each epoch of a run, from its configuration's
//! schedule (`schedule`) and, for ReduceLROnPlateau, the validation losses
//! of the epochs before it; and the schedules no run can follow.

use anyhow::{Result, bail};

use super::config::TrainConfig;
use super::feed::batches;
use super::schedule::{Restarts, SchedulerKind, Warmup, WarmupMethod, plateau_lr};
use crate::choice::Choice;

impl TrainConfig {
    /// MultiStepLR milestones at or past the last epoch, which never apply
    /// (the CIFAR defaults 50,80 with a short run), as `--milestones` lists them.
    pub fn unreached_milestones(&self) -> Option<String> {
        if self.scheduler != SchedulerKind::Multistep {
            return None;
        }
        let late: Vec<String> = self
            .milestones
            .iter()
            .filter(|&&m| m >= self.epochs)
            .map(|m| m.to_string())
            .collect();
        (!late.is_empty()).then(|| late.join(","))
    }

    /// The learning rate of `epoch` (0-based): the warm-up, then the main
    /// schedule, each a pure function of the epoch; ReduceLROnPlateau's is
    /// a function of `val_losses`, the validation losses of the epochs
    /// before it (any others are not read), so that a resumed run's
    /// history gives it back. After a warm-up of `w` epochs the main
    /// schedule counts its own epochs from `w`, as SequentialLR steps it;
    /// MultiStepLR's milestones stay epochs of the run. OneCycleLR's is
    /// that of the epoch's first update (`update_hypers` gives each).
    /// With `--swa-start`, the epochs after the first average follow SWALR
    /// from the LR of that epoch.
    pub fn lr_at(&self, epoch: usize, val_losses: &[f64]) -> f64 {
        match self.swa {
            Some(s) if epoch >= s.start => s.lr_at(
                epoch,
                self.schedule_lr_at(s.start.saturating_sub(1), val_losses),
            ),
            _ => self.schedule_lr_at(epoch, val_losses),
        }
    }

    /// The learning rate of `epoch` by the warm-up and the main schedule
    /// alone (see [`TrainConfig::lr_at`]).
    fn schedule_lr_at(&self, epoch: usize, val_losses: &[f64]) -> f64 {
        let w = self.warmup_epochs;
        if epoch < w {
            let e = epoch as f64;
            return match self.warmup {
                None => self.lr * (e + 1.0) / w as f64,
                Some(Warmup {
                    method: WarmupMethod::Linear,
                    decay,
                }) => self.lr * (decay + (1.0 - decay) * e / w as f64),
                Some(Warmup {
                    method: WarmupMethod::Constant,
                    decay,
                }) => self.lr * decay,
            };
        }
        let t = epoch - w;
        match self.scheduler {
            SchedulerKind::Multistep => {
                let passed = self.milestones.iter().filter(|&&m| epoch >= m).count();
                self.lr * self.gamma.powi(passed as i32)
            }
            SchedulerKind::Cosine => {
                let span = (self.epochs - w).max(1) as f64;
                let cos = (std::f64::consts::PI * t as f64 / span).cos();
                self.lr_min + (self.lr - self.lr_min) * 0.5 * (1.0 + cos)
            }
            SchedulerKind::Step => self.lr * self.gamma.powi((t / self.step_size.max(1)) as i32),
            SchedulerKind::Exponential => self.lr * self.gamma.powi(t as i32),
            SchedulerKind::Plateau => {
                let seen = &val_losses[..epoch.min(val_losses.len())];
                let waits = (self.patience, self.cooldown);
                plateau_lr(self.lr, self.gamma, self.lr_min, waits, seen)
            }
            SchedulerKind::Onecycle => {
                self.onecycle
                    .unwrap_or_default()
                    .lr_of_epoch(self.lr, epoch, self.epochs)
            }
            SchedulerKind::Poly => {
                let span = (self.epochs - w).max(1) as f64;
                self.lr * (1.0 - (t as f64).min(span) / span).powf(self.power)
            }
            SchedulerKind::Cyclic => self
                .cyclic
                .map_or(self.lr, |c| c.lr_of_epoch(self.lr_min, self.lr, epoch)),
            SchedulerKind::CosineRestarts => {
                let restarts = self.restarts.unwrap_or(Restarts { epochs: 1, mult: 1 });
                let (cur, len) = restarts.position(t);
                let cos = (std::f64::consts::PI * cur as f64 / len as f64).cos();
                self.lr_min + (self.lr - self.lr_min) * 0.5 * (1.0 + cos)
            }
        }
    }

    /// What a run resumed after `epoch` epochs says when its length differs
    /// from `before`'s (the run's as saved) and its schedule anneals over
    /// the run's epochs (cosine, poly, onecycle): the LRs from there on
    /// follow the new length.
    pub fn respan_note(&self, before: &TrainConfig, epoch: usize) -> Option<String> {
        let spans = matches!(
            self.scheduler,
            SchedulerKind::Cosine | SchedulerKind::Poly | SchedulerKind::Onecycle
        );
        (spans && self.epochs != before.epochs).then(|| {
            format!(
                "--epochs {} re-spans the run's {} schedule, which spanned {} epochs: the LR from epoch {} on follows the new length",
                self.epochs,
                self.scheduler.name(),
                before.epochs,
                epoch + 1
            )
        })
    }

    /// Whether the optimizer's momentum changes every update (OneCycleLR's
    /// or CyclicLR's cycling): a captured CUDA graph could not follow it.
    pub fn cycles_momentum(&self) -> bool {
        self.onecycle.is_some_and(|c| c.momentum.is_some())
            || self.cyclic.is_some_and(|c| c.momentum.is_some())
    }

    /// Fixes the updates per epoch of a schedule stepped after every
    /// update (OneCycleLR, CyclicLR) from `images` per rank (a new run's),
    /// or checks that a resumed run's data gives the number it recorded;
    /// then that OneCycleLR's updates make a schedule.
    pub fn settle_updates(&mut self, images: i64) -> Result<()> {
        let updates = batches(images, self.batch_size).div_ceil(self.accum_steps.max(1));
        let name = self.scheduler.name();
        let recorded = match (&mut self.onecycle, &mut self.cyclic) {
            (Some(c), _) => &mut c.steps_per_epoch,
            (_, Some(c)) => &mut c.steps_per_epoch,
            _ => return Ok(()),
        };
        match *recorded {
            0 => *recorded = updates,
            s if s != updates => bail!(
                "the run's {name} schedule counts {s} updates per epoch, and its data now gives {updates}: continue it with the data and ranks it started with"
            ),
            _ => {}
        }
        if let Some(problem) = self
            .onecycle
            .and_then(|c| c.total_problem(self.epochs * updates))
        {
            bail!("{problem}");
        }
        Ok(())
    }

    /// The LR and the cycled momentum (OneCycleLR's or CyclicLR's; none
    /// for the other schedules, whose momentum is the optimizer's) of the
    /// `update`-th optimizer update of `epoch`.
    pub fn update_hypers(
        &self,
        epoch: usize,
        update: usize,
        val_losses: &[f64],
    ) -> (f64, Option<f64>) {
        match (self.scheduler, self.onecycle, self.cyclic) {
            (SchedulerKind::Onecycle, Some(c), _) => {
                let s = c.steps_per_epoch;
                c.at(self.lr, epoch * s + update, self.epochs * s)
            }
            (SchedulerKind::Cyclic, _, Some(c)) => {
                c.at(self.lr_min, self.lr, epoch * c.steps_per_epoch + update)
            }
            _ => (self.lr_at(epoch, val_losses), None),
        }
    }

    /// Why the schedule cannot run: the largest learning rate it reaches
    /// (the warm-up's, each milestone's, the first and last epoch's: every
    /// schedule is monotone between them; ReduceLROnPlateau never rises) beyond float32's range, which the
    /// update computes in (libtorch refuses to convert it).
    pub fn lr_problem(&self) -> Option<String> {
        if matches!(
            self.scheduler,
            SchedulerKind::Onecycle | SchedulerKind::Cyclic
        ) {
            // OneCycleLR peaks at --lr, its max_lr; CyclicLR between
            // --lr-min and --lr (either may be the higher, as in torch).
            let peak = self.lr.max(self.lr_min);
            return (peak > f32::MAX as f64).then(|| {
                format!(
                    "the learning rate reaches {:.3e} at its peak, beyond float32's largest value {:.3e}, in which the weights are updated",
                    peak,
                    f32::MAX
                )
            });
        }
        let last = self.epochs.max(1) - 1;
        let w = self.warmup_epochs;
        let (epoch, lr) = [0, w.saturating_sub(1), w, last]
            .into_iter()
            .chain(self.milestones.iter().copied())
            .filter(|&e| e <= last)
            .map(|e| (e, self.schedule_lr_at(e, &[])))
            .reduce(|a, b| if b.1 > a.1 { b } else { a })?;
        (lr > f32::MAX as f64 || lr.is_nan()).then(|| {
            format!(
                "the learning rate reaches {lr:.3e} at epoch {} of its schedule, beyond float32's largest value {:.3e}, in which the weights are updated",
                epoch + 1,
                f32::MAX
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::config::tests::config;
    use crate::train::onecycle::Anneal;
    use crate::train::schedule::SwaConfig;

    /// PyTorch's MultiStepLR(milestones=[50, 80], gamma=0.1) stepped once
    /// per epoch: lr for epochs 0-49, lr·0.1 for 50-79, lr·0.01 from 80.
    #[test]
    fn multistep_decays_at_each_milestone() {
        let c = config(SchedulerKind::Multistep, 100, 0);
        for (epoch, want) in [
            (0, 0.1),
            (49, 0.1),
            (50, 0.01),
            (79, 0.01),
            (80, 0.001),
            (99, 0.001),
        ] {
            assert!(
                (c.lr_at(epoch, &[]) - want).abs() < 1e-15,
                "epoch {epoch}: {}",
                c.lr_at(epoch, &[])
            );
        }
    }

    /// Milestones at or past the last epoch are named (they never apply:
    /// the LR of the last epoch, 0-based epochs - 1, is undecayed).
    #[test]
    fn milestones_past_the_run_are_named() {
        let c = config(SchedulerKind::Multistep, 100, 0);
        assert_eq!(c.unreached_milestones(), None);
        let c = config(SchedulerKind::Multistep, 50, 0);
        assert_eq!(c.unreached_milestones().as_deref(), Some("50,80"));
        assert!((c.lr_at(49, &[]) - c.lr).abs() < 1e-15);
        let c = config(SchedulerKind::Multistep, 60, 0);
        assert_eq!(c.unreached_milestones().as_deref(), Some("80"));
        assert_eq!(
            config(SchedulerKind::Cosine, 3, 0).unreached_milestones(),
            None
        );
    }

    /// CosineAnnealingLR(T_max = epochs - warmup, eta_min 0) after a linear
    /// warm-up of 2 epochs: lr/2, lr, then lr·(1 + cos(π t / 8)) / 2.
    #[test]
    fn cosine_follows_the_closed_form_after_warm_up() {
        let c = config(SchedulerKind::Cosine, 10, 2);
        assert!((c.lr_at(0, &[]) - 0.05).abs() < 1e-15);
        assert!((c.lr_at(1, &[]) - 0.1).abs() < 1e-15);
        for epoch in 2..10 {
            let t = (epoch - 2) as f64;
            let want = 0.1 * 0.5 * (1.0 + (std::f64::consts::PI * t / 8.0).cos());
            assert!((c.lr_at(epoch, &[]) - want).abs() < 1e-15, "epoch {epoch}");
        }
        assert!((c.lr_at(6, &[]) - 0.05).abs() < 1e-15, "half-way is lr/2");
    }

    /// PolynomialLR(total_iters = epochs - warmup, power 2) after a
    /// ramp of 2 epochs: lr·(1 − t/8)², never reaching 0 inside the run.
    #[test]
    fn poly_decays_over_the_epochs_after_warm_up() {
        let mut c = config(SchedulerKind::Poly, 10, 2);
        c.power = 2.0;
        for epoch in 2..10 {
            let t = (epoch - 2) as f64;
            let want = 0.1 * (1.0 - t / 8.0) * (1.0 - t / 8.0);
            assert!((c.lr_at(epoch, &[]) - want).abs() < 1e-15, "epoch {epoch}");
        }
        assert!(c.lr_at(9, &[]) > 0.0);
    }

    /// CosineAnnealingWarmRestarts(T_0 = 2, T_mult = 3): cycles of 2, 6
    /// and 18 epochs, restarting at 2 and 8; each epoch's place in its
    /// cycle by hand.
    #[test]
    fn restarts_lengthen_each_cycle() {
        let r = Restarts { epochs: 2, mult: 3 };
        let want = [(0, 2), (1, 2), (0, 6), (5, 6), (0, 18), (17, 18), (0, 54)];
        for (t, w) in [0, 1, 2, 7, 8, 25, 26].into_iter().zip(want) {
            assert_eq!(r.position(t), w, "epoch {t}");
        }
        let same = Restarts { epochs: 3, mult: 1 };
        assert_eq!(same.position(7), (1, 3));
        let mut c = config(SchedulerKind::CosineRestarts, 12, 0);
        (c.restarts, c.lr_min) = (Some(r), 0.01);
        assert!(
            (c.lr_at(2, &[]) - 0.1).abs() < 1e-15,
            "a restart is back at lr"
        );
        let half = 0.01 + 0.09 * 0.5 * (1.0 + (std::f64::consts::PI * 3.0 / 6.0).cos());
        assert!((c.lr_at(5, &[]) - half).abs() < 1e-15);
    }

    /// SWALR by hand: the first averaged epoch keeps the schedule's LR,
    /// then α(k/anneal_epochs) of the way to swa_lr, then swa_lr.
    #[test]
    fn swalr_anneals_from_the_schedules_lr() {
        let c = SwaConfig {
            start: 3,
            lr: 0.01,
            anneal_epochs: 2,
            anneal: Anneal::Linear,
        };
        assert!(!c.averages(1) && c.averages(2));
        let lr_then = 0.05;
        assert!((c.lr_at(3, lr_then) - 0.03).abs() < 1e-15);
        assert!((c.lr_at(4, lr_then) - 0.01).abs() < 1e-15);
        assert!((c.lr_at(9, lr_then) - 0.01).abs() < 1e-15);
        let cos = SwaConfig {
            anneal: Anneal::Cos,
            anneal_epochs: 4,
            ..c
        };
        // α(1/4) = (1 − cos(π/4))/2
        let a = (1.0 - (std::f64::consts::PI / 4.0).cos()) / 2.0;
        assert!((cos.lr_at(3, lr_then) - (0.01 * a + 0.05 * (1.0 - a))).abs() < 1e-15);
        let none = SwaConfig {
            anneal_epochs: 0,
            ..c
        };
        assert!((none.lr_at(3, lr_then) - 0.01).abs() < 1e-15);
    }
}
