//! The vggctl binary: parses the command line, dispatches to `cmd::*`, and
//! turns errors into one line on stderr and an exit code.

mod cmd;

use std::io;
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    match cmd::run(cmd::Cli::parse()) {
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
