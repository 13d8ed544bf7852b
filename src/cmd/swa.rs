//! The options of stochastic weight averaging (`--swa-start`, PyTorch's
//! `torch.optim.swa_utils`: `AveragedModel`, `SWALR`, `update_bn`).

use anyhow::Result;
use vggctl::choice::Choice;
use vggctl::train::SchedulerKind;
use vggctl::train::config::TrainConfig;
use vggctl::train::onecycle::Anneal;
use vggctl::train::schedule::{ANNEAL_EPOCHS, SwaConfig};

use super::opts::choice;
use super::output::{usage, whole};

#[derive(clap::Args, Debug, Clone)]
pub struct SwaOpts {
    /// Stochastic weight averaging from epoch E on (torch.optim.swa_utils),
    /// saved as swa.safetensors.
    ///
    /// The weights at the end of epoch E and of every later one are
    /// averaged equally (AveragedModel); from epoch E+1 the LR anneals to
    /// --swa-lr (SWALR) in place of the schedule; at the run's end the
    /// average's BatchNorm statistics are recomputed over the training
    /// images (update_bn), and it is evaluated.
    #[arg(long, value_name = "E", value_parser = whole::<usize>, help_heading = "Schedule")]
    pub swa_start: Option<usize>,
    /// The LR the averaged epochs anneal to and keep (SWALR's swa_lr);
    /// --swa-start needs it.
    #[arg(long, value_name = "LR", help_heading = "Schedule")]
    pub swa_lr: Option<f64>,
    /// The epochs the LR takes to reach --swa-lr (SWALR's anneal_epochs).
    #[arg(long, value_name = "N", default_value_t = ANNEAL_EPOCHS, value_parser = whole::<usize>, help_heading = "Schedule")]
    pub swa_anneal_epochs: usize,
    /// How the LR moves to --swa-lr (SWALR's anneal_strategy).
    #[arg(long, value_name = "HOW", value_parser = choice::<Anneal>(), default_value = "cos", help_heading = "Schedule")]
    pub swa_anneal_strategy: Anneal,
}

impl SwaOpts {
    /// The averaging these options ask for (None without --swa-start), or
    /// a usage error naming the bad value.
    pub fn get(&self, scheduler: SchedulerKind) -> Result<Option<SwaConfig>> {
        let Some(start) = self.swa_start else {
            return Ok(None);
        };
        let Some(lr) = self.swa_lr else {
            return Err(usage(
                "--swa-start needs --swa-lr, the learning rate the averaged epochs anneal to (SWALR's swa_lr)",
            ));
        };
        if matches!(scheduler, SchedulerKind::Onecycle | SchedulerKind::Cyclic) {
            return Err(usage(format!(
                "--swa-start takes over from a schedule stepped every epoch; --scheduler {} is stepped every update",
                scheduler.name()
            )));
        }
        let c = SwaConfig {
            start,
            lr,
            anneal_epochs: self.swa_anneal_epochs,
            anneal: self.swa_anneal_strategy,
        };
        match c.problem(|f| format!("--{}", f.replace('_', "-"))) {
            Some(problem) => Err(usage(problem)),
            None => Ok(Some(c)),
        }
    }
}

/// Why a run of `config.epochs` cannot average from its `--swa-start`:
/// the run ends before that epoch.
pub fn swa_past_the_end(config: &TrainConfig) -> Option<String> {
    let s = config.swa?;
    (s.start > config.epochs).then(|| {
        format!(
            "--swa-start {} is past the run's last epoch, {}: nothing would be averaged",
            s.start, config.epochs
        )
    })
}
