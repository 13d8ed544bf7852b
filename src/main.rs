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
                eprintln!("vggctl: {err:#}");
                return ExitCode::from(130);
            }
            eprintln!("vggctl: error: {err:#}");
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
