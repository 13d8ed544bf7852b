//! A run's output directory: `config.json`, `metrics.jsonl`, the
//! `last`/`best` checkpoints, the resume point and `curves.svg`, every file
//! written atomically; temporary files a killed run left are removed.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};
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
        if name.starts_with('.') && name.contains(".tmp-") {
            let _ = std::fs::remove_file(e.path());
        }
    }
}
