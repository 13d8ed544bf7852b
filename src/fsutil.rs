//! Files in and out. Writing: a crash or kill at any moment leaves either
//! the old file or the new one, never a half-written one (every file vggctl
//! writes goes through [`replace_atomically`]). Reading: only regular files
//! of a size known before reading ([`read_regular`]), so a device such as
//! `/dev/zero`, a FIFO without a writer or a directory is one error, never
//! an endless read or a hang.

use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// Reads the whole regular file `path` (symbolic links followed) after
/// checking, before opening it, that it is one and holds at most `max`
/// bytes; `what` names the kind of file in the error.
pub fn read_regular(path: &Path, what: &str, max: u64) -> Result<Vec<u8>> {
    let meta = fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    if !meta.is_file() {
        let kind = if meta.is_dir() {
            "a directory"
        } else {
            "not a regular file (a device, FIFO or socket)"
        };
        bail!("{}: {kind}, not {what}", path.display());
    }
    if meta.len() > max {
        bail!(
            "{}: {} bytes, more than {what} can hold ({max})",
            path.display(),
            meta.len()
        );
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    File::open(path)
        .and_then(|f| f.take(max + 1).read_to_end(&mut bytes))
        .with_context(|| format!("reading {}", path.display()))?;
    if bytes.len() as u64 > max {
        bail!("{}: grew past {max} bytes while being read", path.display());
    }
    Ok(bytes)
}

/// The temporary sibling a write goes to before it is renamed into place.
fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// `write` writes the whole file to the temporary path it is given, which
/// is then renamed over `path`. On error the temporary file is removed.
pub fn replace_atomically(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = temp_path(path);
    let result = write(&tmp).and_then(|()| {
        fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Writes through `fill` into a temporary file, syncs it, then renames it
/// over `path`.
pub fn write_atomic(
    path: &Path,
    fill: impl FnOnce(&mut BufWriter<File>) -> Result<()>,
) -> Result<()> {
    replace_atomically(path, |tmp| {
        let file = File::create(tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut w = BufWriter::new(file);
        fill(&mut w)?;
        w.flush()
            .with_context(|| format!("writing {}", tmp.display()))?;
        w.get_ref()
            .sync_all()
            .with_context(|| format!("syncing {}", tmp.display()))
    })
}

pub fn write_atomic_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(path, |w| {
        w.write_all(bytes)
            .with_context(|| format!("writing {}", path.display()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A write that fails leaves the old file and no temporary file; one
    /// that succeeds replaces the file whole.
    #[test]
    fn a_failed_write_leaves_the_old_file_and_nothing_else() {
        let dir = std::env::temp_dir().join(format!("vggctl-fsutil-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f.txt");
        write_atomic_bytes(&path, b"old").unwrap();
        let err = replace_atomically(&path, |tmp| {
            fs::write(tmp, b"half")?;
            anyhow::bail!("disk full")
        });
        assert!(err.is_err());
        assert_eq!(fs::read(&path).unwrap(), b"old");
        assert_eq!(
            fs::read_dir(&dir).unwrap().count(),
            1,
            "the temporary file is gone"
        );
        write_atomic_bytes(&path, b"new").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        fs::remove_dir_all(&dir).unwrap();
    }
}
