//! ImageFolder's listing of a folder: its classes (the sorted subfolders)
//! and image files, in torchvision's order, as `folder` loads them and the
//! listed datasets' readers (GTSRB's, Imagenette's) and `features` list
//! them.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// Image files with their class index.
pub type LabeledFiles = Vec<(PathBuf, i64)>;

/// What the list file at `path` lists, or an error saying it lists no
/// images: the one wording every dataset's list reader ends with.
pub fn some_listed<T>(path: &Path, listed: Vec<T>) -> Result<Vec<T>> {
    if listed.is_empty() {
        bail!("{}: lists no images", path.display());
    }
    Ok(listed)
}

/// The file extensions torchvision's `ImageFolder` takes (its
/// `IMG_EXTENSIONS`), compared without regard to case.
pub const EXTENSIONS: [&str; 9] = [
    "jpg", "jpeg", "png", "ppm", "bmp", "pgm", "tif", "tiff", "webp",
];

/// [`EXTENSIONS`] for messages: `.jpg, .jpeg, ...`.
pub fn extension_list() -> String {
    EXTENSIONS.map(|e| format!(".{e}")).join(", ")
}

/// Class names (sorted subfolders, those whose names start with a dot
/// left out) and every image file with its class, in `ImageFolder`'s
/// order. A class folder without images is an error naming it, as it is
/// for torchvision.
pub fn scan(dir: &Path) -> Result<(Vec<String>, LabeledFiles)> {
    let entries = fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    let mut classes = Vec::new();
    for e in entries.flatten().filter(|e| e.path().is_dir()) {
        let Some(name) = e.file_name().to_str().map(str::to_string) else {
            bail!(
                "{}: a class folder's name is not UTF-8 (class names go into the checkpoint as text): rename it",
                e.path().display()
            );
        };
        if !name.starts_with('.') {
            classes.push(name);
        }
    }
    classes.sort();
    if classes.is_empty() {
        bail!(
            "{}: no class folders (expected {}/<class>/<image>.jpg)",
            dir.display(),
            dir.display()
        );
    }
    let mut files = Vec::new();
    let mut empty = Vec::new();
    for (label, class) in classes.iter().enumerate() {
        let imgs = image_files(&dir.join(class))?;
        if imgs.is_empty() {
            empty.push(class.as_str());
        }
        files.extend(imgs.into_iter().map(|p| (p, label as i64)));
    }
    if files.is_empty() {
        bail!(
            "{}: no images in its class folders (images are {})",
            dir.display(),
            extension_list()
        );
    }
    if !empty.is_empty() {
        bail!(
            "{}: no images in class folder(s) {}: every class needs one (images are {})",
            dir.display(),
            empty.join(", "),
            extension_list()
        );
    }
    Ok((classes, files))
}

/// The listing of torchvision's Caltech readers: the sorted class folders
/// of `dir` but `skip`, and for the class at index `c` the files `name(c,
/// k)` for `k` from 1 to the number of its entries whose names `counted`
/// accepts; the files named, not those found, as torchvision reads them.
pub fn counted_classes(
    dir: &Path,
    skip: &str,
    counted: fn(&str) -> bool,
    name: fn(usize, usize) -> String,
) -> Result<(Vec<String>, LabeledFiles)> {
    let reading = |d: &Path| format!("reading {}", d.display());
    let mut classes = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| reading(dir))? {
        let path = entry.with_context(|| reading(dir))?.path();
        if !path.is_dir() {
            continue;
        }
        match path.file_name().and_then(|n| n.to_str()) {
            Some(n) if n == skip => {}
            Some(n) => classes.push(n.to_string()),
            None => bail!("{}: a class folder's name is not UTF-8", path.display()),
        }
    }
    classes.sort();
    let mut files = Vec::new();
    for (c, class) in classes.iter().enumerate() {
        let folder = dir.join(class);
        let mut n = 0;
        for entry in fs::read_dir(&folder).with_context(|| reading(&folder))? {
            let entry = entry.with_context(|| reading(&folder))?;
            n += counted(&entry.file_name().to_string_lossy()) as usize;
        }
        if n == 0 {
            bail!("{}: no images", folder.display());
        }
        files.extend((1..=n).map(|k| (folder.join(name(c, k)), c as i64)));
    }
    Ok((classes, files))
}

/// [`scan`] with one extension only (`ppm`: torchvision's
/// `make_dataset(dir, extensions=(".ppm",))`, GTSRB's and Imagenette's
/// readers), compared without regard to case; a class folder without such
/// a file is an error naming it.
pub fn scan_only(dir: &Path, extension: &str) -> Result<(Vec<String>, LabeledFiles)> {
    let (classes, files) = scan(dir)?;
    let dotted = format!(".{extension}");
    let name = |p: &PathBuf| {
        p.file_name()
            .map(|n| n.to_string_lossy().to_ascii_lowercase())
    };
    let files: LabeledFiles = (files.into_iter())
        .filter(|(p, _)| name(p).is_some_and(|n| n.ends_with(&dotted)))
        .collect();
    let empty: Vec<&str> = (classes.iter().enumerate())
        .filter(|&(c, _)| !files.iter().any(|f| f.1 == c as i64))
        .map(|(_, f)| f.as_str())
        .collect();
    if !empty.is_empty() {
        bail!(
            "{}: no {dotted} images in class folder(s) {}",
            dir.display(),
            empty.join(", ")
        );
    }
    Ok((classes, files))
}

/// The image files under `dir` (by [`EXTENSIONS`]) in `ImageFolder`'s
/// order: its folders (itself and every subfolder, links followed) sorted
/// by path as strings, each one's files sorted by name. Folders whose
/// names start with a dot are left out, and a folder reached again
/// through a link (a loop, or two links to one place) is read once. A
/// file that is not a regular file (a broken link, a FIFO) is listed, so
/// that reading it reports it.
pub fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::MetadataExt;
    let reading = |d: &Path| format!("reading {}", d.display());
    let mut seen = std::collections::HashSet::new();
    let mut folders = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let meta = fs::metadata(&d).with_context(|| reading(&d))?;
        if !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        let mut files = Vec::new();
        for entry in fs::read_dir(&d).with_context(|| reading(&d))? {
            let path = entry.with_context(|| reading(&d))?.path();
            let name = path.file_name().unwrap_or_default().as_bytes();
            if path.is_dir() {
                if !name.starts_with(b".") {
                    todo.push(path);
                }
            } else if is_image_name(name) {
                files.push(path);
            }
        }
        files.sort();
        folders.push((d, files));
    }
    folders.sort_by(|a, b| a.0.as_os_str().as_bytes().cmp(b.0.as_os_str().as_bytes()));
    Ok(folders.into_iter().flat_map(|(_, files)| files).collect())
}

/// Whether `dir` is laid out as ImageFolder reads it: subfolders (those
/// whose names start with a dot left out) and no images of its own.
pub fn is_class_layout(dir: &Path) -> Result<bool> {
    use std::os::unix::ffi::OsStrExt;
    let mut folders = false;
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry
            .with_context(|| format!("reading {}", dir.display()))?
            .path();
        let name = path.file_name().unwrap_or_default().as_bytes();
        if path.is_dir() {
            folders |= !name.starts_with(b".");
        } else if is_image_name(name) {
            return Ok(false);
        }
    }
    Ok(folders)
}

/// Whether a file name ends in one of [`EXTENSIONS`] (any case).
fn is_image_name(name: &[u8]) -> bool {
    let name = name.to_ascii_lowercase();
    EXTENSIONS.iter().any(|e| {
        name.len() > e.len()
            && name.ends_with(e.as_bytes())
            && name[name.len() - e.len() - 1] == b'.'
    })
}
