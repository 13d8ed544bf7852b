//! A run's output directory: `config.json`, `metrics.jsonl`, the
//! `last`/`best` checkpoints, the resume point and `curves.svg`, every file
//! written atomically; temporary files a killed run left are removed.

use std::collections::HashMap;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use tch::Tensor;

use super::config::TrainConfig;
use super::state::{EpochMetrics, TrainState};
use crate::formats::safetensors::write_safetensors;
use crate::fsutil::write_atomic_bytes;

/// The metadata key of the resume state in `resume.safetensors`.
pub(super) const STATE_KEY: &str = "vggctl_train_state";
/// The metadata key in `last.safetensors` naming the resume point whose
/// weights it holds (the resume file then holds only the rest).
pub(super) const POINT_KEY: &str = "vggctl_resume_point";

/// The files a run writes into its output directory.
#[derive(Clone)]
pub struct RunDir {
    pub dir: PathBuf,
}

/// The current UTC time as `yyyymmdd-hhmmss`.
fn timestamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // UTC yyyymmdd-hhmmss without a date crate.
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Howard Hinnant's days-to-civil algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + (m <= 2) as i64, m, d)
}

impl RunDir {
    /// The directory name of a run without `--out` (under `runs/`):
    /// `<model>-<dataset>-<UTC time>`.
    pub fn default_name(model: &str, dataset: &str) -> String {
        format!("{model}-{dataset}-{}", timestamp())
    }

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
    pub fn confusion(&self) -> PathBuf {
        self.dir.join("confusion.svg")
    }
    /// `--profile`: the operators and kernels of a few steps.
    pub fn ops(&self) -> PathBuf {
        self.dir.join("ops.csv")
    }
    /// `--model-ema`: the moving average of the weights at the last epoch's end.
    pub fn ema(&self) -> PathBuf {
        self.dir.join("ema.safetensors")
    }
    pub(super) fn ema_pending(&self) -> PathBuf {
        self.dir.join("ema.pending.safetensors")
    }
    /// `--swa-start`: the weight average, its BatchNorm statistics
    /// recomputed, as the run's last epoch left it.
    pub fn swa(&self) -> PathBuf {
        self.dir.join("swa.safetensors")
    }
    /// TensorBoard's event files (`--tensorboard`), one per process.
    fn event_files(&self) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.starts_with("events.out.tfevents.") && name.ends_with(".vggctl")
            })
            .map(|e| e.path())
            .collect()
    }
    /// The next `last.safetensors` while the resume point that needs it is
    /// written (found there if a run was killed between the two renames).
    pub(super) fn last_pending(&self) -> PathBuf {
        self.dir.join("last.pending.safetensors")
    }
    /// The weights after `epoch` epochs (`--keep all` and `top-K`).
    pub fn epoch_file(&self, epoch: usize) -> PathBuf {
        self.dir.join(format!("epoch-{epoch:03}.safetensors"))
    }

    /// The epochs whose `epoch-NNN.safetensors` the directory holds.
    pub fn kept_epochs(&self) -> Vec<usize> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut epochs: Vec<usize> = entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_prefix("epoch-")?
                    .strip_suffix(".safetensors")?
                    .parse()
                    .ok()
            })
            .collect();
        epochs.sort_unstable();
        epochs
    }

    /// The files that make the directory a run's (what `--force` replaces).
    fn run_files(&self) -> Vec<PathBuf> {
        let mut files = vec![
            self.config(),
            self.metrics(),
            self.last(),
            self.last_pending(),
            self.best(),
            self.resume(),
            self.curves(),
            self.confusion(),
            self.ema(),
            self.ema_pending(),
            self.swa(),
        ];
        files.extend(self.kept_epochs().into_iter().map(|e| self.epoch_file(e)));
        files.extend(self.event_files());
        files
    }

    /// The run files the directory holds.
    fn held(&self) -> Vec<PathBuf> {
        self.run_files()
            .into_iter()
            .filter(|p| p.exists())
            .collect()
    }

    /// What a run that saved no resume point left here (it stopped before
    /// the end of its first epoch, by a crash or a lost rank), by name:
    /// nothing of it can be continued. None where there is a resume point,
    /// weights (a finished run whose resume point was deleted keeps them)
    /// or no run.
    pub fn leftovers(&self) -> Option<String> {
        let mut weights = vec![self.resume(), self.last(), self.best(), self.ema()];
        weights.extend(self.kept_epochs().into_iter().map(|e| self.epoch_file(e)));
        let held = self.held();
        (!weights.iter().any(|w| w.exists()) && !held.is_empty()).then(|| file_names(&held))
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
        if dir.exists() && !dir.is_dir() {
            bail!(
                "{}: a file, not a directory (--out names the run's directory)",
                dir.display()
            );
        }
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
        // Every file the run writes is one it may replace: a directory or
        // a link in its place is named now, not when the first epoch ends.
        for p in self.run_files() {
            crate::fsutil::check_replaceable(&p)?;
        }
        let held = self.held();
        if fresh && !held.is_empty() {
            if !force && self.leftovers().is_some() {
                bail!(
                    "{} already holds a run that saved no resume point ({}); pass --force (or --resume auto) to start over there",
                    dir.display(),
                    file_names(&held)
                );
            }
            if !force {
                bail!(
                    "{} already holds a run ({}); continue it with --resume {}, or pass --force to start over there",
                    dir.display(),
                    file_names(&held),
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

    /// A resume point inside an epoch (Ctrl-C, SIGTERM): weights, optimizer
    /// state and `state`, in one file.
    pub fn save_resume(
        &self,
        tensors: &[(String, Tensor)],
        mut meta: HashMap<String, String>,
        state: &TrainState,
    ) -> Result<()> {
        meta.insert(STATE_KEY.into(), serde_json::to_string(state)?);
        write_safetensors(&self.resume(), tensors, &meta)
    }

    /// An epoch's end: the weights into `last.safetensors` (their moving
    /// average, if any, into `ema.safetensors`) and a resume point beside
    /// them that holds only what they do not (the optimizer state and
    /// `state`), so no weights are stored twice. Safe against a kill at any
    /// moment: the weights are written under pending names first, then the
    /// resume point naming them, then renamed into place; [`read_resume`]
    /// finds them under either name.
    pub fn save_epoch_point(
        &self,
        weights: &[(String, Tensor)],
        ema: Option<&[(String, Tensor)]>,
        meta: HashMap<String, String>,
        optimizer: &[(String, Tensor)],
        state: &TrainState,
    ) -> Result<()> {
        let point = state.point_id();
        let mut file_meta = meta.clone();
        file_meta.insert(POINT_KEY.into(), point.clone());
        write_safetensors(&self.last_pending(), weights, &file_meta)?;
        if let Some(ema) = ema {
            write_safetensors(&self.ema_pending(), ema, &file_meta)?;
        }
        let mut state = state.clone();
        state.weights_in_last = Some(point);
        self.save_resume(optimizer, meta, &state)?;
        let mut renames = vec![(self.last_pending(), self.last())];
        if ema.is_some() {
            renames.push((self.ema_pending(), self.ema()));
        }
        for (from, to) in renames {
            std::fs::rename(&from, to).with_context(|| format!("renaming {}", from.display()))?;
        }
        Ok(())
    }

    /// `last.safetensors` also as `target` (best, an epoch's file): a hard
    /// link, so the copy costs no disk until `last` is replaced, or a copy
    /// where the file system has no links. Atomic either way.
    pub fn keep_last_as(&self, target: &Path) -> Result<()> {
        let tmp = crate::fsutil::temp_name(target);
        if std::fs::hard_link(self.last(), &tmp).is_err() {
            std::fs::copy(self.last(), &tmp).with_context(|| {
                format!("copying {} to {}", self.last().display(), tmp.display())
            })?;
        }
        std::fs::rename(&tmp, target).with_context(|| format!("writing {}", target.display()))
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

/// The file names of `paths`, comma-separated.
fn file_names(paths: &[PathBuf]) -> String {
    let names: Vec<String> = paths
        .iter()
        .filter_map(|p| p.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .collect();
    names.join(", ")
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

/// Files written on a thread of their own while training goes on (an
/// epoch's checkpoints): one job at a time, each start waiting for the job
/// before; a job's failure is the error of the wait that ends it. Dropping
/// it waits too, so no job outlives the run.
#[derive(Default)]
pub struct Background {
    job: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Background {
    /// Waits for the job in progress, then starts `job`.
    pub fn start(&mut self, job: impl FnOnce() -> Result<()> + Send + 'static) -> Result<()> {
        self.wait()?;
        let handle = std::thread::Builder::new()
            .name("vggctl-writer".into())
            .spawn(job)
            .context("starting the thread that writes the epoch's files")?;
        self.job = Some(handle);
        Ok(())
    }

    /// Waits for the job in progress, if any: its outcome.
    pub fn wait(&mut self) -> Result<()> {
        match self.job.take() {
            Some(job) => job
                .join()
                .map_err(|_| anyhow!("writing the epoch's files failed unexpectedly"))?,
            None => Ok(()),
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Jobs run one at a time in order; a failed job's error is what the
    /// next start (or wait) returns, and the job after it then runs; a
    /// panicking job is an error, not a crash; dropping waits.
    #[test]
    fn background_jobs_run_in_turn_and_report_their_failure() {
        let done = Arc::new(AtomicUsize::new(0));
        let mut writes = Background::default();
        let d = done.clone();
        writes
            .start(move || {
                std::thread::sleep(std::time::Duration::from_millis(50));
                d.fetch_add(1, Ordering::SeqCst);
                bail!("disk full")
            })
            .unwrap();
        let err = writes.start(|| Ok(())).unwrap_err();
        assert_eq!(format!("{err:#}"), "disk full");
        assert_eq!(done.load(Ordering::SeqCst), 1, "the start did not wait");
        writes.start(|| Ok(())).unwrap();
        writes.wait().unwrap();
        writes.start(|| panic!("a bug")).unwrap();
        assert!(writes.wait().is_err());
        let d = done.clone();
        writes
            .start(move || {
                std::thread::sleep(std::time::Duration::from_millis(50));
                d.fetch_add(1, Ordering::SeqCst);
                Ok(())
            })
            .unwrap();
        drop(writes);
        assert_eq!(done.load(Ordering::SeqCst), 2, "the drop did not wait");
    }
}
