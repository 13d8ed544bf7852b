//! What leaves the process: results on stdout (tables, `--json`), the
//! one-line warnings on stderr that the library hands back through its
//! callbacks, and which failures are usage errors (exit code 2; every other
//! failure exits 1).

use std::io::Write;

use anyhow::Result;
use vggctl::num::Num;

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
        false => Err(usage(format!(
            "{flag} {} must be a positive number",
            Num(v)
        ))),
    }
}

/// A usage error unless `flag`'s value `v` is a finite number, 0 or more.
pub fn non_negative(flag: &str, v: f64) -> Result<()> {
    match v >= 0.0 && v.is_finite() {
        true => Ok(()),
        false => Err(usage(format!(
            "{flag} {} must be a finite number, 0 or more",
            Num(v)
        ))),
    }
}

/// clap's parser for every integer option (`--epochs`, `--input`,
/// `--seed`, ...): its message says what the option takes, where Rust's
/// integer parser would say "invalid digit found in string" of `-1` or
/// `1.5`. A negative number for a signed option reaches that option's own
/// check.
pub fn whole<T: TryFrom<i128>>(s: &str) -> std::result::Result<T, String> {
    let v: i128 = s
        .trim()
        .parse()
        .map_err(|_| "expected a whole number".to_string())?;
    T::try_from(v).map_err(|_| match v < 0 {
        true => "expected a whole number, 0 or more".into(),
        false => "too large for this option".into(),
    })
}

/// clap's parser for `--data-url`: an http:// or https:// URL, or several,
/// comma-separated (mirrors tried in order).
pub fn http_urls(s: &str) -> std::result::Result<String, String> {
    for url in s.split(',').map(str::trim) {
        let rest = (url.strip_prefix("http://")).or_else(|| url.strip_prefix("https://"));
        if rest.is_none_or(str::is_empty) {
            return Err(format!("{url:?} is not an http:// or https:// URL"));
        }
    }
    Ok(s.to_string())
}

/// clap's parser for a size in bytes (`--cache-mem`): `4G`, `512M`, `64K`
/// or a number of bytes.
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let (digits, unit) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => t.split_at(i),
        None => (t, ""),
    };
    let shift = match unit.to_ascii_uppercase().trim_end_matches(['B', 'I']) {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(format!("'{s}' is not a size (e.g. 4G, 512M or bytes)")),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| format!("'{s}' is not a size (e.g. 4G, 512M or bytes)"))
}

/// clap's parser for a pair of numbers typed `A,B` (Adam's `--betas`);
/// their range is the option's own check.
pub fn pair(s: &str) -> std::result::Result<(f64, f64), String> {
    let parsed = s.split_once(',').and_then(|(a, b)| {
        let a: f64 = a.trim().parse().ok()?;
        Some((a, b.trim().parse().ok()?))
    });
    parsed.ok_or_else(|| "expected two numbers A,B".to_string())
}

/// clap's parser for a count of things a process starts (`--workers`
/// threads, `--nproc-per-node` ranks): a whole number up to [`MAX_STARTED`]
/// (a count in the billions would exhaust memory or hang the machine
/// starting them).
pub fn started(s: &str) -> std::result::Result<usize, String> {
    match whole::<usize>(s)? {
        n if n <= MAX_STARTED => Ok(n),
        _ => Err(format!("expected at most {MAX_STARTED}")),
    }
}

/// The most threads or ranks one option starts.
pub const MAX_STARTED: usize = 1024;

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
