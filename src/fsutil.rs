//! Files in and out. Writing: a crash or kill at any moment leaves either
//! the old file or the new one, never a half-written one: every file vggctl
//! writes is first a [`TempFile`] beside its target (created exclusively,
//! under an unpredictable name, never through a symbolic link), then renamed
//! into place, and only over a regular file or nothing (never over a
//! device, a FIFO, a directory or a link). Reading: only regular files of a
//! size known before reading ([`read_regular`]), so a device such as
//! `/dev/zero`, a FIFO without a writer or a directory is one error, never
//! an endless read or a hang.

use std::fs::{self, File, OpenOptions};
use std::hash::{BuildHasher, Hasher, RandomState};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// Opens the regular file `path` (symbolic links followed) after checking,
/// before opening it, that it is one and holds at most `max` bytes; `what`
/// names the kind of file in the error. The reader stops one byte past
/// `max`, so a file that grows while it is read is caught by counting.
pub fn open_regular(path: &Path, what: &str, max: u64) -> Result<(std::io::Take<File>, u64)> {
    let meta = fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    if !meta.is_file() {
        bail!("{}: {}, not {what}", path.display(), kind(&meta));
    }
    if meta.len() > max {
        bail!(
            "{}: {} bytes, more than {what} can hold ({max})",
            path.display(),
            meta.len()
        );
    }
    let file = File::open(path).with_context(|| format!("reading {}", path.display()))?;
    Ok((file.take(max + 1), meta.len()))
}

/// Reads the whole regular file `path` (see [`open_regular`]).
pub fn read_regular(path: &Path, what: &str, max: u64) -> Result<Vec<u8>> {
    let (mut file, len) = open_regular(path, what, max)?;
    let mut bytes = Vec::with_capacity(len as usize);
    (file.read_to_end(&mut bytes)).with_context(|| format!("reading {}", path.display()))?;
    if bytes.len() as u64 > max {
        bail!("{}: grew past {max} bytes while being read", path.display());
    }
    Ok(bytes)
}

/// Copies what `decoder` unpacks into `out`, refusing more than `max`
/// bytes (a small archive can unpack to any size): the bytes copied, or
/// an error naming `name`, a `format` file that is damaged or too large.
pub fn unpack_capped(
    decoder: impl Read,
    out: &mut impl Write,
    max: u64,
    (name, format): (&str, &str),
) -> Result<u64> {
    let n = std::io::copy(&mut decoder.take(max + 1), out)
        .with_context(|| format!("{name}: not a {format} file, or a damaged one"))?;
    if n > max {
        bail!("{name}: unpacks to more than {max} bytes");
    }
    Ok(n)
}

/// [`read_regular`]'s bytes as text: UTF-8, or an error naming the file.
pub fn read_text(path: &Path, what: &str, max: u64) -> Result<String> {
    let bytes = read_regular(path, what, max)?;
    String::from_utf8(bytes).with_context(|| format!("{}: not UTF-8 text", path.display()))
}

/// What kind of file `meta` describes, for messages.
fn kind(meta: &fs::Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_symlink() {
        "a symbolic link"
    } else if t.is_dir() {
        "a directory"
    } else {
        "not a regular file (a device, FIFO or socket)"
    }
}

/// The user's cache directory: `$XDG_CACHE_HOME`, else `~/.cache`.
pub fn user_cache_dir() -> Option<PathBuf> {
    std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
}

/// A name no other process can guess: `.NAME.tmp-<16 hex digits>`.
pub fn temp_name(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // std seeds each RandomState from the operating system's random source.
    let mut h = RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(t.as_nanos());
    }
    target.with_file_name(format!(".{name}.tmp-{:016x}", h.finish()))
}

/// Whether `name` is one of [`temp_name`]'s (what a killed process left).
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with('.') && name.contains(".tmp-")
}

/// Refuses to replace anything at `target` but a regular file: the rename
/// would put a regular file where a device, FIFO, directory or link was.
pub fn check_replaceable(target: &Path) -> Result<()> {
    match fs::symlink_metadata(target) {
        Ok(meta) if !meta.file_type().is_file() => bail!(
            "{}: {}; vggctl only replaces regular files, so choose another path",
            target.display(),
            kind(&meta)
        ),
        _ => Ok(()),
    }
}

/// A file being written beside its target: created exclusively (a name
/// already taken, a planted link included, is never opened), renamed over
/// the target by [`TempFile::commit`], removed if dropped before that.
pub struct TempFile {
    path: PathBuf,
    file: Option<File>,
    /// Dropped after the file is removed or renamed (fields drop after
    /// `Drop::drop`): a signal until then removes the file.
    _on_signal: crate::shim::RemovedOnSignal,
}

impl TempFile {
    pub fn beside(target: &Path) -> Result<TempFile> {
        check_replaceable(target)?;
        for _ in 0..16 {
            let path = temp_name(target);
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(file) => {
                    return Ok(TempFile {
                        _on_signal: crate::shim::remove_on_signal(&path),
                        path,
                        file: Some(file),
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    // Named by the file asked for, not the temporary one.
                    let dir = match target.parent() {
                        Some(d) if !d.as_os_str().is_empty() => d,
                        _ => Path::new("."),
                    };
                    if e.kind() == std::io::ErrorKind::NotFound && !dir.is_dir() {
                        bail!(
                            "{}: directory {} does not exist",
                            target.display(),
                            dir.display()
                        );
                    }
                    bail!(
                        "{}: cannot create a file in {}: {e}",
                        target.display(),
                        dir.display()
                    );
                }
            }
        }
        bail!(
            "{}: could not create a temporary file beside it",
            target.display()
        )
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&mut self) -> &mut File {
        self.file.as_mut().expect("an open temporary file")
    }

    /// Empties the file (a retried download starts again).
    pub fn restart(&mut self) -> Result<()> {
        use std::io::Seek;
        let path = self.path.clone();
        let f = self.file();
        f.set_len(0)
            .and_then(|()| f.rewind())
            .with_context(|| format!("truncating {}", path.display()))
    }

    /// Syncs the file and renames it over `target` (a regular file or nothing).
    pub fn commit(mut self, target: &Path) -> Result<()> {
        let file = self.file.take().expect("an open temporary file");
        file.sync_all()
            .with_context(|| format!("writing {}", self.path.display()))?;
        drop(file);
        check_replaceable(target)?;
        fs::rename(&self.path, target)
            .with_context(|| format!("renaming {} to {}", self.path.display(), target.display()))?;
        self.path = PathBuf::new();
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Writes through `fill` into a [`TempFile`], syncs it, then renames it
/// over `path`; on error nothing is left but the old file.
pub fn write_atomic(
    path: &Path,
    fill: impl FnOnce(&mut BufWriter<&mut File>) -> Result<()>,
) -> Result<()> {
    let mut tmp = TempFile::beside(path)?;
    let shown = tmp.path().display().to_string();
    {
        let mut w = BufWriter::new(tmp.file());
        fill(&mut w)?;
        w.flush().with_context(|| format!("writing {shown}"))?;
    }
    tmp.commit(path)
}

pub fn write_atomic_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(path, |w| {
        w.write_all(bytes)
            .with_context(|| format!("writing {}", path.display()))
    })
}

/// Fails when an output `path` exists and `force` is off, or when its
/// directory is missing: checked before the work that makes its content.
pub fn check_target(path: &Path, force: bool) -> Result<()> {
    // What --force could not replace is said as such, without offering it.
    check_replaceable(path)?;
    if path.exists() && !force {
        bail!(
            "{} already exists (use --force to overwrite)",
            path.display()
        );
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.is_dir()
    {
        let (shown, dir_shown) = (path.display(), dir.display());
        match dir.exists() {
            true => bail!("{shown}: {dir_shown} is not a directory"),
            false => bail!("{shown}: directory {dir_shown} does not exist"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A decoder's output up to the cap is copied; a byte more, or a
    /// damaged stream, is one error naming the file and the format.
    #[test]
    fn an_unpacked_stream_is_capped() {
        use flate2::{Compression, read::GzDecoder, write::GzEncoder};
        let mut gz = GzEncoder::new(Vec::new(), Compression::default());
        gz.write_all(&[7u8; 1000]).unwrap();
        let packed = gz.finish().unwrap();
        let unpack = |bytes: &[u8], max| {
            let mut out = Vec::new();
            unpack_capped(GzDecoder::new(bytes), &mut out, max, ("f.gz", "gzip")).map(|n| (n, out))
        };
        assert_eq!(unpack(&packed, 1000).unwrap(), (1000, vec![7u8; 1000]));
        let e = unpack(&packed, 999).unwrap_err().to_string();
        assert_eq!(e, "f.gz: unpacks to more than 999 bytes");
        let e = unpack(&packed[..packed.len() / 2], 1000)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "f.gz: not a gzip file, or a damaged one");
    }

    /// A write that fails leaves the old file and no temporary file; one
    /// that succeeds replaces the file whole.
    #[test]
    fn a_failed_write_leaves_the_old_file_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.txt");
        write_atomic_bytes(&path, b"old").unwrap();
        let err = write_atomic(&path, |w| {
            w.write_all(b"half")?;
            anyhow::bail!("disk full")
        });
        assert!(err.is_err());
        assert_eq!(fs::read(&path).unwrap(), b"old");
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "the temporary file is gone"
        );
        write_atomic_bytes(&path, b"new").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
    }

    /// Nothing but a regular file is replaced: a link stays a link (and
    /// the file it points to keeps its bytes), a directory stays, a device
    /// stays a device.
    #[test]
    fn only_regular_files_are_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, b"keep").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let sub = dir.path().join("sub");
        fs::create_dir(&sub).unwrap();
        for (target, what) in [
            (&link, "a symbolic link"),
            (&sub, "a directory"),
            (&PathBuf::from("/dev/null"), "not a regular file"),
        ] {
            let err = write_atomic_bytes(target, b"new").unwrap_err().to_string();
            assert!(err.contains(what), "{err}");
        }
        assert_eq!(fs::read(&victim).unwrap(), b"keep");
        assert!(
            fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            3,
            "no temporary file left"
        );
    }

    /// An output that is a directory is refused as one, with or without
    /// --force (which could not replace it either); an existing file
    /// without --force is refused, offering it.
    #[test]
    fn a_directory_target_is_named_as_one() {
        let dir = tempfile::tempdir().unwrap();
        let want = format!(
            "{}: a directory; vggctl only replaces regular files, so choose another path",
            dir.path().display()
        );
        for force in [false, true] {
            let err = check_target(dir.path(), force).unwrap_err().to_string();
            assert_eq!(err, want);
        }
        let file = dir.path().join("model.onnx");
        std::fs::write(&file, b"x").unwrap();
        let err = check_target(&file, false).unwrap_err().to_string();
        assert!(
            err.ends_with("already exists (use --force to overwrite)"),
            "{err}"
        );
        assert!(check_target(&file, true).is_ok());
    }

    /// A file that cannot be created is named as asked, with its directory,
    /// never by its temporary name.
    #[test]
    fn a_missing_directory_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("no").join("model.onnx");
        let err = write_atomic_bytes(&target, b"x").unwrap_err().to_string();
        let want = format!(
            "{}: directory {} does not exist",
            target.display(),
            dir.path().join("no").display()
        );
        assert_eq!(err, want);
    }

    /// Temporary names are not guessable from the process id: two in a row differ.
    #[test]
    fn temporary_names_differ() {
        let t = Path::new("/x/model.onnx");
        let (a, b) = (temp_name(t), temp_name(t));
        assert_ne!(a, b);
        assert!(is_temp_name(&a.file_name().unwrap().to_string_lossy()));
    }
}
