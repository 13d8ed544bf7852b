//! The vggctl binary: parses the command line, dispatches to `cmd::*`, and
//! turns errors into one line on stderr and an exit code. libtorch failures
//! that tch reports by panicking (running out of CPU or GPU memory, above
//! all) become such a line too, not a panic message with a C++ backtrace.

mod cmd;

use std::any::Any;
use std::io;
use std::panic;
use std::sync::Mutex;

use clap::error::ErrorKind;

fn main() {
    let code = run();
    vggctl::shim::exit_now(code)
}

/// The command's exit status: 0, 1 for a failure while running, 2 for a
/// command line that cannot work, 128 + the signal that stopped a run.
fn run() -> u8 {
    vggctl::data::stream::set_loader_hooks(vggctl::data::stream::LoaderHooks {
        worker_setup: vggctl::shim::data_worker_setup,
        new_batch: vggctl::shim::filled_u8,
    });
    let cli = match cmd::parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    // Where a panic happened, for the one-line report; the default hook's
    // multi-line message is not printed.
    static PANIC_AT: Mutex<Option<String>> = Mutex::new(None);
    panic::set_hook(Box::new(|info| {
        if let Ok(mut at) = PANIC_AT.lock() {
            *at = info
                .location()
                .map(|l| format!("{}:{}", l.file(), l.line()));
        }
    }));
    let outcome = match panic::catch_unwind(|| cmd::run(cli)) {
        Ok(outcome) => outcome,
        Err(payload) => {
            let at = PANIC_AT.lock().ok().and_then(|a| a.clone());
            cmd::say(&format!(
                "vggctl: error: {}",
                panic_line(payload.as_ref(), at)
            ));
            return 1;
        }
    };
    match outcome {
        Ok(()) => 0,
        Err(err) => {
            if is_broken_pipe(&err) {
                return 0;
            }
            // One of several ranks says which it is; only rank 0 tells how to resume.
            let joined = vggctl::dist::joined();
            let who = joined.map_or(String::new(), |(r, w)| format!(" [rank {r}/{w}]"));
            if err.downcast_ref::<vggctl::Interrupted>().is_some() {
                if joined.is_none_or(|(r, _)| r == 0) {
                    cmd::say(&format!("vggctl{who}: {}", one_line(&err)));
                }
                // 128 + the signal, as a shell reports a process it killed.
                let sig = vggctl::shim::stop_signal().unwrap_or(2);
                return 128 + sig as u8;
            }
            // --nproc-per-node: the ranks have spoken; exit as the failed one.
            if let Some(f) = err.downcast_ref::<cmd::RanksFailed>() {
                if let Some(m) = &f.message {
                    cmd::say(&format!("vggctl: error: {m}"));
                }
                return f.code;
            }
            cmd::say(&format!("vggctl{who}: error: {}", one_line(&err)));
            // 2 for a command line that cannot work, as clap's own errors;
            // 1 for everything that failed while running.
            match err.downcast_ref::<cmd::Usage>() {
                Some(_) => 2,
                None => 1,
            }
        }
    }
}

/// One line for a panic: libtorch's own first line when tch unwrapped a
/// libtorch error (with a hint when memory ran out), else the message and
/// where it happened (a bug of ours).
fn panic_line(payload: &(dyn Any + Send), at: Option<String>) -> String {
    let msg = payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic");
    // tch: called `Result::unwrap()` on an `Err` value: Torch("<what>\nframe #0: ...")
    if let Some(start) = msg.find("Torch(\"") {
        let what = &msg[start + 7..];
        let what = what.split("\\n").next().unwrap_or(what);
        let what = what.trim_end_matches("\")").trim();
        // "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: ..."
        let what = match what.strip_prefix('[') {
            Some(rest) => rest.split_once("] ").map_or(what, |(_, w)| w),
            None => what,
        };
        let what = what.strip_prefix("err == 0. ").unwrap_or(what);
        let oom = what.contains("out of memory") || what.contains("can't allocate memory");
        return format!(
            "libtorch: {}{}",
            what.split_whitespace().collect::<Vec<_>>().join(" "),
            if oom {
                " (a smaller --batch-size or --input needs less)"
            } else {
                ""
            }
        );
    }
    let first = msg.lines().next().unwrap_or(msg);
    match at {
        Some(at) => format!("internal error at {at}: {first} (please report this)"),
        None => format!("internal error: {first} (please report this)"),
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
fn usage_error(e: clap::Error) -> u8 {
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = e.print();
        return 0;
    }
    let text = e.render().to_string();
    let mut lines = text.lines().map(str::trim_end);
    let first = lines
        .by_ref()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("invalid arguments");
    let mut message = first
        .trim_start_matches("error: ")
        .trim_end_matches(':')
        .to_string();
    // The indented lines right after it: the missing arguments' names.
    let listed: Vec<&str> = lines
        .by_ref()
        .take_while(|l| l.starts_with("  ") && !l.trim().is_empty())
        .map(str::trim)
        .filter(|l| !l.starts_with("[possible values: "))
        .collect();
    if !listed.is_empty() {
        message += &format!(": {}", listed.join(", "));
    }
    // clap's "did you mean" and the accepted values come on later lines.
    for l in text.lines().map(str::trim) {
        if let Some(tip) = l.strip_prefix("tip: ") {
            message += &format!(" ({tip})");
        } else if let Some(v) = l.strip_prefix("[possible values: ") {
            message += &format!(" (possible values: {})", v.trim_end_matches(']'));
        }
    }
    // The help to read: the subcommand's, when one was named.
    let sub = std::env::args()
        .nth(1)
        .filter(|a| cmd::SUBCOMMANDS.contains(&a.as_str()));
    let help = match sub {
        Some(s) => format!("vggctl {s} --help"),
        None => "vggctl --help".to_string(),
    };
    cmd::say(&format!("vggctl: error: {message}; see '{help}'"));
    2
}
