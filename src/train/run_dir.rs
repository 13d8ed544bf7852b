//! A run's output directory: `config.json`, `metrics.jsonl`, the
//! `last`/`best` checkpoints, the resume point and `curves.svg`, every file
//! written atomically; temporary files a killed run left are removed.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use tch::Tensor;

use super::config::TrainConfig;
use super::state::{EpochMetrics, TrainState};
use crate::formats::safetensors::{read_safetensors, write_safetensors};
use crate::fsutil::write_atomic_bytes;

/// The metadata key of the resume state in `resume.safetensors`.
const STATE_KEY: &str = "vggctl_train_state";

/// The files a run writes into its output directory.
pub struct RunDir {
    pub dir: PathBuf,
}

impl RunDir {
    pub fn config(&self) -> PathBuf {
        self.dir.join("config.json")
    }
    pub fn metrics(&self) -> PathBuf {
        self.dir.join("metrics.jsonl")
    }
    pub fn last(&self) -> PathBuf {
        self.dir.join("last.safetensors")
    }
    pub fn best(&self) -> PathBuf {
        self.dir.join("best.safetensors")
    }
    pub fn resume(&self) -> PathBuf {
        self.dir.join("resume.safetensors")
    }
    pub fn curves(&self) -> PathBuf {
        self.dir.join("curves.svg")
    }

    /// The files that make the directory a run's (what `--force` replaces).
    fn run_files(&self) -> [PathBuf; 6] {
        [
            self.config(),
            self.metrics(),
            self.last(),
            self.best(),
            self.resume(),
            self.curves(),
        ]
    }

    /// Creates the directory and locks it for this process's life (the
    /// lock is the returned file; the kernel drops it when the process
    /// ends, however it ends). A directory another run holds is refused
    /// with that run's PID. A `fresh` run refuses a directory that holds a
    /// run already, unless `force`, which removes that run's files first.
    pub fn claim(&self, fresh: bool, force: bool) -> Result<RunLock> {
        let dir = &self.dir;
        // The directories this claim creates, deepest first.
        let made: Vec<PathBuf> = dir
            .ancestors()
            .take_while(|d| !d.as_os_str().is_empty() && !d.exists())
            .map(PathBuf::from)
            .collect();
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(".lock");
        crate::fsutil::check_replaceable(&path)?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                bail!(
                    "{} is in use by another training run (PID {}); wait for it to end or choose another --out",
                    dir.display(),
                    pid.trim()
                );
            }
            Err(TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking {}", path.display()));
            }
        }
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| write!(file, "{}", std::process::id()))
            .with_context(|| format!("writing {}", path.display()))?;
        let held: Vec<PathBuf> = self
            .run_files()
            .into_iter()
            .filter(|p| p.exists())
            .collect();
        if fresh && !held.is_empty() {
            if !force {
                let names: Vec<String> = held
                    .iter()
                    .filter_map(|p| p.file_name())
                    .map(|n| n.to_string_lossy().into_owned())
                    .collect();
                bail!(
                    "{} already holds a run ({}); continue it with --resume {}, or pass --force to start over there",
                    dir.display(),
                    names.join(", "),
                    dir.display()
                );
            }
            for p in held {
                std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
            }
        }
        Ok(RunLock { _file: file, made })
    }

    /// Creates the directory, clears what a killed run left mid-write, and
    /// writes `config.json`.
    pub fn start(&self, config: &TrainConfig) -> Result<()> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        remove_stale_temp_files(&self.dir);
        write_atomic_bytes(
            &self.config(),
            serde_json::to_string_pretty(config)?.as_bytes(),
        )
    }

    /// `metrics.jsonl`: one line per finished epoch.
    pub fn write_metrics(&self, history: &[EpochMetrics]) -> Result<()> {
        let mut text = String::new();
        for m in history {
            text += &serde_json::to_string(m)?;
            text.push('\n');
        }
        write_atomic_bytes(&self.metrics(), text.as_bytes())
    }

    /// The resume point: weights, optimizer state and `state`, in one file.
    pub fn save_resume(
        &self,
        tensors: &[(String, Tensor)],
        mut meta: HashMap<String, String>,
        state: &TrainState,
    ) -> Result<()> {
        meta.insert(STATE_KEY.into(), serde_json::to_string(state)?);
        write_safetensors(&self.resume(), tensors, &meta)
    }
}

/// The configuration of the run that wrote `checkpoint`, if the file sits
/// in its run directory (`config.json` beside it, readable and vggctl's).
pub fn config_beside(checkpoint: &Path) -> Option<TrainConfig> {
    let config = checkpoint.parent()?.join("config.json");
    let bytes = crate::fsutil::read_regular(&config, "a run configuration", 1 << 20).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// A run directory's lock, held while this lives. A directory the claim
/// created is removed again if the run never wrote into it (its data
/// failed to load, say): nothing half-made is left behind.
pub struct RunLock {
    _file: File,
    made: Vec<PathBuf>,
}

impl Drop for RunLock {
    fn drop(&mut self) {
        let Some(dir) = self.made.first() else { return };
        let only_lock = std::fs::read_dir(dir)
            .map(|d| d.flatten().all(|e| e.file_name() == ".lock"))
            .unwrap_or(false);
        if only_lock {
            let _ = std::fs::remove_file(dir.join(".lock"));
            // remove_dir removes only empty directories.
            for d in &self.made {
                let _ = std::fs::remove_dir(d);
            }
        }
    }
}

/// Reads a resume point: `resume.safetensors` or the run directory holding it.
pub fn read_resume(path: &Path) -> Result<(TrainState, BTreeMap<String, Tensor>)> {
    let file = if path.is_dir() {
        path.join("resume.safetensors")
    } else {
        path.to_path_buf()
    };
    let sd = read_safetensors(&file)?;
    let state = sd.metadata.get(STATE_KEY).ok_or_else(|| {
        anyhow!(
            "{}: not a resume checkpoint (use the run's resume.safetensors; last/best.safetensors hold weights only)",
            file.display()
        )
    })?;
    let state: TrainState = serde_json::from_str(state)
        .with_context(|| format!("{}: unreadable training state", file.display()))?;
    state
        .check()
        .with_context(|| format!("{}: bad training state", file.display()))?;
    Ok((state, sd.tensors))
}

/// Removes temporary files that a killed run left mid-write (their
/// checkpoints were never renamed into place, so nothing refers to them).
fn remove_stale_temp_files(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if crate::fsutil::is_temp_name(&name) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}
