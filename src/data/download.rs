//! Downloads with a `.part` file, checksum verification and a progress
//! callback; nothing is left behind when a download fails. A server that
//! never answers or stalls is given up on after a timeout (a couple of
//! tries), with the URL named.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use md5::Md5;
use sha2::{Digest, Sha256};

/// Which digest to check a download against.
pub enum Checksum {
    Md5(String),
    /// Accepts a SHA-256 whose hex form starts with this prefix (torchvision
    /// names its files with the first 8 hex digits).
    Sha256Prefix(String),
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Fetches `url` into `dest` (through `dest.part`), verifying `checksum`.
/// `progress(done, total)` is called as bytes arrive.
pub fn download(
    url: &str,
    dest: &Path,
    checksum: &Checksum,
    progress: &mut dyn FnMut(u64, Option<u64>),
) -> Result<()> {
    let part = dest.with_file_name(format!(
        "{}.part",
        dest.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    let timeout = timeout();
    let mut result = fetch(url, &part, checksum, timeout, progress);
    for _ in 1..TRIES {
        match &result {
            Err(e) if is_timeout(e) => {
                result = fetch(url, &part, checksum, timeout, progress);
            }
            _ => break,
        }
    }
    if let Err(e) = result.as_ref()
        && is_timeout(e)
    {
        let secs = timeout.as_secs();
        result = Err(anyhow::anyhow!(
            "{url} did not answer within {secs} s ({TRIES} tries): {e:#}"
        ));
    }
    match result {
        Ok(()) => fs::rename(&part, dest)
            .with_context(|| format!("renaming {} to {}", part.display(), dest.display())),
        Err(e) => {
            let _ = fs::remove_file(&part);
            Err(e)
        }
    }
}

/// Tries of a download that timed out.
const TRIES: usize = 3;

/// How long a connection, a response, and each read of the body may take:
/// `VGGCTL_HTTP_TIMEOUT` seconds, 60 by default.
fn timeout() -> Duration {
    let secs = std::env::var("VGGCTL_HTTP_TIMEOUT")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|&s| s > 0)
        .unwrap_or(60);
    Duration::from_secs(secs)
}

fn is_timeout(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<ureq::Error>(),
            Some(ureq::Error::Timeout(_))
        ) || c
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
    })
}

fn fetch(
    url: &str,
    part: &Path,
    checksum: &Checksum,
    timeout: Duration,
    progress: &mut dyn FnMut(u64, Option<u64>),
) -> Result<()> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(timeout))
        .timeout_send_request(Some(timeout))
        .timeout_recv_response(Some(timeout))
        .build()
        .into();
    let mut response = agent
        .get(url)
        .call()
        .with_context(|| format!("downloading {url}"))?;
    let total = response
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut reader = response.body_mut().with_config().limit(u64::MAX).reader();
    let mut file = File::create(part).with_context(|| format!("creating {}", part.display()))?;
    let mut md5 = Md5::new();
    let mut sha = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut done = 0u64;
    loop {
        let n = reader
            .read(&mut buf)
            .with_context(|| format!("downloading {url}"))?;
        if n == 0 {
            break;
        }
        match checksum {
            Checksum::Md5(_) => md5.update(&buf[..n]),
            Checksum::Sha256Prefix(_) => sha.update(&buf[..n]),
        }
        file.write_all(&buf[..n])
            .with_context(|| format!("writing {}", part.display()))?;
        done += n as u64;
        progress(done, total);
    }
    file.sync_all()
        .with_context(|| format!("writing {}", part.display()))?;
    if let Some(total) = total
        && done != total
    {
        bail!("download of {url} ended after {done} of {total} bytes");
    }
    match checksum {
        Checksum::Md5(want) => {
            let got = hex(&md5.finalize());
            if !got.eq_ignore_ascii_case(want) {
                bail!("checksum mismatch for {url}: MD5 {got}, expected {want}");
            }
        }
        Checksum::Sha256Prefix(want) => {
            let got = hex(&sha.finalize());
            if !got.starts_with(&want.to_ascii_lowercase()) {
                bail!("checksum mismatch for {url}: SHA-256 {got} does not start with {want}");
            }
        }
    }
    Ok(())
}
