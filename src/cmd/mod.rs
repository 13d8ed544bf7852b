//! The command line and its dispatch: one module per subcommand, each with
//! its `Args` and `run`. What several share has a module of its own, which
//! no subcommand module is: `opts` (model, numerics and CUDA-graph
//! options), `data_opts` (datasets), `training` (the run train and finetune
//! share), `recipe` (its torchvision-recipe options), `launch`
//! (`--nproc-per-node`'s local ranks), `progress` (bars on stderr),
//! `output` (stdout and warnings).
//! No subcommand imports another, and none imports this module.

mod checks;
mod data_opts;
mod eval;
mod export;
mod finetune;
mod help;
mod info;
mod launch;
mod opts;
mod output;
mod params;
mod predict;
mod prepare;
mod progress;
mod recipe;
mod train;
mod training;

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
    /// Train a VGG from scratch: CIFAR-10's recipe by default (SGD 0.01, momentum 0.9, wd 5e-4, 100 epochs), or the built-in digits or an image folder.
    #[command(after_help = help::TRAIN)]
    Train(train::Args),
    /// Evaluate a checkpoint: top-1/top-5, per-class accuracy, confusion matrix.
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
    /// Pack an image folder (or ImageNet's layout) into one file that training reads through memory mapping.
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
    let matches = command.clone().try_get_matches()?;
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
