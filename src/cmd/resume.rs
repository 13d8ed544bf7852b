//! How a training command begins (its local ranks, or its rank joined)
//! and where it starts: a new run, `--resume DIR`, or `--resume auto`;
//! continuing a saved run with what the command line may change.

use std::path::PathBuf;

use anyhow::{Result, bail};
use tch::Device;
use vggctl::device::device_name;
use vggctl::dist::World;
use vggctl::model::Vgg;
use vggctl::train::config::TrainConfig;
use vggctl::train::state::{TrainState, stopped_early};
use vggctl::train::{RunDir, read_resume};

use super::data_opts::DataOpts;
use super::launch::run_local_ranks;
use super::opts::DeviceOpts;
use super::output::{usage, warn};
use super::recipe::settle_ema;
use super::training::{HyperOpts, absolute, execute};

/// What `--resume` lets a command line say: how long, where and how
/// visibly to go on, and where the data now is; nothing the run's
/// results depend on (any other flag is ignored with a warning).
const KEPT_ON_RESUME: &[&str] = &[
    "resume",
    "epochs",
    "keep",
    "early_stop",
    "device",
    "quiet",
    "json",
    "profile",
    "cuda_graphs",
    "no_cuda_graphs",
    "no_fused_step",
    "deterministic",
    "data_dir",
    "data_url",
    "data_md5",
    "no_download",
    "cache_dir",
    "cache_mem",
    "workers",
    "allow_nonfinite",
    "dist_backend",
    "dist_timeout",
    "tensorboard",
    "log_interval",
];

/// Where a training command starts.
pub enum Start {
    Fresh,
    /// `--resume PATH`: the command line may only change what
    /// `KEPT_ON_RESUME` lists.
    Resume(PathBuf),
    /// `--resume auto` found a resume point in `--out`: the command line
    /// must describe the same run.
    AutoResume(PathBuf),
}

/// The run settings `--resume auto` lets differ from the recorded ones
/// (those `KEPT_ON_RESUME` allows, as config.json names them).
const FREE_ON_AUTO_RESUME: &[&str] = &[
    "epochs",
    "keep",
    "early_stop",
    "device",
    "profile",
    "cuda_graphs",
    "fused_step",
    "fused_step_without",
    "channels_last",
    "data_dir",
    "out",
    "world_size",
    "tensorboard",
    "streamed",
];

impl HyperOpts {
    /// How `train` and `finetune` begin: the options checked, then either
    /// `--nproc-per-node`'s local ranks run to their end (None), or this
    /// process joined to its group on its device, with where its run
    /// starts.
    pub fn begin(
        &self,
        data: &DataOpts,
        device: &DeviceOpts,
    ) -> Result<Option<(World, Device, Start)>> {
        self.validate(data)?;
        if let Some(n) = self.dist.nproc_per_node {
            // What --resume needs is said once here, not by every rank.
            self.start()?;
            run_local_ranks(n, self.dist.max_restarts)?;
            return Ok(None);
        }
        let (world, device) = self.dist.join(device.get()?)?;
        Ok(Some((world, device, self.start()?)))
    }

    pub fn start(&self) -> Result<Start> {
        match &self.resume {
            None => Ok(Start::Fresh),
            Some(p) if p.as_os_str() == "auto" => {
                let Some(out) = &self.out else {
                    return Err(usage(
                        "--resume auto needs --out DIR: the run to continue, or to start",
                    ));
                };
                let dir = RunDir { dir: out.clone() };
                Ok(match dir.resume().exists() {
                    true => Start::AutoResume(out.clone()),
                    false => Start::Fresh,
                })
            }
            Some(p) => Ok(Start::Resume(p.clone())),
        }
    }
}

/// Continues the run saved at `path` (written by train or finetune). With
/// `fresh` (`--resume auto`), the configuration this command line would
/// start must be the run's.
pub fn resume(
    path: &std::path::Path,
    h: &HyperOpts,
    data: &DataOpts,
    device: Device,
    json: bool,
    world: &World,
    fresh: Option<&TrainConfig>,
) -> Result<()> {
    let ignored: Vec<String> = h
        .typed
        .iter()
        .filter(|id| fresh.is_none() && !KEPT_ON_RESUME.contains(&id.as_str()))
        .map(|id| format!("--{}", id.replace('_', "-")))
        .collect();
    let (saved, tensors) = read_resume(path)?;
    if world.is_main() {
        for flag in &ignored {
            warn(format!(
                "{flag} is ignored: --resume {} continues the run with the settings it recorded (only --epochs, --early-stop, --keep, --device, --data-dir, --tensorboard and display options apply); start a new run with --out for different settings",
                path.display()
            ));
        }
    }
    if let Some(fresh) = fresh {
        // What this launch would have started: its ranks, and (--epochs
        // being free) the average's decay for the recorded length.
        let mut fresh = fresh.clone();
        (fresh.world_size, fresh.epochs) = (world.size, saved.config.epochs);
        settle_ema(&mut fresh);
        let differ = saved.config.differing(&fresh, FREE_ON_AUTO_RESUME);
        if !differ.is_empty() {
            bail!(
                "{}: --resume auto would continue this run, but its recorded {} differ from this command line's; give another --out for a new run",
                path.display(),
                differ.join(", ")
            );
        }
    }
    if saved.config.world_size != world.size {
        bail!(
            "{}: the run was trained on {} rank{} and continues only on as many (each rank's place in an epoch depends on the number of ranks); this launch has {}",
            path.display(),
            saved.config.world_size,
            if saved.config.world_size == 1 {
                ""
            } else {
                "s"
            },
            world.size
        );
    }
    let config = continued_config(path, &saved, h, data, device)?;
    let model = Vgg::new(config.model, device);
    execute(config, h, data, model, Some((saved, tensors)), json, world)
}

/// The configuration a resumed run continues with: the recorded one, with
/// what the command line may change (length, patience, files kept, device,
/// data directory); refused if the run has nothing left to do.
fn continued_config(
    path: &std::path::Path,
    saved: &TrainState,
    h: &HyperOpts,
    data: &DataOpts,
    device: Device,
) -> Result<TrainConfig> {
    let mut config = saved.config.clone();
    if let Some(e) = h.epochs {
        config.epochs = e;
    }
    if let Some(k) = h.keep {
        config.keep = k;
    }
    if h.early_stop.is_some() {
        config.early_stop = h.early_stop;
    }
    if let Some(best) = stopped_early(config.early_stop, &saved.history) {
        bail!(
            "{}: the run stopped early after epoch {} (no better val top-1 than epoch {best}'s in --early-stop {}); give a larger --early-stop to train further",
            path.display(),
            saved.history.len(),
            config.early_stop.unwrap_or(0)
        );
    }
    if saved.epoch >= config.epochs {
        bail!(
            "{}: the run is finished (epoch {} of {}); give a larger --epochs to train further",
            path.display(),
            saved.epoch,
            config.epochs
        );
    }
    config.device = device_name(device);
    config.profile = h.profile;
    config.tensorboard |= h.recipe.tensorboard;
    config.fused_step = h.fused_step();
    config.fused_step_without = h.no_fused_step.clone().unwrap_or_default();
    config.cuda_graphs = h
        .numerics
        .request(Some(&h.graphs), config.fused)
        .cuda_graphs_on(device);
    if let Some(dir) = &data.data_dir {
        config.data_dir = absolute(dir);
    }
    // A resumed run continues in the directory its checkpoint is in.
    config.out = if path.is_dir() {
        path.to_path_buf()
    } else {
        path.parent().map(PathBuf::from).unwrap_or_default()
    };
    Ok(config)
}
