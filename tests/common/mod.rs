//! Helpers shared by the integration tests: running the real binary in a
//! fresh temporary directory, and finding the Python-written fixtures.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The binary under test. `VGGCTL_TEST_BIN` overrides the path cargo built
/// it at, for test binaries carried to another machine (scripts/gpu-kit).
pub fn bin() -> String {
    std::env::var("VGGCTL_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_vggctl").to_string())
}

/// Where `scripts/test` has `tests/make_reference.py` and friends write
/// (`VGGCTL_FIXTURES` overrides it, as `VGGCTL_TEST_BIN` does the binary).
pub fn fixtures() -> PathBuf {
    let dir = std::env::var_os("VGGCTL_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"));
    assert!(
        dir.is_dir(),
        "{} is missing: run scripts/test (it writes the Python reference tensors first)",
        dir.display()
    );
    dir
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(out: Output) -> Run {
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// The longest one command of the tests may run: a hang fails its test
/// with the command named instead of stalling the suite.
pub const RUN_LIMIT: Duration = Duration::from_secs(600);

pub fn run_in(dir: &Path, args: &[&str]) -> Run {
    run_within(dir, args, RUN_LIMIT)
}

/// `run_in`, killed and failed when it runs past `limit`.
pub fn run_within(dir: &Path, args: &[&str], limit: Duration) -> Run {
    let mut child = Command::new(bin())
        .args(args)
        .current_dir(dir)
        .env_remove("VGGCTL_CIFAR10_URL")
        .env_remove("VGGCTL_CIFAR100_URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running vggctl");
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            pipe.read_to_end(&mut bytes).ok();
            bytes
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("piped")));
    let stderr = drain(Box::new(child.stderr.take().expect("piped")));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for vggctl") {
            break status;
        }
        if started.elapsed() > limit {
            child.kill().ok();
            child.wait().ok();
            panic!("vggctl {args:?} ran past {limit:?} and was killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run::from(Output {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    })
}

/// A one-epoch vgg11 run on 64 training and 32 test images of `data`
/// (e.g. `["--dataset", "digits"]`), into `dir/run`: the smallest real
/// run, for tests that need a run directory.
pub fn tiny_run(dir: &Path, data: &[&str]) -> Run {
    let mut args = vec!["train"];
    args.extend_from_slice(data);
    args.extend_from_slice(&[
        "--arch",
        "vgg11",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--limit-train",
        "64",
        "--limit-test",
        "32",
        "--out",
        "run",
        "--quiet",
    ]);
    run_in(dir, &args)
}

/// `export` of the state dict `weights` as a vgg11 with the CIFAR head to
/// safetensors at `out`: the request the hostile-file tests feed bad
/// weights to.
pub fn export_vgg11_args<'a>(weights: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "export",
        "--weights",
        weights,
        "--arch",
        "vgg11",
        "--head",
        "cifar",
        "--format",
        "safetensors",
        "--out",
        out,
    ]
}

/// `check` of each of `items`, on two threads (one per core of the test
/// machine): for loops of runs of the binary that share no files they write.
/// A failed check fails the caller.
pub fn on_two_cores<T: Sync>(items: &[T], check: impl Fn(&T) + Sync) {
    let check = &check;
    std::thread::scope(|scope| {
        for half in items.chunks(items.len().div_ceil(2).max(1)) {
            scope.spawn(move || half.iter().for_each(check));
        }
    });
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

/// An error run: non-zero exit, and one line on stderr that contains `needle`.
pub fn assert_one_line_error(r: &Run, code: i32, needle: &str) {
    assert_eq!(r.code, code, "exit code; stderr: {}", r.stderr);
    let lines: Vec<&str> = r.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "expected one error line, got: {:?}",
        r.stderr
    );
    assert!(
        lines[0].contains(needle),
        "error {:?} should mention {needle:?}",
        lines[0]
    );
    assert!(!r.stderr.contains("panicked"), "panic: {}", r.stderr);
}

/// Serves `body` with status 200 to the next few requests on 127.0.0.1 and
/// returns the server's address (`127.0.0.1:PORT`).
pub fn serve(body: Vec<u8>) -> std::net::SocketAddr {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(16) {
            let Ok(mut s) = stream else { continue };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(head.as_bytes());
            let _ = s.write_all(&body);
        }
    });
    addr
}

/// `r` succeeded and printed each of `warnings` on stderr.
pub fn assert_warned(r: &Run, warnings: &[&str]) {
    assert_eq!(r.code, 0, "{}", r.stderr);
    for w in warnings {
        assert!(r.stderr.contains(w), "missing {w:?} in:\n{}", r.stderr);
    }
}

/// xorshift64*: a fixed, dependency-free stream of mutations.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// One to four random edits: a bit flip, a boundary byte, a truncation, a
/// run of 0xff, or a repeated chunk.
pub fn mutate(rng: &mut Rng, src: &[u8]) -> Vec<u8> {
    let mut m = src.to_vec();
    for _ in 0..1 + rng.below(4) {
        let i = rng.below(m.len().max(1));
        match rng.below(5) {
            0 => m[i] ^= 1 << rng.below(8),
            1 => m[i] = [0x00, 0xff, 0x7f, 0x80][rng.below(4)],
            2 => m.truncate(i),
            3 => {
                let end = (i + 8).min(m.len());
                m[i..end].fill(0xff);
            }
            _ => {
                let chunk: Vec<u8> = m[i..(i + 16).min(m.len())].to_vec();
                m.splice(i..i, chunk);
            }
        }
        if m.is_empty() {
            break;
        }
    }
    m
}
