//! The training run that `train` and `finetune` share: the recipe's
//! options, a new run's configuration, and running the loop with progress
//! on stderr and the summary on stdout (`resume` continues a saved one).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Result, bail};
use tch::Device;
use vggctl::data::augment::Augment;
use vggctl::device::device_name;
use vggctl::dist::World;
use vggctl::model::{ModelSpec, Vgg};
use vggctl::numerics::{Activity, Numerics, StepPart};
use vggctl::optim::{OptimizerConfig, OptimizerKind};
use vggctl::train::config::TrainConfig;
use vggctl::train::keep::Keep;
use vggctl::train::run_dir::RunLock;
use vggctl::train::schedule::{
    DEFAULT_PATIENCE, DEFAULT_POWER, DEFAULT_STEP_SIZE, DEFAULT_WARMUP_DECAY, Restarts, Warmup,
    WarmupMethod,
};
use vggctl::train::{Resume, RunDir, SchedulerKind, Trainer};

use super::cycles::CycleOpts;
use super::data_load::streamed_as_rank0;
use super::data_opts::DataOpts;
use super::opts::{DistOpts, GraphOpts, NumericsOpts, OtherForms, choice};
use super::output::{note, usage, warn, whole};
use super::progress::{EpochBars, print_header};
use super::recipe::{RecipeOpts, settle_ema};
use super::rule_opts::RuleOpts;
use super::swa::{SwaOpts, swa_past_the_end};

#[derive(clap::Args, Debug, Clone)]
pub struct HyperOpts {
    /// Epochs to train in all [default: train 100, finetune 10].
    #[arg(short, long, help_heading = "Schedule", value_parser = whole::<usize>)]
    pub epochs: Option<usize>,
    /// Images per training step.
    #[arg(short, long, default_value_t = 128, help_heading = "Optimizer", value_parser = whole::<i64>)]
    pub batch_size: i64,
    /// Images per evaluation batch (after each epoch).
    #[arg(long, alias = "validation-batch-size", default_value_t = 100, help_heading = "Data", value_parser = whole::<i64>)]
    pub test_batch_size: i64,
    /// The update rule.
    #[arg(long, alias = "opt", value_parser = choice::<OptimizerKind>(), default_value = "sgd", help_heading = "Optimizer")]
    pub optimizer: OptimizerKind,
    /// Peak learning rate (after --warmup-epochs).
    #[arg(long, default_value_t = 0.01, help_heading = "Optimizer")]
    pub lr: f64,
    /// SGD's and RMSprop's momentum.
    #[arg(long, default_value_t = 0.9, help_heading = "Optimizer")]
    pub momentum: f64,
    #[command(flatten)]
    pub rule: RuleOpts,
    /// L2 penalty (SGD, Adam, RMSprop, NAdam, RAdam, Adamax, Adagrad,
    /// Adadelta) or decoupled weight decay (AdamW; NAdam and RAdam with
    /// --decoupled-weight-decay).
    #[arg(long, alias = "wd", default_value_t = 5e-4, help_heading = "Optimizer")]
    pub weight_decay: f64,
    /// The weight decay of BatchNorm's weights and biases (torchvision's
    /// --norm-weight-decay; often 0) [default: --weight-decay].
    #[arg(long, value_name = "WD", help_heading = "Optimizer")]
    pub norm_weight_decay: Option<f64>,
    /// The weight decay of every bias, BatchNorm's too (torchvision's
    /// --bias-weight-decay) [default: --weight-decay, or --norm-weight-decay].
    #[arg(long, value_name = "WD", help_heading = "Optimizer")]
    pub bias_weight_decay: Option<f64>,
    /// Scale each step's gradients so their global 2-norm is at most this
    /// (torch.nn.utils.clip_grad_norm_; after the data-parallel average and
    /// fp16 unscaling).
    #[arg(long, alias = "clip-grad", help_heading = "Optimizer")]
    pub clip_grad_norm: Option<f64>,
    /// Clamp every element of each step's gradients to [-V, V]
    /// (torch.nn.utils.clip_grad_value_, timm's --clip-mode value; after
    /// the data-parallel average and fp16 unscaling); not with
    /// --clip-grad-norm.
    #[arg(long, value_name = "V", help_heading = "Optimizer")]
    pub clip_grad_value: Option<f64>,
    /// Stop once the validation top-1 has not beaten the best for N epochs in
    /// a row (Keras' EarlyStopping patience); may change on --resume.
    #[arg(long, value_name = "N", help_heading = "Schedule", value_parser = whole::<usize>)]
    pub early_stop: Option<usize>,
    #[arg(long, aliases = ["lr-scheduler", "sched"], value_parser = choice::<SchedulerKind>(), default_value = "multistep", help_heading = "Schedule")]
    pub scheduler: SchedulerKind,
    /// Epochs at which MultiStepLR multiplies the LR by --gamma.
    #[arg(
        long,
        alias = "decay-milestones",
        value_delimiter = ',',
        default_value = "50,80",
        help_heading = "Schedule",
        value_parser = whole::<usize>
    )]
    pub milestones: Vec<usize>,
    /// What MultiStepLR and StepLR multiply the LR by at each step,
    /// ExponentialLR every epoch, ReduceLROnPlateau at a plateau, and
    /// CyclicLR's exp_range the amplitude every update.
    #[arg(
        long,
        aliases = ["lr-gamma", "decay-rate"],
        default_value_t = 0.1,
        help_heading = "Schedule"
    )]
    pub gamma: f64,
    /// StepLR's period in epochs.
    #[arg(long, aliases = ["lr-step-size", "decay-epochs"], value_name = "N", default_value_t = DEFAULT_STEP_SIZE, help_heading = "Schedule", value_parser = whole::<usize>)]
    pub step_size: usize,
    /// Cosine annealing's floor (CosineAnnealingLR's and
    /// CosineAnnealingWarmRestarts' eta_min), ReduceLROnPlateau's (its
    /// min_lr), and CyclicLR's lowest LR (its base_lr).
    #[arg(
        long,
        alias = "min-lr",
        value_name = "LR",
        default_value_t = 0.0,
        help_heading = "Schedule"
    )]
    pub lr_min: f64,
    /// ReduceLROnPlateau: epochs without a better validation loss it
    /// accepts before reducing the LR.
    #[arg(long, alias = "patience-epochs", value_name = "N", default_value_t = DEFAULT_PATIENCE, help_heading = "Schedule", value_parser = whole::<usize>)]
    pub patience: usize,
    /// ReduceLROnPlateau: epochs after a reduction before it counts again.
    #[arg(long, value_name = "N", default_value_t = 0, help_heading = "Schedule", value_parser = whole::<usize>)]
    pub cooldown: usize,
    /// PolynomialLR's power: 1 decays linearly (torch's default), 0.9 as
    /// torchvision's segmentation reference.
    #[arg(long, value_name = "P", default_value_t = DEFAULT_POWER, help_heading = "Schedule")]
    pub power: f64,
    /// CosineAnnealingWarmRestarts: the first cycle's epochs (its T_0),
    /// counted after the warm-up; needed by --scheduler cosine-restarts.
    #[arg(long, value_name = "N", help_heading = "Schedule", value_parser = whole::<usize>)]
    pub restart_epochs: Option<usize>,
    /// CosineAnnealingWarmRestarts: what each cycle's epochs are
    /// multiplied by for the next (its T_mult).
    #[arg(long, value_name = "M", default_value_t = 1, help_heading = "Schedule", value_parser = whole::<usize>)]
    pub restart_mult: usize,
    /// Epochs of warm-up: alone, a linear ramp lr*(epoch+1)/N; with
    /// --warmup-method or --warmup-decay, torchvision's warm-up.
    #[arg(long, alias = "lr-warmup-epochs", value_name = "N", default_value_t = 0, help_heading = "Schedule", value_parser = whole::<usize>)]
    pub warmup_epochs: usize,
    /// torchvision's warm-up (its train.py's --lr-warmup-method), then the
    /// schedule counts its epochs from the warm-up's end, as SequentialLR.
    #[arg(long, alias = "lr-warmup-method", value_name = "METHOD", value_parser = choice::<WarmupMethod>(), help_heading = "Schedule")]
    pub warmup_method: Option<WarmupMethod>,
    /// The warm-up's factor of --lr (--lr-warmup-decay) [default: 0.01].
    #[arg(
        long,
        alias = "lr-warmup-decay",
        value_name = "F",
        help_heading = "Schedule"
    )]
    pub warmup_decay: Option<f64>,
    #[command(flatten)]
    pub cycles: CycleOpts,
    #[command(flatten)]
    pub swa: SwaOpts,
    /// Cross-entropy label smoothing, in [0, 1).
    #[arg(
        long,
        alias = "smoothing",
        default_value_t = 0.0,
        help_heading = "Optimizer"
    )]
    pub label_smoothing: f64,
    /// Seeds initialization, the epoch order and every augmentation.
    #[arg(long, default_value_t = 0, help_heading = "Data", value_parser = whole::<u64>)]
    pub seed: u64,
    /// Output directory [default: runs/<arch>[_bn]-<dataset>-<timestamp>].
    #[arg(short, long, alias = "output-dir", help_heading = "Output")]
    pub out: Option<PathBuf>,
    /// Continue a run: its resume.safetensors, or its directory; `auto` (with
    /// --out) continues the run in --out if it has a resume point and
    /// starts it there otherwise (restarts under torchrun, requeued jobs).
    #[arg(long, help_heading = "Output")]
    pub resume: Option<PathBuf>,
    /// Train on the first N training images only.
    #[arg(long, help_heading = "Data", value_parser = whole::<i64>)]
    pub limit_train: Option<i64>,
    /// Evaluate on the first N test images only.
    #[arg(long, help_heading = "Data", value_parser = whole::<i64>)]
    pub limit_test: Option<i64>,
    /// Start over in an --out directory that holds a run (its files are replaced).
    #[arg(long, help_heading = "Output")]
    pub force: bool,
    /// No progress on stderr.
    #[arg(short, long, help_heading = "Output")]
    pub quiet: bool,
    /// Weight files kept beside last.safetensors: best (best.safetensors),
    /// last (none), all (also epoch-NNN.safetensors for every epoch) or
    /// top-K (those of the K best epochs); may change on --resume
    /// [default: best].
    #[arg(long, help_heading = "Output")]
    pub keep: Option<Keep>,
    #[command(flatten)]
    pub numerics: NumericsOpts,
    #[command(flatten)]
    pub graphs: GraphOpts,
    /// Update each parameter separately instead of the fused flat-buffer update.
    #[arg(long, help_heading = "Speed")]
    pub no_fused: bool,
    /// CUDA: train with libtorch's kernels as they are instead of the fused
    /// step; `--no-fused-step=PART,...` leaves out only those parts of it.
    #[arg(long, help_heading = "Speed", value_name = "PART", num_args = 0..,
          require_equals = true, value_delimiter = ',', value_parser = choice::<StepPart>())]
    pub no_fused_step: Option<Vec<StepPart>>,
    /// Time data, forward and backward+update of every step (synchronizing) and report them per epoch.
    #[arg(long, help_heading = "Speed")]
    pub profile: bool,
    /// Train on the evaluation transform: no random crops or flips.
    #[arg(long, alias = "no-aug", help_heading = "Data")]
    pub no_augment: bool,
    /// Data-parallel runs: BatchNorm statistics over all ranks' batches
    /// (PyTorch's SyncBatchNorm) instead of each rank's own (DDP's default).
    #[arg(long, help_heading = "Data-parallel")]
    pub sync_bn: bool,
    #[command(flatten)]
    pub dist: DistOpts,
    #[command(flatten)]
    pub recipe: RecipeOpts,
    #[command(flatten)]
    pub other_forms: OtherForms,
    /// The options typed on the command line (set by `cmd::parse`).
    #[arg(skip)]
    pub typed: Vec<String>,
}

static STOP: AtomicBool = AtomicBool::new(false);

/// Ctrl-C or SIGTERM (what torchrun and Slurm send) asks the loop to stop
/// after its current step and save; a second one ends the process at once
/// (see `shim::install_stop_signals`). The shim records the signal; a
/// watcher thread passes it on to the loop's flag.
pub fn install_stop_signals() {
    vggctl::shim::install_stop_signals();
    std::thread::spawn(|| {
        while vggctl::shim::stop_signal().is_none() {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        STOP.store(true, Ordering::SeqCst);
    });
}

/// A path as config.json records it: absolute, so that `eval` and
/// `--resume` find the data from any directory.
pub(super) fn absolute(path: &std::path::Path) -> String {
    std::path::absolute(path)
        .unwrap_or_else(|_| path.to_path_buf())
        .display()
        .to_string()
}

impl HyperOpts {
    /// Whether the fused step may run (a bare `--no-fused-step` says no).
    pub(super) fn fused_step(&self) -> bool {
        self.no_fused_step
            .as_ref()
            .is_none_or(|parts| !parts.is_empty())
    }

    /// torchvision's warm-up, where --warmup-method or --warmup-decay asks for it.
    pub fn warmup(&self) -> Option<Warmup> {
        (self.warmup_method.is_some() || self.warmup_decay.is_some()).then(|| Warmup {
            method: self.warmup_method.unwrap_or(WarmupMethod::Linear),
            decay: self.warmup_decay.unwrap_or(DEFAULT_WARMUP_DECAY),
        })
    }

    /// CosineAnnealingWarmRestarts' cycles, with that scheduler.
    pub fn restarts(&self) -> Option<Restarts> {
        (self.scheduler == SchedulerKind::CosineRestarts).then(|| Restarts {
            epochs: self.restart_epochs.unwrap_or(0),
            mult: self.restart_mult,
        })
    }

    /// The optimizer these options describe.
    pub fn optimizer(&self) -> OptimizerConfig {
        OptimizerConfig {
            kind: self.optimizer,
            momentum: self.momentum,
            weight_decay: self.weight_decay,
            nesterov: self.rule.nesterov,
            betas: self.rule.betas,
            eps: self.rule.eps.unwrap_or(self.optimizer.default_eps()),
            alpha: self.rule.alpha,
            norm_weight_decay: self.norm_weight_decay,
            bias_weight_decay: self.bias_weight_decay,
            amsgrad: self.rule.amsgrad,
            centered: self.rule.centered,
            momentum_decay: self.rule.momentum_decay,
            decoupled_weight_decay: self.rule.decoupled_weight_decay,
            lr_decay: self.rule.lr_decay,
            initial_accumulator_value: self.rule.initial_accumulator_value,
            rho: self.rule.rho,
        }
    }

    /// `--out`, or a new run's directory under runs/.
    fn out_dir(&self, spec: &ModelSpec, data: &DataOpts) -> PathBuf {
        self.out.clone().unwrap_or_else(|| {
            PathBuf::from("runs").join(RunDir::default_name(&spec.model_name(), data.dataset()))
        })
    }

    /// A new run's configuration from these options; the caller fills in
    /// what differs between training from scratch and fine-tuning.
    pub fn config(
        &self,
        spec: ModelSpec,
        data: &DataOpts,
        device: Device,
        default_epochs: usize,
    ) -> TrainConfig {
        let mut config = self.plain_config(spec, data, (device, default_epochs));
        self.recipe.configure(&mut config);
        self.cycles.configure(&mut config);
        config
    }

    /// [`Self::config`] before the recipe's and the cycles' options: their
    /// fields at their defaults.
    fn plain_config(
        &self,
        spec: ModelSpec,
        data: &DataOpts,
        (device, default_epochs): (Device, usize),
    ) -> TrainConfig {
        let numerics = self.numerics.request(Some(&self.graphs), !self.no_fused);
        TrainConfig {
            model: spec,
            dataset: data.dataset().to_string(),
            data_dir: absolute(&data.dir()),
            val_dir: data.training_val_dir().map(absolute),
            val_split: data.held_fraction(),
            fold: data.fold,
            extra: data.extra,
            val_on: data.own_val().then(|| "val".into()),
            epochs: self.epochs.unwrap_or(default_epochs),
            batch_size: self.batch_size,
            test_batch_size: self.test_batch_size,
            optimizer: self.optimizer(),
            lr: self.lr,
            scheduler: self.scheduler,
            milestones: self.milestones.clone(),
            gamma: self.gamma,
            step_size: self.step_size,
            lr_min: self.lr_min,
            patience: self.patience,
            cooldown: self.cooldown,
            warmup_epochs: self.warmup_epochs,
            warmup: self.warmup(),
            onecycle: None,
            cyclic: None,
            power: self.power,
            restarts: self.restarts(),
            label_smoothing: self.label_smoothing,
            seed: self.seed,
            limit_train: self.limit_train,
            limit_test: self.limit_test,
            device: device_name(device),
            out: self.out_dir(&spec, data),
            input_size: 32,
            train_crop_size: None,
            val_resize_size: None,
            interpolation: Default::default(),
            augment: Augment::CropFlip { padding: 4 },
            no_augment: self.no_augment,
            sync_bn: self.sync_bn,
            keep: self.keep.unwrap_or_default(),
            clip_grad_norm: self.clip_grad_norm,
            clip_grad_value: self.clip_grad_value,
            early_stop: self.early_stop,
            world_size: 1,
            imagenet_normalization: false,
            freeze_prefix: 0,
            weights: None,
            precision: numerics.precision,
            channels_last: numerics.channels_last_on(device),
            fused: numerics.fused,
            fused_step: self.fused_step(),
            fused_step_without: self.no_fused_step.clone().unwrap_or_default(),
            cuda_graphs: numerics.cuda_graphs_on(device),
            profile: self.profile,
            model_ema: None,
            swa: self.swa.get(self.scheduler).ok().flatten(),
            mixing: Default::default(),
            auto_augment: None,
            ra_magnitude: vggctl::data::auto_augment::RA_MAGNITUDE,
            augmix_severity: vggctl::data::auto_augment::AUGMIX_SEVERITY,
            augment_interpolation: None,
            random_erase: 0.0,
            accum_steps: 1,
            dropout: vggctl::train::config::DROPOUT,
            bn_momentum: vggctl::model::BN_MOMENTUM,
            crop_range: Default::default(),
            hflip: vggctl::data::augment::HFLIP,
            ra_reps: None,
            tensorboard: false,
            streamed: None,
        }
    }
}

/// Refuses to resume a run on data whose classes are not those it
/// trained on (a class folder added, removed or renamed since).
fn same_classes_as_run(
    out: &std::path::Path,
    recorded: &[String],
    dataset: &vggctl::data::Dataset,
) -> Result<()> {
    let now = &dataset.classes;
    let differ = match recorded.iter().zip(now).position(|(a, b)| a != b) {
        _ if recorded.len() != now.len() => format!(
            "the run trained on {} classes; {} now has {}",
            recorded.len(),
            dataset.source,
            now.len()
        ),
        Some(i) => format!(
            "the run's class {i} is {:?}; in {} it is {:?}",
            recorded[i], dataset.source, now[i]
        ),
        None => return Ok(()),
    };
    bail!(
        "{}: {differ}: a run resumes on the classes it started with",
        out.display()
    )
}

/// Decides the run's numerics, loads the data its configuration names,
/// then trains (rank 0 of a data-parallel run prints and writes).
/// A new run's settings that depend on the launch (its world size, the
/// average's schedule); then, new or resumed, a schedule whose learning
/// rate float32 cannot hold is refused.
fn settle_new_run(
    config: &mut TrainConfig,
    h: &HyperOpts,
    resumed: bool,
    world: &World,
) -> Result<()> {
    if !resumed {
        if world.size > 1 && h.out.is_none() {
            return Err(usage(
                "a data-parallel run needs --out: every rank must name the same run directory",
            ));
        }
        config.world_size = world.size;
        settle_ema(config);
    }
    if let Some(problem) = swa_past_the_end(config) {
        if resumed {
            bail!("{}: {problem}", config.out.display());
        }
        return Err(usage(problem));
    }
    match config.lr_problem() {
        // Its state passed; the epochs asked for now reach further.
        Some(problem) if resumed => bail!("{}: {problem}", config.out.display()),
        Some(problem) => Err(usage(format!("--lr: {problem}"))),
        None => Ok(()),
    }
}

/// Rank 0's lock on the run directory ([`RunDir::claim`]; `fresh`: a new
/// run). `--resume auto` over a run that saved no resume point (it stopped
/// in its first epoch, as when a rank is lost before torchrun restarts the
/// group) starts it over there, saying what it replaced: nothing of it can
/// be continued.
fn claim_run(
    h: &HyperOpts,
    run_dir: &RunDir,
    fresh: bool,
    world: &World,
) -> Result<Option<RunLock>> {
    if !world.is_main() {
        return Ok(None);
    }
    let auto = h.resume.as_deref() == Some(std::path::Path::new("auto"));
    let left = run_dir.leftovers().filter(|_| auto && fresh);
    let lock = run_dir.claim(fresh, h.force || left.is_some())?;
    if let Some(left) = left {
        warn(format!(
            "{} held a run that saved no resume point ({left}); --resume auto started it over",
            run_dir.dir.display()
        ));
    }
    Ok(Some(lock))
}

pub fn execute(
    mut config: TrainConfig,
    h: &HyperOpts,
    data: &DataOpts,
    model: Vgg,
    resume: Option<Resume>,
    json: bool,
    world: &World,
) -> Result<()> {
    let quiet = h.quiet || !world.is_main();
    settle_new_run(&mut config, h, resume.is_some(), world)?;
    let run_dir = RunDir {
        dir: config.out.clone(),
    };
    let _lock = claim_run(h, &run_dir, resume.is_none(), world)?;
    let numerics = Numerics::decide(
        &config.numerics_request(h.numerics.deterministic),
        model.device(),
        Activity::Training,
        &mut |m: String| {
            if world.is_main() {
                warn(m)
            }
        },
    )?;
    let folder = vggctl::data::is_image_folder(&config.dataset);
    if folder && resume.is_some() && config.streamed.is_none() {
        // A run started before streaming existed held its images in memory.
        config.streamed = Some(false);
    }
    // Rank 0 first: it may download the data the others then read, and
    // decides for them whether a folder is streamed.
    if !world.is_main() {
        config.streamed = streamed_as_rank0(world, None)?.or(config.streamed);
    }
    let dataset = data.load_for(&config, quiet)?;
    if folder && config.streamed.is_none() {
        config.streamed = Some(dataset.train.is_streamed());
    }
    if world.is_main() {
        streamed_as_rank0(world, config.streamed)?;
    }
    if let Some((state, _)) = &resume {
        same_classes_as_run(&config.out, &state.class_names, &dataset)?;
    }
    if dataset.classes.len() as i64 != config.model.classes {
        bail!(
            "--classes {} does not match {}, which has {} classes",
            config.model.classes,
            dataset.source,
            dataset.classes.len()
        );
    }
    let dataset = vggctl::data::Dataset {
        train: dataset.train.limit(config.limit_train),
        test: dataset.test.limit(config.limit_test),
        ..dataset
    };
    install_stop_signals();
    let respan = resume
        .as_ref()
        .and_then(|(s, _)| config.respan_note(&s.config, s.epoch));
    let mut trainer = Trainer::new(config, &dataset, model, resume, numerics, &STOP, world)?;
    if let Some(line) = respan.filter(|_| world.is_main()) {
        note(line);
    }
    if !quiet {
        print_header(&trainer, &dataset, world);
    }
    let summary = trainer.fit(&mut EpochBars::new(quiet, h.recipe.log_interval))?;
    if !world.is_main() {
        return Ok(());
    }
    super::progress::report(&summary, json)
}
