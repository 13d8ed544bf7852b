//! Archives of datasets (`.tar.gz`, `.tar`, `.zip`): which members of
//! which folder a dataset takes from one, and extracting exactly those
//! through a temporary directory, so that no other path (and no path
//! traversal) is ever written and a failure leaves nothing behind.
//! (`download::fetch_archive` downloads one and extracts it here.)

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// A `.tar.gz`, `.tar` or `.zip` of one folder of files (CIFAR's binary
/// version, STL-10, Oxford-IIIT Pet's two, Food-101's, GTSRB's images,
/// Caltech-256's): its file name as published, the folder it holds (a
/// path: `GTSRB/Training`; or "", where its members lie at its top and are
/// extracted beside it, as GTSRB's ground-truth zip's `GT-final_test.csv`),
/// and the members of that folder that are extracted (their paths in it;
/// all must be there), with any others whose paths `also` accepts
/// (`images/a.jpg`; subfolders are made as needed).
pub struct Archive<'a> {
    pub file: &'a str,
    pub folder: &'a str,
    pub members: &'a [&'a str],
    pub also: fn(&str) -> bool,
}

impl Archive<'_> {
    /// What it gives, whose presence says it was extracted: its folder
    /// (`name/`), or its first member where it holds no folder.
    pub fn gives(&self) -> String {
        match self.folder {
            "" => self.members[0].to_string(),
            folder => format!("{folder}/"),
        }
    }
}

/// For [`Archive::also`]: no members but the named ones.
pub fn none_else(_: &str) -> bool {
    false
}

/// For [`Archive::also`]: the `.jpg` files directly in the folder (the
/// photographs of Oxford's Pet and Flowers archives).
pub fn jpg_files(name: &str) -> bool {
    name.ends_with(".jpg") && !name.contains('/')
}

/// For [`Archive::also`]: the `.jpg` files (that case only) of the class
/// folders at the archive folder's top (`<class>/<image>.jpg`: the
/// Caltechs').
pub fn class_jpgs(path: &str) -> bool {
    let parts: Vec<&str> = path.split('/').collect();
    matches!(parts[..], [_, file] if file.ends_with(".jpg"))
}

/// For [`Archive::also`]: the `.jpg` files of the class folders in
/// `images/` (Food-101's and DTD's photographs: `images/<class>/<id>.jpg`).
pub fn class_folder_jpgs(path: &str) -> bool {
    let parts: Vec<&str> = path.split('/').collect();
    matches!(parts[..], ["images", _, file] if file.ends_with(".jpg"))
}

/// Extracts `archive`, downloaded into `dir`, into `dir/folder` (the
/// folders above it made as needed) through a temporary directory; the
/// archive, and the folders made for it, are removed if that fails.
pub fn unpack(dir: &Path, archive: &Archive) -> Result<()> {
    let path = dir.join(archive.file);
    let target = dir.join(archive.gives());
    let made: Vec<PathBuf> = (target.ancestors().skip(1))
        .take_while(|d| !d.exists())
        .map(Path::to_path_buf)
        .collect();
    // A fresh directory of an unguessable name: `create_dir` never follows
    // or reuses what is already there.
    let tmp = crate::fsutil::temp_name(&target);
    let parent = made.first().map_or(Ok(()), fs::create_dir_all);
    let result = (parent.and_then(|()| fs::create_dir(&tmp)))
        .with_context(|| format!("creating {}", tmp.display()))
        .and_then(|()| extract(&path, archive, &tmp))
        .and_then(|()| place(&tmp, dir, archive));
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
        let _ = fs::remove_file(&path);
        for d in made {
            let _ = fs::remove_dir(d);
        }
    }
    result
}

/// Moves what `archive` gives from `tmp`, where it was extracted, into
/// `dir`: the folder, or each member (and then `tmp` is removed).
fn place(tmp: &Path, dir: &Path, archive: &Archive) -> Result<()> {
    let moving = |from: &Path, to: &Path| {
        fs::rename(from, to).with_context(|| format!("moving {} into place", from.display()))
    };
    match archive.folder {
        "" => {
            for m in archive.members {
                moving(&tmp.join(m), &dir.join(m))?;
            }
            fs::remove_dir_all(tmp).with_context(|| format!("removing {}", tmp.display()))
        }
        folder => moving(tmp, &dir.join(folder)),
    }
}

/// The members of `archive`'s folder in the archive at `path` (a `.zip`
/// or a plain `.tar` by its name, else a `.tar.gz`), written into `into`.
fn extract(path: &Path, archive: &Archive, into: &Path) -> Result<()> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut taken = Taken {
        archive,
        into,
        found: Vec::new(),
    };
    let reading = || format!("reading {}", path.display());
    if archive.file.ends_with(".zip") {
        let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
            .with_context(|| format!("{}: not a zip archive, or a damaged one", path.display()))?;
        for i in 0..zip.len() {
            let mut entry = zip.by_index(i).with_context(reading)?;
            // enclosed_name: None for an absolute path or one with `..`.
            let member = entry.enclosed_name();
            let Some(member) = member.filter(|_| entry.is_file() && !entry.is_symlink()) else {
                continue;
            };
            taken.write(&member, &mut entry)?;
        }
    } else {
        let file: Box<dyn Read> = match archive.file.ends_with(".tar") {
            true => Box::new(std::io::BufReader::new(file)),
            false => Box::new(flate2::read::GzDecoder::new(file)),
        };
        let mut tar = tar::Archive::new(file);
        for entry in tar.entries().with_context(reading)? {
            let mut entry = entry.with_context(reading)?;
            let member: PathBuf = entry.path()?.into_owned();
            if entry.header().entry_type().is_file() {
                taken.write(&member, &mut entry)?;
            }
        }
    }
    taken.finish(path)
}

/// What of an archive is extracted, and where to.
struct Taken<'a> {
    archive: &'a Archive<'a>,
    into: &'a Path,
    /// The named members seen so far.
    found: Vec<&'a str>,
}

impl<'a> Taken<'a> {
    /// Writes the regular file `member` (its contents read from `data`)
    /// into the folder, where it is one to extract: only `<folder>/<known
    /// path>`, so no other paths (and so no traversal) are ever written.
    fn write(&mut self, member: &Path, data: &mut dyn Read) -> Result<()> {
        let Some(name) = inside(member, self.archive.folder) else {
            return Ok(());
        };
        let known = self.archive.members.iter().find(|f| **f == name);
        if known.is_none() && !(self.archive.also)(&name) {
            return Ok(());
        }
        let dest = self.into.join(&name);
        if let Some(parent) = dest.parent().filter(|_| name.contains('/')) {
            fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        let mut out =
            File::create(&dest).with_context(|| format!("creating {}", dest.display()))?;
        std::io::copy(data, &mut out)
            .with_context(|| format!("extracting {}", member.display()))?;
        self.found.extend(known);
        Ok(())
    }

    /// An error naming the named members the archive at `path` lacked.
    fn finish(self, path: &Path) -> Result<()> {
        let missing: Vec<String> = (self.archive.members.iter())
            .filter(|f| !self.found.contains(f))
            .map(|m| match self.archive.folder {
                "" => m.to_string(),
                folder => format!("{folder}/{m}"),
            })
            .collect();
        if !missing.is_empty() {
            bail!("{} lacks {}", path.display(), missing.join(", "));
        }
        Ok(())
    }
}

/// `member`'s path inside `folder` (`a/b.jpg`), where it is inside it
/// and every part of that path is a plain UTF-8 name (no `..`).
fn inside(member: &Path, folder: &str) -> Option<String> {
    use std::path::Component;
    let rest = member.strip_prefix(folder).ok()?;
    let parts = rest.components().map(|c| match c {
        Component::Normal(name) => name.to_str(),
        _ => None,
    });
    let parts: Vec<&str> = parts.collect::<Option<_>>()?;
    (!parts.is_empty()).then(|| parts.join("/"))
}
