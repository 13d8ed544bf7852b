//! Downloads with a `.part` file, checksum verification and a progress
//! callback; nothing is left behind when a download fails. A server that
//! never answers or stalls is given up on after a timeout (a couple of
//! tries), with the URL named.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use md5::Md5;
use sha2::{Digest, Sha256};

use super::archive::{Archive, unpack};
use crate::fsutil::TempFile;

/// Where a dataset's missing files are fetched from: a URL (CIFAR's
/// archive) or comma-separated mirrors serving its files by name (MNIST,
/// SVHN), and the MD5 of each file (comma-separated, in the dataset's order).
pub struct DownloadSource {
    pub url: String,
    pub md5: String,
}

/// `names` (some of `all`, whose MD5s `src.md5` lists in that order)
/// downloaded into `dir`, each from the first of `src.url`'s mirrors that
/// serves it, then handed to `then` (MNIST extracts its `.gz`). The
/// folders made for them are removed again if that fails and they are
/// empty; the files already checked stay, so a next run fetches the rest.
pub fn fetch_files(
    dir: &Path,
    (all, names): (&[&str], &[&str]),
    src: &DownloadSource,
    progress: &mut dyn FnMut(u64, Option<u64>),
    then: &mut dyn FnMut(&Path) -> Result<()>,
) -> Result<()> {
    let mirrors: Vec<&str> = src.url.split(',').map(str::trim).collect();
    let md5s: Vec<&str> = src.md5.split(',').map(str::trim).collect();
    if md5s.len() != all.len() {
        bail!(
            "{} MD5s given, one for each of {} expected",
            md5s.len(),
            all.join(", ")
        );
    }
    let made: Vec<&Path> = dir.ancestors().take_while(|d| !d.exists()).collect();
    let result = std::fs::create_dir_all(dir)
        .with_context(|| format!("creating {}", dir.display()))
        .and_then(|()| {
            names.iter().try_for_each(|f| {
                let md5 = md5s[all.iter().position(|k| k == f).expect("one of all")];
                let dest = dir.join(f);
                from_mirrors(&mirrors, f, &dest, md5, progress)?;
                then(&dest)
            })
        });
    if result.is_err() {
        for d in made {
            let _ = std::fs::remove_dir(d);
        }
    }
    result
}

/// [`fetch_files`] of the files of `needed` missing from `dir`, kept as they
/// are (SVHN's, USPS's); without `src`, an error naming them (`title`'s).
pub fn fetch_kept_files(
    dir: &Path,
    title: &str,
    (all, needed): (&[&str], &[&str]),
    src: Option<&DownloadSource>,
    progress: &mut dyn FnMut(u64, Option<u64>),
) -> Result<()> {
    let mut missing = needed.to_vec();
    missing.retain(|f| !dir.join(f).exists());
    if missing.is_empty() {
        return Ok(());
    }
    let how = format!(
        "put {} (torchvision's {title} files) into {} by hand, or point --data-dir at a copy (--data-url names a mirror)",
        needed.join(", "),
        dir.display()
    );
    let Some(src) = src else {
        bail!(
            "no {title} in {}: {} missing and downloading is off; {how}",
            dir.display(),
            missing.join(", ")
        );
    };
    fetch_files(dir, (all, &missing), src, progress, &mut |_| Ok(()))
        .with_context(|| format!("could not download {title}; {how}"))
}

/// A dataset published as files at a mirror (some of them archives of
/// folders), downloaded into one folder as torchvision downloads it.
pub struct Published<'a> {
    /// Its name in messages ("Oxford-IIIT Pet").
    pub title: &'a str,
    /// The folder under `--data-dir` its files go into ("": `--data-dir`
    /// itself, where an archive holds the dataset's folder).
    pub folder: &'a str,
    /// Its files, and their MD5s (the official ones, in the same order).
    pub files: &'a [&'a str],
    pub md5s: &'a [&'a str],
    /// Those of the files that are archives, and what of each is extracted.
    pub archives: &'a [Archive<'a>],
    /// The mirror torchvision downloads from.
    pub mirror: &'a str,
}

impl<'a> Published<'a> {
    /// Where it is downloaded from unless the command line says otherwise.
    pub fn own_source(&self) -> DownloadSource {
        DownloadSource {
            url: self.mirror.into(),
            md5: self.md5s.join(","),
        }
    }

    /// What the file `f` gives: what the archive gives, or the file.
    pub fn gives(&self, f: &str) -> String {
        let archive = self.archives.iter().find(|a| a.file == f);
        archive.map_or(f.to_string(), Archive::gives)
    }

    /// The files not in `root/folder` (an archive's where the folder it
    /// holds is not).
    pub fn missing(&self, root: &Path) -> Vec<&'a str> {
        let base = root.join(self.folder);
        (self.files.iter().copied())
            .filter(|f| !base.join(self.gives(f)).exists())
            .collect()
    }

    /// `root/folder`, its missing files first downloaded from the mirrors
    /// `src` names (None: downloading is off) and its archives extracted.
    /// A file is missing where it is not there, an archive where the
    /// folder it holds is not.
    pub fn fetch_missing(
        &self,
        root: &Path,
        src: Option<&DownloadSource>,
        progress: &mut dyn FnMut(u64, Option<u64>),
    ) -> Result<PathBuf> {
        let base = root.join(self.folder);
        let archive = |f: &str| self.archives.iter().find(|a| a.file == f);
        let missing = self.missing(root);
        let Some(first) = missing.first() else {
            return Ok(base);
        };
        let listed: Vec<String> = (self.files.iter())
            .map(|f| match archive(f) {
                Some(a) => format!("{} of {f}", a.gives()),
                None => f.to_string(),
            })
            .collect();
        let title = self.title;
        let (listed, mirror) = (listed.join(", "), self.mirror);
        let what = match self.folder {
            "" => format!("{listed} (from {mirror})"),
            folder => format!("{folder}/ ({listed}, from {mirror})"),
        };
        let how = format!(
            "put torchvision's {what} into {} by hand, or point --data-dir at a copy (--data-url names a mirror)",
            root.display()
        );
        let Some(src) = src else {
            bail!(
                "no {title} in {}: expected {} and downloading is off; {how}",
                root.display(),
                base.join(self.gives(first)).display()
            );
        };
        fetch_files(&base, (self.files, &missing), src, progress, &mut |path| {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            match name.as_deref().and_then(archive) {
                Some(a) => unpack(&base, a),
                None => Ok(()),
            }
        })
        .with_context(|| format!("could not download {title}; {how}"))?;
        Ok(base)
    }
}

/// `file` from the first of `mirrors` (base URLs) that serves it.
fn from_mirrors(
    mirrors: &[&str],
    file: &str,
    dest: &Path,
    md5: &str,
    progress: &mut dyn FnMut(u64, Option<u64>),
) -> Result<()> {
    let mut errors = Vec::new();
    for mirror in mirrors {
        let url = format!("{}/{file}", mirror.trim_end_matches('/'));
        match download(&url, dest, &Checksum::Md5(md5.into()), progress) {
            Ok(()) => return Ok(()),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    bail!("{}", errors.join("; "))
}

/// Whether `s` is a plain name in a list of files: not empty, `.` or `..`,
/// and without a path separator.
pub fn is_plain_name(s: &str) -> bool {
    !s.is_empty() && s != "." && s != ".." && !s.contains(['/', '\\'])
}

/// Downloads `archive` from `src.url` into `dir` (kept there, as
/// torchvision keeps it), checks its MD5 and extracts only the expected
/// members of its folder into `dir/folder` through a temporary directory,
/// so an interrupted or rejected download leaves nothing behind.
pub fn fetch_archive(
    dir: &Path,
    src: &DownloadSource,
    archive: &Archive,
    progress: &mut dyn FnMut(u64, Option<u64>),
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(archive.file);
    download(&src.url, &path, &Checksum::Md5(src.md5.clone()), progress)?;
    unpack(dir, archive)
}

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

/// Fetches `url` into `dest` (through a [`TempFile`] beside it), verifying
/// `checksum`. `progress(done, total)` is called as bytes arrive.
pub fn download(
    url: &str,
    dest: &Path,
    checksum: &Checksum,
    progress: &mut dyn FnMut(u64, Option<u64>),
) -> Result<()> {
    let mut part = TempFile::beside(dest)?;
    let timeout = timeout();
    let mut result = fetch(url, &mut part, checksum, timeout, progress);
    for _ in 1..TRIES {
        match &result {
            Err(e) if is_timeout(e) => {
                part.restart()?;
                result = fetch(url, &mut part, checksum, timeout, progress);
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
    // Dropping `part` on error removes it.
    result.and_then(|()| part.commit(dest))
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
    part: &mut TempFile,
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
    let response = agent
        .get(url)
        .call()
        .with_context(|| format!("downloading {url}"))?;
    let total = response
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let chunks = body_chunks(response, url);
    let shown = part.path().display().to_string();
    let file = part.file();
    let mut md5 = Md5::new();
    let mut sha = Sha256::new();
    let mut done = 0u64;
    loop {
        let chunk = match chunks.recv_timeout(timeout) {
            Ok(chunk) => chunk?,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no data for {} s after {done} bytes", timeout.as_secs()),
                ))
                .with_context(|| format!("downloading {url}"));
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        match checksum {
            Checksum::Md5(_) => md5.update(&chunk),
            Checksum::Sha256Prefix(_) => sha.update(&chunk),
        }
        file.write_all(&chunk)
            .with_context(|| format!("writing {shown}"))?;
        done += chunk.len() as u64;
        progress(done, total);
    }
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

/// The response body, read on a thread of its own and handed over in
/// chunks, so that a server that stops sending mid-body is noticed: the
/// receiver waits at most `timeout` for each chunk (ureq bounds only the
/// whole body). A stalled reader thread is left blocked on its socket and
/// ends with the process.
fn body_chunks(
    mut response: ureq::http::Response<ureq::Body>,
    url: &str,
) -> mpsc::Receiver<Result<Vec<u8>>> {
    let (tx, rx) = mpsc::sync_channel(8);
    let url = url.to_string();
    std::thread::spawn(move || {
        let mut reader = response.body_mut().with_config().limit(u64::MAX).reader();
        loop {
            let mut buf = vec![0u8; 1 << 16];
            match reader.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    buf.truncate(n);
                    if tx.send(Ok(buf)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(
                        anyhow::Error::new(e).context(format!("downloading {url}"))
                    ));
                    return;
                }
            }
        }
    });
    rx
}
