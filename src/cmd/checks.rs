//! The training options' checks before a run starts: values no run can
//! use (a usage error each, exit 2, nothing written), and options typed
//! for a new run that would change what it computes but that this run has
//! no use for (a warning each, where PyTorch's scripts would ignore them
//! silently).

use anyhow::Result;
use vggctl::choice::{Choice, either, names_of, names_where};
use vggctl::data::augment::Augment;
use vggctl::data::auto_augment::Policy;
use vggctl::data::{DOWNLOADED_ONLY, dtd, has_own_val, is_downloaded, is_image_folder, is_unsplit};
use vggctl::dist::World;
use vggctl::model::Head;
use vggctl::num::Num;
use vggctl::optim::RULE_OPTIONS;
use vggctl::train::SchedulerKind;
use vggctl::train::config::TrainConfig;
use vggctl::train::cyclic::CyclicMode;
use vggctl::train::schedule::SCHEDULE_OPTIONS;

use super::data_opts::DataOpts;
use super::output::{non_negative, positive, usage, warn};
use super::training::HyperOpts;

impl HyperOpts {
    /// A usage error for the first value here (or in `data`'s paths) that
    /// no run can use; checked before anything is written.
    pub fn validate(&self, data: &DataOpts) -> Result<()> {
        self.other_forms.check()?;
        // A run records its paths in config.json, as text.
        for (flag, path) in [
            ("--out", &self.out),
            ("--resume", &self.resume),
            ("--data-dir", &data.data_dir),
            ("--val-dir", &data.val_dir),
        ] {
            if let Some(p) = path
                && p.to_str().is_none()
            {
                return Err(usage(format!(
                    "{flag} {}: not valid UTF-8; a run records its paths in config.json as text, so rename it",
                    p.display()
                )));
            }
        }
        self.dist.validate(self.resume.is_some())?;
        if self.batch_size < 1 || self.test_batch_size < 1 {
            return Err(usage(
                "--batch-size and --test-batch-size must be at least 1",
            ));
        }
        positive("--lr", self.lr)?;
        // torch.optim's checks, as a resume state's are checked.
        if let Some(problem) = self
            .optimizer()
            .problem(|f| format!("--{}", f.replace('_', "-")))
        {
            return Err(usage(problem));
        }
        self.validate_schedule()?;
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return Err(usage(format!(
                "--label-smoothing {} must be in [0, 1)",
                Num(self.label_smoothing)
            )));
        }
        if self.epochs == Some(0) {
            return Err(usage("--epochs must be at least 1"));
        }
        if self.early_stop == Some(0) {
            return Err(usage("--early-stop must be at least 1 epoch"));
        }
        if let Some(c) = self.clip_grad_norm {
            positive("--clip-grad-norm", c)?;
        }
        if let Some(c) = self.clip_grad_value {
            positive("--clip-grad-value", c)?;
            if self.clip_grad_norm.is_some() {
                return Err(usage(
                    "--clip-grad-value and --clip-grad-norm exclude each other (timm's --clip-mode picks one)",
                ));
            }
        }
        self.recipe.validate()?;
        for (name, v) in [
            ("--limit-train", self.limit_train),
            ("--limit-test", self.limit_test),
        ] {
            if let Some(v) = v
                && v < 1
            {
                return Err(usage(format!("{name} {v} must be at least 1")));
            }
        }
        Ok(())
    }

    /// CyclicLR's values, with --scheduler cyclic.
    fn validate_cyclic(&self) -> Result<()> {
        if self.scheduler != SchedulerKind::Cyclic {
            return Ok(());
        }
        if self.warmup_epochs > 0 {
            return Err(usage(
                "--warmup-epochs does not combine with --scheduler cyclic (stepped after every update, it starts at --lr-min)",
            ));
        }
        let typed = |id: &str| self.typed.iter().any(|t| t == id);
        if self.cycles.cyclic_mode == CyclicMode::ExpRange && !typed("gamma") {
            return Err(usage(
                "--cyclic-mode exp_range needs --gamma, its factor per update (e.g. 0.9999)",
            ));
        }
        self.cycles.cyclic(self.gamma).map(|_| ())
    }

    /// The LR schedule's values, as `validate` checks the others.
    fn validate_schedule(&self) -> Result<()> {
        positive("--gamma", self.gamma)?;
        if self.scheduler == SchedulerKind::Plateau {
            if self.gamma >= 1.0 {
                return Err(usage(format!(
                    "--gamma {} must be below 1 for --scheduler plateau (ReduceLROnPlateau's factor)",
                    Num(self.gamma)
                )));
            }
            if self.warmup_epochs > 0 {
                return Err(usage(
                    "--warmup-epochs does not combine with --scheduler plateau (torch's SequentialLR cannot chain ReduceLROnPlateau either)",
                ));
            }
        }
        if self.scheduler == SchedulerKind::Onecycle {
            if self.warmup_epochs > 0 {
                return Err(usage(
                    "--warmup-epochs does not combine with --scheduler onecycle (its rise over --pct-start of the run is its warm-up)",
                ));
            }
            self.cycles.get()?;
        }
        self.validate_cyclic()?;
        let cycled = matches!(
            self.scheduler,
            SchedulerKind::Onecycle | SchedulerKind::Cyclic
        ) && !self.cycles.no_cycle_momentum;
        if cycled && !(self.optimizer.has_momentum() || self.optimizer.has_betas()) {
            // OneCycleLR and CyclicLR refuse it too.
            return Err(usage(format!(
                "--scheduler {} cycles the momentum, which --optimizer {} has none of: add --no-cycle-momentum",
                self.scheduler.name(),
                self.optimizer.name()
            )));
        }
        self.swa.get(self.scheduler)?;
        non_negative("--lr-min", self.lr_min)?;
        non_negative("--power", self.power)?;
        if self.scheduler == SchedulerKind::CosineRestarts {
            match self.restart_epochs {
                None => {
                    return Err(usage(
                        "--scheduler cosine-restarts needs --restart-epochs N, its first cycle's epochs (CosineAnnealingWarmRestarts' T_0)",
                    ));
                }
                Some(0) => return Err(usage("--restart-epochs must be at least 1")),
                Some(_) => {}
            }
            if self.restart_mult < 1 {
                return Err(usage("--restart-mult must be at least 1"));
            }
        }
        if self.step_size < 1 {
            return Err(usage("--step-size must be at least 1"));
        }
        if let Some(problem) = self.warmup().and_then(|w| w.problem()) {
            return Err(usage(format!("--warmup-decay: {problem}")));
        }
        Ok(())
    }
}

/// Warns (rank 0) of each option typed for the new run `config` that it has
/// no use for (see [`unused_options`]).
pub fn warn_unused_options(h: &HyperOpts, config: &TrainConfig, world: &World) {
    if world.is_main() {
        unused_options(&h.typed, config).into_iter().for_each(warn);
    }
}

/// The options typed for a new run (`typed`: their ids) that `config`'s
/// run has no use for, each with what it applies to.
fn unused_options(typed: &[String], config: &TrainConfig) -> Vec<String> {
    let mut unused = Vec::new();
    for (ids, applies, why) in option_rules(config) {
        for id in ids
            .iter()
            .filter(|id| !applies && typed.iter().any(|t| t == *id))
        {
            let flag = format!("--{}", id.replace('_', "-"));
            unused.push(format!("{flag} is ignored: it {why}"));
        }
    }
    unused
}

/// An option group (the options' ids), whether a run uses it, and what
/// it applies to.
type Rule = (&'static [&'static str], bool, &'static str);

/// A [`Rule`] whose text is made for the run.
type OwnedRule = (&'static [&'static str], bool, String);

/// Which options `config`'s run has a use for. Only options that change
/// what a run computes: a resource or policy option (--workers,
/// --no-download, --strict) set out of habit is no surprise when it has
/// nothing to do.
fn option_rules(config: &TrainConfig) -> Vec<OwnedRule> {
    [
        owned(&augment_rules(config)),
        schedule_rules(config),
        optimizer_rules(config),
        owned(&model_and_data_rules(config)),
    ]
    .concat()
}

/// Fixed rules as [`OwnedRule`]s.
fn owned(rules: &[Rule]) -> Vec<OwnedRule> {
    let owned = rules
        .iter()
        .map(|&(ids, used, why)| (ids, used, why.into()));
    owned.collect()
}

fn augment_rules(config: &TrainConfig) -> [Rule; 6] {
    let ra = config.auto_augment == Some(Policy::Ra);
    let resized_crop = config.augment == Augment::ResizedCrop && !config.no_augment;
    let augmix = config.auto_augment == Some(Policy::Augmix);
    [
        (&["ra_magnitude"], ra, "applies to --auto-augment ra only"),
        (
            &["ra_reps"],
            config.ra_reps.is_some(),
            "applies with --ra-sampler only",
        ),
        (
            &["augmix_severity"],
            augmix,
            "applies to --auto-augment augmix only",
        ),
        (
            &["augment_interpolation"],
            config.auto_augment.is_some(),
            "applies with --auto-augment only",
        ),
        (
            &["scale", "ratio"],
            resized_crop,
            "applies to RandomResizedCrop's training (--dataset imagenet, or finetune on a folder; not with --no-augment) only",
        ),
        (
            &["hflip"],
            !config.no_augment,
            "applies to augmented training only (not with --no-augment)",
        ),
    ]
}

/// The LR schedule's options ([`SCHEDULE_OPTIONS`]), the warm-up's and
/// SWA's.
fn schedule_rules(config: &TrainConfig) -> Vec<OwnedRule> {
    let kind = config.scheduler;
    let exp_range = config
        .cyclic
        .is_some_and(|c| c.mode == CyclicMode::ExpRange);
    let mut rules: Vec<OwnedRule> = SCHEDULE_OPTIONS
        .iter()
        .map(|&(ids, takes)| {
            let mut names = names_of(takes);
            let gamma = ids == ["gamma"];
            if gamma {
                names.push("cyclic's exp_range");
            }
            let why = format!("applies to --scheduler {} only", either(&names));
            (ids, takes(kind) || (gamma && exp_range), why)
        })
        .collect();
    let fixed: [Rule; 2] = [
        (
            &["warmup_method", "warmup_decay"],
            config.warmup_epochs > 0,
            "applies with --warmup-epochs only",
        ),
        (
            &["swa_lr", "swa_anneal_epochs", "swa_anneal_strategy"],
            config.swa.is_some(),
            "applies with --swa-start only",
        ),
    ];
    rules.extend(owned(&fixed));
    rules
}

/// The optimizer's (the momentum's too, which OneCycleLR may cycle).
fn optimizer_rules(config: &TrainConfig) -> Vec<OwnedRule> {
    let kind = config.optimizer.kind;
    let cycled = config.cycles_momentum();
    RULE_OPTIONS
        .iter()
        .map(|&(ids, takes)| match ids {
            ["momentum"] if takes(kind) && cycled => {
                let scheduler = config.scheduler.name();
                let why = format!(
                    "is replaced by --cycle-momentum's cycle with --scheduler {scheduler} (--no-cycle-momentum keeps it)"
                );
                (ids, false, why)
            }
            _ => {
                let why = format!("applies to --optimizer {} only", names_where(takes));
                (ids, takes(kind), why)
            }
        })
        .collect()
}

/// Whether the run validates on a part `--val-split` holds out of a
/// dataset's training split (`--val-on val` without a val split of its own).
fn held_out_val(config: &TrainConfig) -> bool {
    let own = has_own_val(&config.dataset) || config.dataset == "imagenet";
    config.validates_on_val() && !own
}

fn model_and_data_rules(config: &TrainConfig) -> [Rule; 9] {
    let folder = config.dataset == "folder";
    [
        (
            &["norm_weight_decay"],
            config.model.bn,
            "applies to BatchNorm's parameters, and the model has none (--bn adds them)",
        ),
        (
            &["bn_momentum"],
            config.model.bn,
            "applies to BatchNorm's running statistics, and the model has none (--bn adds them)",
        ),
        (
            &["dropout"],
            config.model.head != Head::Gap,
            "applies to the classifier's Dropout layers, and the gap head has none",
        ),
        (&["val_dir"], folder, "applies to --dataset folder only"),
        (
            &["extra"],
            config.dataset == "svhn",
            "applies to --dataset svhn only",
        ),
        (
            &["fold"],
            matches!(config.dataset.as_str(), "stl10" | dtd::NAME),
            "applies to --dataset stl10 and dtd only",
        ),
        (
            // --cache-mem: in memory or streamed, whose crops differ.
            &["interpolation", "cache_mem"],
            is_image_folder(&config.dataset),
            "applies to image folders only (--dataset folder, imagenet, imagenette*, oxford-pets, flowers102, food101, dtd, fgvc-aircraft*, stanford-cars, gtsrb, eurosat, caltech101, caltech256, sun397, country211 or places365*)",
        ),
        (
            &["val_split"],
            folder && config.val_dir.is_none()
                || is_unsplit(&config.dataset)
                || held_out_val(config),
            "applies to a held-out part only (--dataset folder without --val-dir, eurosat, caltech101, caltech256, sun397, or --val-on val)",
        ),
        (
            &["data_url", "data_md5"],
            is_downloaded(&config.dataset),
            DOWNLOADED_ONLY,
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every option the update rules' and schedules' lists name is an
    /// option of `train` (a misspelt id would never be warned of).
    #[test]
    fn the_option_lists_name_options_of_train() {
        let cli = super::super::Cli::command();
        let train = cli.find_subcommand("train").expect("train");
        let ids: Vec<&str> = train.get_arguments().map(|a| a.get_id().as_str()).collect();
        let listed = RULE_OPTIONS.iter().map(|(ids, _)| *ids);
        let listed = listed.chain(SCHEDULE_OPTIONS.iter().map(|(ids, _)| *ids));
        for id in listed.flatten() {
            assert!(ids.contains(id), "{id} is no option of train");
        }
    }
}
