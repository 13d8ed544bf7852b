//! The vggctl binary: parses the command line, dispatches to `cmd::*`, and
//! turns errors into one line on stderr and an exit code.

mod cmd;

use std::io;
use std::process::ExitCode;

use clap::Parser;
use clap::error::ErrorKind;

fn main() -> ExitCode {
    let cli = match cmd::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    match cmd::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            if is_broken_pipe(&err) {
                return ExitCode::SUCCESS;
            }
            if err.downcast_ref::<vggctl::Interrupted>().is_some() {
                eprintln!("vggctl: {}", one_line(&err));
                return ExitCode::from(130);
            }
            eprintln!("vggctl: error: {}", one_line(&err));
            ExitCode::from(2)
        }
    }
}

/// A reader that closed our stdout (`vggctl params | head`) is not an error.
fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain()
        .filter_map(|e| e.downcast_ref::<io::Error>())
        .any(|e| e.kind() == io::ErrorKind::BrokenPipe)
}

/// The whole context chain on one line: some libraries' messages carry
/// newlines of their own.
fn one_line(err: &anyhow::Error) -> String {
    format!("{err:#}")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Help and version go to stdout as clap writes them; a usage error becomes
/// one line (clap's own message spans several) and exit code 2.
fn usage_error(e: clap::Error) -> ExitCode {
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = e.print();
        return ExitCode::SUCCESS;
    }
    let text = e.render().to_string();
    let first = text
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("invalid arguments");
    let first = first.trim_start_matches("error: ");
    // clap lists the accepted values on a later line; keep them on this one.
    let hint = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("[possible values: "))
        .map(|v| {
            format!(
                " (possible values: {}",
                v.trim_end_matches(']').to_string() + ")"
            )
        })
        .unwrap_or_default();
    eprintln!("vggctl: error: {first}{hint}; see 'vggctl --help'");
    ExitCode::from(2)
}
