//! `--nproc-per-node N`: vggctl as the launcher of one machine's ranks, for
//! convenience (`torchrun --standalone --nproc-per-node N` does the same).
//! It starts N copies of its own command line with the environment
//! torchrun gives its workers (`RANK`, `LOCAL_RANK`, `WORLD_SIZE`,
//! `MASTER_ADDR=127.0.0.1`, a free `MASTER_PORT`), so the ranks take the
//! one data-parallel code path; rank 0 serves the store. Ctrl-C reaches
//! every rank through the terminal's process group; a SIGTERM sent to the
//! launcher is passed on to them. The launcher waits for all ranks (a lost
//! rank makes the others stop within `--dist-timeout`) and exits as the
//! first rank that failed; with `--max-restarts K` it instead starts all
//! ranks again, up to K times, and they continue from the run's last
//! checkpoint (`--resume`), as torchrun's restarts do.

use std::ffi::OsString;
use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{Context, Result};

use super::output::{usage, warn};

/// How the launcher ends when a rank failed: that rank's exit status, and
/// the line to print (none when the ranks were interrupted: rank 0 has
/// said how to resume).
#[derive(Debug)]
pub struct RanksFailed {
    pub code: u8,
    pub message: Option<String>,
}

impl std::fmt::Display for RanksFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.message.as_deref().unwrap_or("interrupted"))
    }
}

impl std::error::Error for RanksFailed {}

impl RanksFailed {
    /// A failure a restart may get past: not an interruption (Ctrl-C, a
    /// SIGTERM), which the user asked for, nor a command line that cannot
    /// work (exit status 2), which would fail again.
    fn restartable(&self) -> bool {
        self.message.is_some() && self.code != 2 && vggctl::shim::stop_signal().is_none()
    }
}

/// This process's arguments without the launcher's own options,
/// `--nproc-per-node N` and `--max-restarts K` (or `=N`, `=K`).
fn rank_arguments() -> Vec<OsString> {
    const LAUNCHER: [&str; 2] = ["--nproc-per-node", "--max-restarts"];
    let mut out = Vec::new();
    let mut args = std::env::args_os().skip(1);
    while let Some(a) = args.next() {
        let text = a.to_string_lossy();
        if LAUNCHER.contains(&text.as_ref()) {
            args.next();
        } else if !LAUNCHER.iter().any(|l| text.starts_with(&format!("{l}="))) {
            out.push(a);
        }
    }
    out
}

/// A port on 127.0.0.1 that was free a moment ago (torchrun's standalone
/// rendezvous picks one the same way).
fn free_port() -> Result<u16> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port on 127.0.0.1")?;
    Ok(listener.local_addr()?.port())
}

/// Starts `n` local ranks of this command line and waits for them; after
/// a rank failed, starts them all again, up to `restarts` times.
pub fn run_local_ranks(n: usize, restarts: usize) -> Result<()> {
    if n == 0 {
        return Err(usage("--nproc-per-node must be at least 1"));
    }
    for var in ["RANK", "WORLD_SIZE", "SLURM_PROCID"] {
        if std::env::var_os(var).is_some() {
            return Err(usage(format!(
                "--nproc-per-node starts the ranks itself, but {var} says a launcher (torchrun, srun) already did: leave one of them out"
            )));
        }
    }
    let exe = std::env::current_exe().context("finding vggctl's own executable")?;
    let args = rank_arguments();
    vggctl::shim::install_stop_signals();
    for restart in 0.. {
        let failed = match wait_for(start_ranks(&exe, &args, n, restart)?) {
            Err(e) => e,
            Ok(()) => return Ok(()),
        };
        match failed.downcast_ref::<RanksFailed>() {
            Some(f) if restart < restarts && f.restartable() => warn(format!(
                "{f}; starting the {n} ranks again from the last checkpoint (restart {} of {restarts})",
                restart + 1
            )),
            _ => return Err(failed),
        }
    }
    unreachable!("the restarts are counted")
}

/// Starts the ranks, on a fresh port (rank 0 serves the store there);
/// `restart` counts the groups started before, as torchrun's
/// `TORCHELASTIC_RESTART_COUNT` does.
fn start_ranks(
    exe: &std::path::Path,
    args: &[OsString],
    n: usize,
    restart: usize,
) -> Result<Vec<Child>> {
    let port = free_port()?.to_string();
    let mut ranks: Vec<Child> = Vec::with_capacity(n);
    for rank in 0..n {
        let child = Command::new(exe)
            .args(args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", n.to_string())
            .env("LOCAL_WORLD_SIZE", n.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", &port)
            .env("TORCHELASTIC_RESTART_COUNT", restart.to_string())
            .env_remove("TORCHELASTIC_USE_AGENT_STORE")
            .spawn()
            .with_context(|| format!("starting rank {rank} ({})", exe.display()));
        match child {
            Ok(c) => ranks.push(c),
            Err(e) => {
                for c in &mut ranks {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                return Err(e);
            }
        }
    }
    Ok(ranks)
}

/// Waits for every rank, passing a SIGTERM on once; the first rank to fail
/// decides the exit status.
fn wait_for(mut ranks: Vec<Child>) -> Result<()> {
    let n = ranks.len();
    let mut codes: Vec<Option<i32>> = vec![None; n];
    let mut first_failure: Option<(usize, i32)> = None;
    let mut passed_on = false;
    while codes.iter().any(Option::is_none) {
        if !passed_on && vggctl::shim::stop_signal() == Some(15) {
            passed_on = true;
            for (rank, c) in ranks.iter().enumerate() {
                if codes[rank].is_none() {
                    vggctl::shim::send_signal(c.id(), 15);
                }
            }
        }
        for (rank, c) in ranks.iter_mut().enumerate() {
            if codes[rank].is_some() {
                continue;
            }
            if let Some(status) = c.try_wait().context("waiting for the ranks")? {
                let code = exit_code(status);
                codes[rank] = Some(code);
                if code != 0 && first_failure.is_none() {
                    first_failure = Some((rank, code));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let Some((rank, code)) = first_failure else {
        return Ok(());
    };
    let interrupted = code == 130 || code == 143;
    Err(RanksFailed {
        code: code.clamp(1, 255) as u8,
        message: (!interrupted)
            .then(|| format!("rank {rank} of {n} failed (exit status {code}); its error is above")),
    }
    .into())
}

/// A child's exit status as a shell reports it (128 + signal when killed).
fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}
