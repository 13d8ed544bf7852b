//! The options of the schedules stepped after every update: `--scheduler
//! onecycle`'s (PyTorch's `OneCycleLR` arguments) and `--scheduler
//! cyclic`'s (`CyclicLR`'s), and the momentum both cycle.

use anyhow::Result;
use vggctl::train::SchedulerKind;
use vggctl::train::config::TrainConfig;
use vggctl::train::cyclic::{self, Cyclic, CyclicMode, STEP_SIZE_UP};
use vggctl::train::onecycle::{
    self as one, Anneal, DIV_FACTOR, FINAL_DIV_FACTOR, OneCycle, PCT_START,
};

use super::opts::choice;
use super::output::{pair, usage, whole};

#[derive(clap::Args, Debug, Clone)]
pub struct CycleOpts {
    /// onecycle: the fraction of the run's updates over which the LR rises
    /// to --lr (OneCycleLR's pct_start).
    #[arg(long, value_name = "F", default_value_t = PCT_START, help_heading = "Schedule")]
    pub pct_start: f64,
    /// onecycle: the LR starts at --lr divided by this.
    #[arg(long, value_name = "F", default_value_t = DIV_FACTOR, help_heading = "Schedule")]
    pub div_factor: f64,
    /// onecycle: the last LR is the starting one divided by this.
    #[arg(long, value_name = "F", default_value_t = FINAL_DIV_FACTOR, help_heading = "Schedule")]
    pub final_div_factor: f64,
    /// onecycle: how each phase moves between its values.
    #[arg(long, value_name = "HOW", value_parser = choice::<Anneal>(), default_value = "cos", help_heading = "Schedule")]
    pub anneal_strategy: Anneal,
    /// onecycle: rise, fall back to the starting LR, then to the last
    /// (OneCycleLR's three_phase) instead of rise and fall.
    #[arg(long, help_heading = "Schedule")]
    pub three_phase: bool,
    /// cyclic: the updates of each cycle's rise and fall (CyclicLR's
    /// step_size_up and step_size_down; DOWN defaults to UP).
    #[arg(long, value_name = "UP[,DOWN]", default_value_t = STEP_SIZE_UP.to_string(), help_heading = "Schedule")]
    pub cycle_steps: String,
    /// cyclic: how the cycles' amplitude changes (CyclicLR's mode);
    /// exp_range's factor per update is --gamma, which it needs.
    #[arg(long, value_name = "MODE", value_parser = choice::<CyclicMode>(), default_value = "triangular", help_heading = "Schedule")]
    pub cyclic_mode: CyclicMode,
    /// onecycle, cyclic: the momentum (Adam's beta1) moves between BASE
    /// (at the peak LR) and MAX (at the lowest), replacing --momentum
    /// [default: 0.85,0.95 for onecycle, 0.8,0.9 for cyclic, torch's].
    #[arg(long, value_name = "BASE,MAX", value_parser = pair, help_heading = "Schedule")]
    pub cycle_momentum: Option<(f64, f64)>,
    /// onecycle, cyclic: keep the optimizer's momentum (their
    /// cycle_momentum=False).
    #[arg(long, conflicts_with = "cycle_momentum", help_heading = "Schedule")]
    pub no_cycle_momentum: bool,
}

impl CycleOpts {
    /// The cycled momentum, with `default` where none was given.
    fn momentum(&self, default: (f64, f64)) -> Option<(f64, f64)> {
        (!self.no_cycle_momentum).then_some(self.cycle_momentum.unwrap_or(default))
    }

    /// `--cycle-steps UP[,DOWN]` as whole numbers.
    fn steps(&self) -> Result<(usize, usize)> {
        let parts: Vec<&str> = self.cycle_steps.split(',').collect();
        let bad = || {
            usage(format!(
                "--cycle-steps {} must be UP or UP,DOWN: whole numbers of updates",
                self.cycle_steps
            ))
        };
        let up = whole::<usize>(parts[0]).map_err(|_| bad())?;
        match parts.len() {
            1 => Ok((up, up)),
            2 => Ok((up, whole::<usize>(parts[1]).map_err(|_| bad())?)),
            _ => Err(bad()),
        }
    }

    /// CyclicLR as these options describe it, with `gamma` for
    /// exp_range (the updates per epoch are the run's to fill in), or a
    /// usage error naming the bad value.
    pub fn cyclic(&self, gamma: f64) -> Result<Cyclic> {
        let (up, down) = self.steps()?;
        let c = Cyclic {
            step_size_up: up,
            step_size_down: down,
            mode: self.cyclic_mode,
            gamma: match self.cyclic_mode {
                CyclicMode::ExpRange => gamma,
                _ => 1.0,
            },
            momentum: self.momentum(cyclic::CYCLE_MOMENTUM),
            steps_per_epoch: 0,
        };
        match c.problem(|f| format!("--{}", f.replace('_', "-"))) {
            Some(problem) => Err(usage(problem)),
            None => Ok(c),
        }
    }

    /// The schedule these options describe (its updates per epoch are
    /// the run's to fill in), or a usage error naming the bad value.
    pub fn get(&self) -> Result<OneCycle> {
        let c = OneCycle {
            pct_start: self.pct_start,
            div_factor: self.div_factor,
            final_div_factor: self.final_div_factor,
            anneal: self.anneal_strategy,
            three_phase: self.three_phase,
            momentum: self.momentum(one::CYCLE_MOMENTUM),
            steps_per_epoch: 0,
        };
        match c.problem(|f| format!("--{}", f.replace('_', "-"))) {
            Some(problem) => Err(usage(problem)),
            None => Ok(c),
        }
    }

    /// With --scheduler onecycle or cyclic: the schedule (its values
    /// checked by `validate`), and the momentum (Adam's beta1) at its
    /// maximum, where both constructors start it.
    pub fn configure(&self, config: &mut TrainConfig) {
        let momentum = match config.scheduler {
            SchedulerKind::Onecycle => {
                let c = self.get().unwrap_or_default();
                config.onecycle = Some(c);
                c.momentum
            }
            SchedulerKind::Cyclic => {
                let Ok(c) = self.cyclic(config.gamma) else {
                    return;
                };
                config.cyclic = Some(c);
                c.momentum
            }
            _ => None,
        };
        if let Some((_, max)) = momentum {
            config.optimizer.set_cycled_momentum(max);
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Line {
        #[command(flatten)]
        o: CycleOpts,
    }

    /// The defaults are OneCycleLR's and CyclicLR's.
    #[test]
    fn defaults_are_pytorchs() {
        let o = Line::parse_from(["x"]).o;
        let c = o.get().unwrap();
        assert_eq!(c, OneCycle::default());
        assert_eq!(c.momentum, Some((0.85, 0.95)));
        let c = o.cyclic(0.5).unwrap();
        assert_eq!((c.step_size_up, c.step_size_down), (2000, 2000));
        assert_eq!((c.mode, c.gamma), (CyclicMode::Triangular, 1.0));
        assert_eq!(c.momentum, Some((0.8, 0.9)));
        let o = Line::parse_from(["x", "--cycle-steps", "3,5", "--no-cycle-momentum"]).o;
        let c = o.cyclic(0.5).unwrap();
        assert_eq!((c.step_size_up, c.step_size_down, c.momentum), (3, 5, None));
    }
}
