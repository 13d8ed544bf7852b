//! The command line and its dispatch: one module per subcommand, each with
//! its `Args` and `run`. What several share has a module of its own, which
//! no subcommand module is: `opts` (model, numerics and CUDA-graph
//! options), `data_opts` (datasets), `training` (the run train and finetune
//! share), `recipe` (its torchvision-recipe options), `eval_report`
//! (eval's table and per-image CSV), `images` (the images and model
//! predict and features read), `launch`
//! (`--nproc-per-node`'s local ranks), `progress` (bars on stderr),
//! `output` (stdout and warnings).
//! No subcommand imports another, and none imports this module.

mod checks;
mod cycles;
mod data_load;
mod data_opts;
mod eval;
mod eval_data;
mod eval_report;
mod export;
mod features;
mod finetune;
mod help;
mod images;
mod info;
mod launch;
mod listed;
mod opts;
mod output;
mod params;
mod predict;
mod prepare;
mod progress;
mod recipe;
mod resume;
mod rule_opts;
mod swa;
mod train;
mod training;

use std::ffi::OsString;

use anyhow::Result;

use clap::{Parser, Subcommand};
pub use launch::RanksFailed;
pub use output::{Usage, say};

#[derive(Parser, Debug)]
#[command(
    name = "vggctl",
    about = "Train, evaluate, fine-tune and export VGG image classifiers (libtorch, no Python)",
    version,
    after_help = help::TOP,
    disable_version_flag = true
)]
pub struct Cli {
    /// Print vggctl's and libtorch's versions and what CUDA devices are visible.
    #[arg(short = 'V', long = "version", global = false)]
    version: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Versions, CUDA/cuDNN availability and device names.
    Info(info::Args),
    /// Parameters, shapes, multiply-adds and receptive fields per layer.
    #[command(after_help = help::PARAMS)]
    Params(params::Args),
    /// Train a VGG from scratch: CIFAR-10's recipe by default (SGD 0.01, momentum 0.9, wd 5e-4, 100 epochs), or CIFAR-100, the built-in digits or an image folder.
    #[command(after_help = help::TRAIN)]
    Train(train::Args),
    /// Evaluate a checkpoint or torchvision's weights: top-1/top-5, per-class accuracy, confusion matrix.
    #[command(after_help = help::EVAL)]
    Eval(eval::Args),
    /// Fine-tune torchvision's ImageNet weights on your classes.
    #[command(after_help = help::FINETUNE)]
    Finetune(finetune::Args),
    /// Export to safetensors (torchvision-loadable), TorchScript, ONNX or a torch.export archive (pt2).
    #[command(after_help = help::EXPORT)]
    Export(export::Args),
    /// Classify images with a checkpoint or torchvision's weights.
    #[command(after_help = help::PREDICT)]
    Predict(predict::Args),
    /// Save images' embeddings: the outputs of named layers (torchvision's create_feature_extractor) as .npy or .safetensors.
    #[command(after_help = help::FEATURES)]
    Features(features::Args),
    /// Pack an image folder (ImageNet's layout, Oxford-IIIT Pet, Oxford 102 Flowers, Food-101 or DTD too) into one file that training reads with positioned reads
    #[command(after_help = help::PREPARE)]
    Prepare(prepare::Args),
    /// Shell completions (bash, zsh, fish, powershell, elvish) on stdout.
    #[command(after_help = help::COMPLETIONS)]
    Completions(help::CompletionsArgs),
    /// The manual page (roff), from the same definitions as --help.
    #[command(after_help = help::MAN)]
    Man(help::ManArgs),
}

/// The subcommands' names, as typed.
pub const SUBCOMMANDS: &[&str] = &[
    "info",
    "params",
    "train",
    "eval",
    "finetune",
    "export",
    "predict",
    "features",
    "prepare",
    "completions",
    "man",
];

/// Parses the command line. Training runs also learn which of their
/// options were typed (not defaulted): `--resume` refuses those that would
/// change the run it continues.
pub fn parse() -> Result<Cli, clap::Error> {
    use clap::parser::ValueSource;
    use clap::{CommandFactory, FromArgMatches};
    let command = negative_numbers(Cli::command());
    let args = joined_negatives(std::env::args_os().collect(), &command);
    let matches = command.clone().try_get_matches_from(args)?;
    let mut cli = Cli::from_arg_matches(&matches)?;
    if let Some((name, sub)) = matches.subcommand() {
        // Options only: the matches also hold the flattened groups' ids.
        let options: Vec<String> = command
            .find_subcommand(name)
            .map(|c| c.get_arguments().map(|a| a.get_id().to_string()).collect())
            .unwrap_or_default();
        let typed: Vec<String> = options
            .into_iter()
            .filter(|id| sub.value_source(id) == Some(ValueSource::CommandLine))
            .collect();
        match &mut cli.command {
            Some(Command::Train(a)) => a.hyper.typed = typed,
            Some(Command::Finetune(a)) => a.hyper.typed = typed,
            _ => {}
        }
    }
    Ok(cli)
}

/// Every option that takes a value takes a negative number too: `--lr -1`
/// reaches the option's own check, which says what is wrong with it, not
/// clap's "unexpected argument '-1'".
fn negative_numbers(command: clap::Command) -> clap::Command {
    command
        .mut_args(|a| match a.get_action().takes_values() {
            true => a.allow_negative_numbers(true),
            false => a,
        })
        .mut_subcommands(negative_numbers)
}

/// The command line with each negative number typed as an option's value
/// (a word of a hyphen and a digit or a dot, after a long option that
/// takes a value, given without `=`) joined to its option, `--lr=-1e-3`:
/// clap's own test for a number knows no signed exponent (`-1e-3`) and no
/// pairs (`--betas -0.1,0.5`).
fn joined_negatives(args: Vec<OsString>, command: &clap::Command) -> Vec<OsString> {
    fn valued(c: &clap::Command, names: &mut Vec<String>) {
        for a in c.get_arguments().filter(|a| a.get_action().takes_values()) {
            let longs = a
                .get_long()
                .into_iter()
                .chain(a.get_all_aliases().unwrap_or_default());
            names.extend(longs.map(|l| format!("--{l}")));
        }
        c.get_subcommands().for_each(|s| valued(s, names));
    }
    let mut names = Vec::new();
    valued(command, &mut names);
    let mut out: Vec<OsString> = Vec::with_capacity(args.len());
    for arg in args {
        let negative = arg
            .to_str()
            .and_then(|a| a.strip_prefix('-'))
            .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit() || c == '.'));
        let after = out
            .last()
            .and_then(|o| o.to_str())
            .filter(|o| names.iter().any(|n| n == o));
        match (negative, after) {
            (true, Some(option)) => {
                let joined = format!("{option}={}", arg.to_string_lossy());
                *out.last_mut().expect("an option before it") = joined.into();
            }
            _ => out.push(arg),
        }
    }
    out
}

pub fn run(cli: Cli) -> Result<()> {
    if cli.version {
        return info::print_version(false);
    }
    let Some(command) = cli.command else {
        return Err(output::usage("no subcommand given; see 'vggctl --help'"));
    };
    match command {
        Command::Info(args) => info::run(args),
        Command::Params(args) => params::run(args),
        Command::Train(args) => train::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Finetune(args) => finetune::run(args),
        Command::Export(args) => export::run(args),
        Command::Predict(args) => predict::run(args),
        Command::Features(args) => features::run(args),
        Command::Prepare(args) => prepare::run(args),
        Command::Completions(args) => {
            help::completions(args, <Cli as clap::CommandFactory>::command())
        }
        Command::Man(args) => help::man(args, <Cli as clap::CommandFactory>::command()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Negative numbers after an option that takes a value are joined to
    /// it, whatever their form; other words are left as they are.
    #[test]
    fn negative_numbers_join_their_option() {
        let words = |s: &str| s.split(' ').map(OsString::from).collect::<Vec<_>>();
        let command = Cli::command();
        let line =
            "vggctl train --lr -1e-3 --betas -0.1,0.5 --opt-eps -.5 --quiet -3 --lr --epochs 2";
        let want =
            "vggctl train --lr=-1e-3 --betas=-0.1,0.5 --opt-eps=-.5 --quiet -3 --lr --epochs 2";
        assert_eq!(joined_negatives(words(line), &command), words(want));
    }

    /// clap's own checks of the definitions (which a release build skips),
    /// and what they leave out: no two options of a subcommand share a
    /// name or a hidden alias, long or short (torchvision's names are
    /// hidden aliases: `--model`, `--wd`, `-j`, ...).
    #[test]
    fn the_definitions_pass_claps_checks() {
        let cli = Cli::command();
        cli.clone().debug_assert();
        for sub in cli.get_subcommands() {
            let mut seen = std::collections::HashSet::new();
            for arg in sub.get_arguments() {
                let longs = arg
                    .get_long()
                    .into_iter()
                    .chain(arg.get_all_aliases().into_iter().flatten());
                let shorts = arg
                    .get_short()
                    .into_iter()
                    .chain(arg.get_all_short_aliases().into_iter().flatten());
                let names = longs
                    .map(|l| format!("--{l}"))
                    .chain(shorts.map(|c| format!("-{c}")));
                for name in names {
                    assert!(
                        seen.insert(name.clone()),
                        "{} {name}: twice",
                        sub.get_name()
                    );
                }
            }
        }
    }

    /// torchvision's reference train.py names reach the same options.
    #[test]
    fn torchvisions_option_names_are_taken() {
        let tv = Cli::try_parse_from([
            "vggctl",
            "train",
            "--model",
            "vgg11_bn",
            "--opt",
            "adamw",
            "--wd",
            "0.05",
            "--lr-scheduler",
            "cosineannealinglr",
            "--lr-warmup-epochs",
            "2",
            "--lr-warmup-method",
            "linear",
            "--lr-warmup-decay",
            "0.1",
            "--lr-gamma",
            "0.5",
            "--lr-step-size",
            "7",
            "-j",
            "3",
            "--data-path",
            "d",
            "--output-dir",
            "o",
            "--print-freq",
            "10",
            "--use-deterministic-algorithms",
            "--interpolation",
            "bicubic",
            "--ra-sampler",
            "--ra-reps",
            "4",
        ])
        .unwrap();
        let Some(Command::Train(a)) = tv.command else {
            panic!("not train: {:?}", tv.command)
        };
        let h = &a.hyper;
        assert_eq!(a.model.arch.as_deref(), Some("vgg11_bn"));
        assert_eq!(h.optimizer, vggctl::optim::OptimizerKind::Adamw);
        assert_eq!((h.weight_decay, h.gamma, h.step_size), (0.05, 0.5, 7));
        assert_eq!(h.scheduler, vggctl::train::SchedulerKind::Cosine);
        assert_eq!((h.warmup_epochs, h.warmup_decay), (2, Some(0.1)));
        assert_eq!(a.data.workers, Some(3));
        assert_eq!(a.data.data_dir.as_deref(), Some(std::path::Path::new("d")));
        assert_eq!(h.out.as_deref(), Some(std::path::Path::new("o")));
        assert_eq!(h.recipe.log_interval, progress::LogInterval::Steps(10));
        assert!(h.numerics.deterministic);
        assert_eq!(
            h.recipe.interpolation,
            vggctl::data::resize::Filter::Bicubic
        );
        assert!(h.recipe.ra_sampler);
        assert_eq!(h.recipe.ra_reps, 4);
    }

    /// `--eps` defaults to torch.optim's own for the optimizer: Adagrad's
    /// 1e-10, Adadelta's 1e-6, the others' 1e-8; given, it is taken as it is.
    #[test]
    fn eps_defaults_to_the_optimizers_own() {
        let eps = |args: &[&str]| {
            let cli = Cli::try_parse_from([&["vggctl", "train"], args].concat()).unwrap();
            let Some(Command::Train(a)) = cli.command else {
                panic!("not train")
            };
            a.hyper.optimizer().eps
        };
        assert_eq!(eps(&["--optimizer", "adagrad"]), 1e-10);
        assert_eq!(eps(&["--optimizer", "adadelta"]), 1e-6);
        assert_eq!(eps(&["--optimizer", "adam"]), 1e-8);
        assert_eq!(eps(&["--optimizer", "adagrad", "--eps", "1e-3"]), 1e-3);
    }

    /// timm's train.py names (where they mean what vggctl's option means)
    /// reach the same options; its `--drop`, `--opt-betas`, `--opt-eps`,
    /// `--bn-momentum`, `--scale`, `--ratio`, `--sync-bn`,
    /// `--initial-checkpoint` and `--log-interval` are vggctl's own names
    /// or aliases already.
    #[test]
    fn timms_option_names_are_taken() {
        let timm = Cli::try_parse_from([
            "vggctl",
            "train",
            "--sched",
            "step",
            "--decay-epochs",
            "7",
            "--decay-rate",
            "0.5",
            "--decay-milestones",
            "3,9",
            "--min-lr",
            "1e-5",
            "--patience-epochs",
            "4",
            "--smoothing",
            "0.1",
            "--no-aug",
            "--validation-batch-size",
            "64",
            "--clip-grad",
            "2",
            "--img-size",
            "48",
            "--num-classes",
            "7",
        ])
        .unwrap();
        let Some(Command::Train(a)) = timm.command else {
            panic!("not train: {:?}", timm.command)
        };
        let h = &a.hyper;
        assert_eq!(h.scheduler, vggctl::train::SchedulerKind::Step);
        assert_eq!(
            (h.step_size, h.gamma, h.milestones.clone()),
            (7, 0.5, vec![3, 9])
        );
        assert_eq!((h.lr_min, h.patience, h.label_smoothing), (1e-5, 4, 0.1));
        assert!(h.no_augment);
        assert_eq!((h.test_batch_size, h.clip_grad_norm), (64, Some(2.0)));
        assert_eq!((h.recipe.input, a.model.classes), (Some(48), Some(7)));
        let eval = [
            "--checkpoint",
            "c.safetensors",
            "--img-size",
            "40",
            "--num-classes",
            "3",
        ];
        let eval = Cli::try_parse_from(["vggctl", "eval"].into_iter().chain(eval));
        assert!(eval.is_ok(), "{eval:?}");
    }

    /// The list the usage errors use to name a subcommand's help is clap's own.
    #[test]
    fn subcommand_names_are_clap_s() {
        let names: Vec<String> = Cli::command()
            .get_subcommands()
            .map(|c| c.get_name().to_string())
            .collect();
        assert_eq!(names, SUBCOMMANDS);
    }

    /// A number an option cannot take (`-1`, `1.5`, one too large) is
    /// named by what the option takes, for every option of every
    /// subcommand, never by Rust's parsers ("invalid digit found in
    /// string"); the integer options are at least those counted here.
    #[test]
    fn numbers_an_option_cannot_take_are_named_by_what_it_takes() {
        let cli = Cli::command().args_override_self(true);
        let mut integers = 0;
        for sub in cli.get_subcommands() {
            for arg in sub.get_arguments() {
                let Some(long) = arg.get_long().filter(|_| arg.get_action().takes_values()) else {
                    continue;
                };
                let mut named = false;
                for value in ["-1", "1.5", "1e999", "99999999999999999999999"] {
                    let given = format!("--{long}={value}");
                    let Err(e) = sub.clone().try_get_matches_from(["vggctl", &given]) else {
                        continue;
                    };
                    let text = e.to_string();
                    for rust in ["invalid digit", "invalid float", "number too large to fit"] {
                        assert!(!text.contains(rust), "{} {given}: {text}", sub.get_name());
                    }
                    named |= text.contains("expected a whole number");
                }
                integers += usize::from(named);
            }
        }
        assert!(
            integers >= 50,
            "{integers} integer options (50 when written)"
        );
    }
}
