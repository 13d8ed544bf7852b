//! What leaves the process: results on stdout (tables, `--json`), the
//! one-line warnings on stderr that the library hands back through its
//! callbacks, and which failures are usage errors (exit code 2; every other
//! failure exits 1).

use std::io::Write;

use anyhow::Result;

/// A command line that cannot work as typed, whatever the files and data:
/// a value out of range, options that contradict each other. main exits
/// with 2 for it, as for clap's own usage errors.
#[derive(Debug)]
pub struct Usage(pub String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// A usage error with this message.
pub fn usage(message: impl Into<String>) -> anyhow::Error {
    Usage(message.into()).into()
}

/// A usage error unless `flag`'s value `v` is a finite number above 0.
pub fn positive(flag: &str, v: f64) -> Result<()> {
    match v > 0.0 && v.is_finite() {
        true => Ok(()),
        false => Err(usage(format!("{flag} {v} must be a positive number"))),
    }
}

/// A usage error unless `flag`'s value `v` is a finite number, 0 or more.
pub fn non_negative(flag: &str, v: f64) -> Result<()> {
    match v >= 0.0 && v.is_finite() {
        true => Ok(()),
        false => Err(usage(format!(
            "{flag} {v} must be a finite number, 0 or more"
        ))),
    }
}

/// The library's verdict on a typed value (an arch, a device, an input
/// size) as a usage error.
pub fn as_usage(e: anyhow::Error) -> anyhow::Error {
    usage(format!("{e:#}"))
}

/// One line to stderr in one write, so that the lines of processes
/// sharing it (the ranks under torchrun) never mix within a line, as
/// `eprintln!` writes its pieces one by one.
pub fn say(line: &str) {
    use std::io::Write;
    let _ = std::io::stderr().write_all(format!("{line}\n").as_bytes());
}

/// The warning callback every subcommand hands the library.
pub fn warn(message: String) {
    say(&format!("warning: {message}"));
}

/// What the user should know but need not act on (what was inferred).
pub fn note(message: String) {
    say(&format!("note: {message}"));
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
