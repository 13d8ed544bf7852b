//! Reading a run's resume point: its state, its optimizer's and averages'
//! tensors, and the weights of the epoch it ended (kept in the
//! `last.safetensors` beside it).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use tch::Tensor;

use super::run_dir::{POINT_KEY, RunDir, STATE_KEY};
use super::state::TrainState;
use crate::formats::Sniffed;
use crate::formats::safetensors::read_safetensors;

/// Reads a resume point: `resume.safetensors` or the run directory holding
/// it; the weights of an epoch's end come from the `last.safetensors` beside
/// it (or the pending one a killed save left, then put in place).
pub fn read_resume(path: &Path) -> Result<(TrainState, BTreeMap<String, Tensor>)> {
    let file = if path.is_dir() {
        let run = RunDir {
            dir: path.to_path_buf(),
        };
        if let Some(left) = run.leftovers() {
            bail!(
                "{}: the run saved no resume point (it stopped before writing its first; it left {left}); start it over with --out {} --force, or --resume auto",
                path.display(),
                path.display()
            );
        }
        if !run.resume().exists() && run.last().is_file() {
            bail!(
                "{}: no resume point (resume.safetensors is gone); the weights of its last epoch are in {}: start a new run from them with --initial-checkpoint {}",
                path.display(),
                run.last().display(),
                run.last().display()
            );
        }
        run.resume()
    } else {
        path.to_path_buf()
    };
    // Another file of a run directory: point to the run.
    let beside = file
        .parent()
        .map(|d| (d, d.join("resume.safetensors")))
        .filter(|(_, r)| r.is_file() && *r != file);
    let sd = read_safetensors(&file).map_err(|e| {
        let what = Sniffed::of_file(&file);
        match &beside {
            Some((run, resume)) if what != Sniffed::Safetensors => anyhow!(
                "{}: not a resume checkpoint (it is {}); pass the run directory {} or its {}",
                file.display(),
                what.describe(),
                run.display(),
                resume.display()
            ),
            _ => e,
        }
    })?;
    let state = sd.metadata.get(STATE_KEY).ok_or_else(|| match &beside {
        Some((run, _)) => anyhow!(
            "{}: not a resume checkpoint (last/best.safetensors hold weights only); pass the run directory {}",
            file.display(),
            run.display()
        ),
        None => anyhow!(
            "{}: not a resume checkpoint (use the run's resume.safetensors; last/best.safetensors hold weights only)",
            file.display()
        ),
    })?;
    let state: TrainState = serde_json::from_str(state)
        .with_context(|| format!("{}: unreadable training state", file.display()))?;
    state
        .check()
        .with_context(|| format!("{}: bad training state", file.display()))?;
    let mut tensors = sd.tensors;
    if let Some(point) = &state.weights_in_last {
        let run = RunDir {
            dir: file.parent().map(Path::to_path_buf).unwrap_or_default(),
        };
        tensors.extend(weights_of_point(
            [run.last(), run.last_pending()],
            point,
            &file,
        )?);
        if state.config.model_ema.is_some() {
            let ema = weights_of_point([run.ema(), run.ema_pending()], point, &file)?;
            tensors.extend(
                ema.into_iter()
                    .map(|(k, v)| (format!("{}{k}", super::ema::PREFIX), v)),
            );
        }
    }
    Ok((state, tensors))
}

/// The weights of resume point `point` from `[file, pending]`: the file
/// if it is theirs, else the pending one a save killed before its rename
/// left (renamed into place now).
fn weights_of_point(
    [file, pending]: [PathBuf; 2],
    point: &str,
    resume: &Path,
) -> Result<BTreeMap<String, Tensor>> {
    for candidate in [&file, &pending] {
        if !candidate.exists() {
            continue;
        }
        let sd = read_safetensors(candidate)?;
        if sd.metadata.get(POINT_KEY).map(String::as_str) == Some(point) {
            if *candidate == pending {
                std::fs::rename(candidate, &file)
                    .with_context(|| format!("renaming {}", candidate.display()))?;
            }
            return Ok(sd.tensors);
        }
    }
    bail!(
        "{}: its weights are those of {} (resume point {point}), which is missing or holds other weights",
        resume.display(),
        file.display()
    )
}
