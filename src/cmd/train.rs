//! `vggctl train`: the CIFAR-10 recipe, with resumable checkpoints.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Result, bail};
use vggctl::device::device_name;
use vggctl::model::{Head, Vgg};
use vggctl::optim::{OptimizerConfig, OptimizerKind};
use vggctl::train::{SchedulerKind, TrainConfig, TrainSummary, Trainer, read_resume};

use super::data_opts::DataOpts;
use super::progress::EpochBars;
use super::{ModelOpts, print_json, print_out};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelOpts,
    #[command(flatten)]
    pub data: DataOpts,
    #[command(flatten)]
    pub hyper: HyperOpts,
}

/// The recipe's knobs. On --resume the saved run's values are used; only
/// --epochs (to extend a run), --device and --quiet apply.
#[derive(clap::Args, Debug, Clone)]
pub struct HyperOpts {
    /// Epochs to train in all [default: 100].
    #[arg(long)]
    pub epochs: Option<usize>,
    #[arg(long, default_value_t = 128)]
    pub batch_size: i64,
    #[arg(long, default_value_t = 100)]
    pub test_batch_size: i64,
    #[arg(long, value_enum, default_value = "sgd")]
    pub optimizer: OptimizerKind,
    #[arg(long, default_value_t = 0.01)]
    pub lr: f64,
    #[arg(long, default_value_t = 0.9)]
    pub momentum: f64,
    #[arg(long, default_value_t = 5e-4)]
    pub weight_decay: f64,
    #[arg(long)]
    pub nesterov: bool,
    #[arg(long, value_enum, default_value = "multistep")]
    pub scheduler: SchedulerKind,
    /// Epochs at which MultiStepLR multiplies the LR by --gamma.
    #[arg(long, value_delimiter = ',', default_value = "50,80")]
    pub milestones: Vec<usize>,
    #[arg(long, default_value_t = 0.1)]
    pub gamma: f64,
    #[arg(long, default_value_t = 0)]
    pub warmup_epochs: usize,
    #[arg(long, default_value_t = 0.0)]
    pub label_smoothing: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output directory [default: runs/<arch>[_bn]-<dataset>-<timestamp>].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue a run: its resume.safetensors, or its directory.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Train on the first N training images only.
    #[arg(long)]
    pub limit_train: Option<i64>,
    /// Evaluate on the first N test images only.
    #[arg(long)]
    pub limit_test: Option<i64>,
    /// No progress on stderr.
    #[arg(long)]
    pub quiet: bool,
}

static STOP: AtomicBool = AtomicBool::new(false);

/// Ctrl-C asks the loop to stop after its current step; a second one exits at once.
pub fn install_ctrlc() {
    let _ = ctrlc::set_handler(|| {
        if STOP.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\nstopping after this step (Ctrl-C again to quit without saving)...");
    });
}

fn timestamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // UTC yyyymmdd-hhmmss without a date crate.
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Howard Hinnant's days-to-civil algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + (m <= 2) as i64, m, d)
}

impl HyperOpts {
    fn validate(&self) -> Result<()> {
        if self.batch_size < 1 || self.test_batch_size < 1 {
            bail!("--batch-size and --test-batch-size must be at least 1");
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            bail!("--lr {} must be a positive number", self.lr);
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            bail!(
                "--label-smoothing {} must be in [0, 1)",
                self.label_smoothing
            );
        }
        if self.epochs == Some(0) {
            bail!("--epochs must be at least 1");
        }
        for (name, v) in [
            ("--limit-train", self.limit_train),
            ("--limit-test", self.limit_test),
        ] {
            if let Some(v) = v
                && v < 1
            {
                bail!("{name} {v} must be at least 1");
            }
        }
        Ok(())
    }
}

pub fn run(args: Args) -> Result<()> {
    let h = &args.hyper;
    h.validate()?;
    let device = args.model.device()?;
    let resume = h.resume.as_ref().map(|p| read_resume(p)).transpose()?;
    let config = match &resume {
        Some((saved, _)) => {
            let mut c = saved.config.clone();
            if let Some(e) = h.epochs {
                c.epochs = e;
            }
            c.device = device_name(device);
            c
        }
        None => {
            let spec = args.model.spec(Head::Cifar)?;
            let out = h.out.clone().unwrap_or_else(|| {
                PathBuf::from("runs").join(format!(
                    "{}-{}-{}",
                    spec.model_name(),
                    args.data.dataset,
                    timestamp()
                ))
            });
            TrainConfig {
                model: spec,
                dataset: args.data.dataset.clone(),
                data_dir: args.data.data_dir.display().to_string(),
                epochs: h.epochs.unwrap_or(100),
                batch_size: h.batch_size,
                test_batch_size: h.test_batch_size,
                optimizer: OptimizerConfig {
                    kind: h.optimizer,
                    momentum: h.momentum,
                    weight_decay: h.weight_decay,
                    nesterov: h.nesterov,
                    betas: (0.9, 0.999),
                    eps: 1e-8,
                },
                lr: h.lr,
                scheduler: h.scheduler,
                milestones: h.milestones.clone(),
                gamma: h.gamma,
                warmup_epochs: h.warmup_epochs,
                label_smoothing: h.label_smoothing,
                seed: h.seed,
                limit_train: h.limit_train,
                limit_test: h.limit_test,
                device: device_name(device),
                out,
                input_size: 32,
                crop_padding: 4,
            }
        }
    };
    let mut data = args.data.clone();
    if resume.is_some() {
        data.dataset = config.dataset.clone();
    }
    let dataset = data.load(h.quiet)?;
    if dataset.classes.len() as i64 != config.model.classes {
        bail!(
            "--classes {} does not match {}, which has {} classes",
            config.model.classes,
            dataset.name,
            dataset.classes.len()
        );
    }
    let dataset = vggctl::data::Dataset {
        train: dataset.train.limit(config.limit_train),
        test: dataset.test.limit(config.limit_test),
        ..dataset
    };
    // A resumed run continues in the directory its checkpoint is in.
    let mut config = config;
    if let Some(p) = &h.resume {
        config.out = if p.is_dir() {
            p.clone()
        } else {
            p.parent().map(PathBuf::from).unwrap_or_default()
        };
    }

    tch::manual_seed(config.seed as i64);
    let model = Vgg::new(config.model, device);
    install_ctrlc();
    let mut trainer = Trainer::new(config, &dataset, model, resume, &STOP)?;
    if !h.quiet {
        let c = &trainer.state.config;
        eprintln!(
            "training {} ({} head) on {} ({} train / {} test images) on {}, {} epochs, batch {}, writing {}",
            c.model.model_name(),
            c.model.head.name(),
            c.dataset,
            dataset.train.len(),
            dataset.test.len(),
            c.device,
            c.epochs,
            c.batch_size,
            c.out.display()
        );
    }
    let summary = trainer.fit(&mut EpochBars::new(h.quiet))?;
    report(&summary, args.model.json)
}

fn report(s: &TrainSummary, json: bool) -> Result<()> {
    if json {
        return print_json(s);
    }
    let mut text = format!(
        "trained {} epochs; files in {}\n",
        s.epochs,
        s.out.display()
    );
    if let Some(m) = &s.final_metrics {
        text += &format!(
            "final: test top-1 {:.2}%  top-5 {:.2}%  loss {:.4}  (train acc {:.2}%)\n",
            m.test_top1, m.test_top5, m.test_loss, m.train_acc
        );
    }
    if let Some(b) = s.best_top1 {
        text += &format!("best test top-1 {b:.2}% -> {}\n", s.best.display());
    }
    print_out(&text)
}
