//! What leaves the process: results on stdout (tables, `--json`), and the
//! one-line warnings on stderr that the library hands back through its
//! callbacks.

use std::io::Write;

use anyhow::Result;

/// The warning callback every subcommand hands the library.
pub fn warn(message: String) {
    eprintln!("warning: {message}");
}

/// Writes `text` to stdout; a closed pipe surfaces as an io error that main ignores.
pub fn print_out(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

pub fn print_json<T: serde::Serialize>(value: &T) -> Result<()> {
    print_out(&(serde_json::to_string_pretty(value)? + "\n"))
}
