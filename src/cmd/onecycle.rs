//! `--scheduler onecycle`'s options (PyTorch's `OneCycleLR` arguments).

use anyhow::Result;
use vggctl::train::SchedulerKind;
use vggctl::train::config::TrainConfig;
#[cfg(test)]
use vggctl::train::onecycle::CYCLE_MOMENTUM;
use vggctl::train::onecycle::{Anneal, DIV_FACTOR, FINAL_DIV_FACTOR, OneCycle, PCT_START};

use super::opts::choice;
use super::output::{pair, usage};

#[derive(clap::Args, Debug, Clone)]
pub struct OneCycleOpts {
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
    /// onecycle: the momentum (Adam's beta1) moves between BASE (at the
    /// peak LR) and MAX (at both ends), replacing --momentum.
    #[arg(long, value_name = "BASE,MAX", default_value = "0.85,0.95", value_parser = pair, help_heading = "Schedule")]
    pub cycle_momentum: (f64, f64),
    /// onecycle: keep the optimizer's momentum (OneCycleLR's
    /// cycle_momentum=False).
    #[arg(long, conflicts_with = "cycle_momentum", help_heading = "Schedule")]
    pub no_cycle_momentum: bool,
}

impl OneCycleOpts {
    /// The schedule these options describe (its updates per epoch are
    /// the run's to fill in), or a usage error naming the bad value.
    pub fn get(&self) -> Result<OneCycle> {
        let c = OneCycle {
            pct_start: self.pct_start,
            div_factor: self.div_factor,
            final_div_factor: self.final_div_factor,
            anneal: self.anneal_strategy,
            three_phase: self.three_phase,
            momentum: (!self.no_cycle_momentum).then_some(self.cycle_momentum),
            steps_per_epoch: 0,
        };
        match c.problem(|f| format!("--{}", f.replace('_', "-"))) {
            Some(problem) => Err(usage(problem)),
            None => Ok(c),
        }
    }

    /// With --scheduler onecycle: the schedule (its values checked by
    /// `validate`), and the momentum (Adam's beta1) at its maximum, where
    /// OneCycleLR's constructor starts it.
    pub fn configure(&self, config: &mut TrainConfig) {
        if config.scheduler != SchedulerKind::Onecycle {
            return;
        }
        let c = self.get().unwrap_or_default();
        if let Some((_, max)) = c.momentum {
            config.optimizer.set_cycled_momentum(max);
        }
        config.onecycle = Some(c);
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Line {
        #[command(flatten)]
        o: OneCycleOpts,
    }

    /// The defaults are OneCycleLR's.
    #[test]
    fn defaults_are_pytorchs() {
        let c = Line::parse_from(["x"]).o.get().unwrap();
        assert_eq!(c, OneCycle::default());
        assert_eq!(c.momentum, Some(CYCLE_MOMENTUM));
    }
}
