//! torchvision's published ImageNet weights: which file each model uses, where
//! a user already has it, and the verified download when they do not.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::data::download::{Checksum, download};
use crate::model::Arch;

pub const BASE_URL: &str = "https://download.pytorch.org/models";

/// torchvision's file name for a model; its 8 hex digits are the start of
/// the file's SHA-256.
pub fn file_name(arch: Arch, bn: bool) -> &'static str {
    match (arch, bn) {
        (Arch::Vgg11, false) => "vgg11-8a719046.pth",
        (Arch::Vgg11, true) => "vgg11_bn-6002323d.pth",
        (Arch::Vgg13, false) => "vgg13-19584684.pth",
        (Arch::Vgg13, true) => "vgg13_bn-abd245e5.pth",
        (Arch::Vgg16, false) => "vgg16-397923af.pth",
        (Arch::Vgg16, true) => "vgg16_bn-6c64b313.pth",
        (Arch::Vgg19, false) => "vgg19-dcbb9e9d.pth",
        (Arch::Vgg19, true) => "vgg19_bn-c79401a0.pth",
    }
}

/// The hash prefix in a torchvision file name (`vgg16-397923af.pth` -> `397923af`).
pub fn hash_prefix(name: &str) -> Option<&str> {
    let stem = name.strip_suffix(".pth")?;
    let (_, h) = stem.rsplit_once('-')?;
    (h.len() >= 8 && h.chars().all(|c| c.is_ascii_hexdigit())).then_some(h)
}

/// `$TORCH_HOME/hub/checkpoints`, as torch.hub computes it.
pub fn torch_hub_dir() -> Option<PathBuf> {
    let home = match std::env::var_os("TORCH_HOME") {
        Some(h) => PathBuf::from(h),
        None => crate::fsutil::user_cache_dir()?.join("torch"),
    };
    Some(home.join("hub").join("checkpoints"))
}

/// Folders searched before the hub cache: `$VGGCTL_WEIGHTS_DIR`, `./weights`,
/// and the repository's `weights/` next to the built binary.
pub fn local_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("VGGCTL_WEIGHTS_DIR") {
        dirs.push(PathBuf::from(d));
    }
    dirs.push(PathBuf::from("weights"));
    if let Ok(exe) = std::env::current_exe()
        && let Some(repo) = exe.parent().and_then(Path::parent).and_then(Path::parent)
    {
        dirs.push(repo.join("weights"));
    }
    dirs
}

/// The first of `dirs` that holds `name`.
pub fn find_local(name: &str, dirs: &[PathBuf]) -> Option<PathBuf> {
    dirs.iter().map(|d| d.join(name)).find(|p| p.is_file())
}

/// Downloads `base_url/name` into `dir/name` through a `.part` file and keeps
/// it only if its SHA-256 starts with the hash prefix in the name.
pub fn fetch(
    base_url: &str,
    name: &str,
    dir: &Path,
    progress: &mut dyn FnMut(u64, Option<u64>),
) -> Result<PathBuf> {
    let url = format!("{}/{name}", base_url.trim_end_matches('/'));
    let Some(prefix) = hash_prefix(name) else {
        bail!("{name} carries no hash prefix to verify a download against");
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dest = dir.join(name);
    download(
        &url,
        &dest,
        &Checksum::Sha256Prefix(prefix.to_string()),
        progress,
    )?;
    Ok(dest)
}

/// Finds torchvision's ImageNet weights for a model (`./weights/`, then the
/// torch hub cache), downloading them into the hub cache when they are
/// nowhere on disk and `allow_download` is set.
pub fn resolve_imagenet(
    arch: Arch,
    bn: bool,
    allow_download: bool,
    progress: &mut dyn FnMut(u64, Option<u64>),
) -> Result<PathBuf> {
    let name = file_name(arch, bn);
    let hub = torch_hub_dir();
    let mut dirs = local_dirs();
    dirs.extend(hub.clone());
    if let Some(p) = find_local(name, &dirs) {
        return Ok(p);
    }
    let Some(hub) = hub else {
        bail!(
            "{name} not found in ./weights/ and there is no home directory for the torch hub cache; put the file into ./weights/"
        );
    };
    let where_ = format!("put {name} into ./weights/ or {}/", hub.display());
    if !allow_download {
        bail!("{name} not found and downloading is off; {where_}");
    }
    let base = std::env::var("VGGCTL_WEIGHTS_URL").unwrap_or_else(|_| BASE_URL.to_string());
    fetch(&base, name, &hub, progress)
        .with_context(|| format!("could not download {name} from {base}; {where_}"))
}

/// What `--weights` names: `imagenet` (torchvision's file for the model,
/// found or downloaded as [`resolve_imagenet`] does), or a file path.
pub fn weights_file(
    weights: &str,
    arch: Arch,
    bn: bool,
    progress: &mut dyn FnMut(u64, Option<u64>),
) -> Result<PathBuf> {
    if weights == "imagenet" {
        resolve_imagenet(arch, bn, true, progress)
    } else {
        Ok(PathBuf::from(weights))
    }
}
