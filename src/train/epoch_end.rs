//! What a `Trainer` does between epochs and when it stops: evaluation (of
//! the weights and of their moving average), the epoch's record, the
//! resume point, the kept weight files, `metrics.jsonl`, `curves.svg`,
//! `confusion.svg` and the TensorBoard events.

use std::collections::HashMap;

use anyhow::{Context, Result};
use tch::Tensor;

use super::keep::Keep;
use super::run_dir::RunDir;
use super::state::{EmaMetrics, EpochMetrics, Partial, TrainState, stopped_early};
use super::{Observer, Trainer};
use super::{confusion, curves};
use crate::eval::{EvalGraph, EvalResult, evaluate};
use crate::formats::safetensors::write_safetensors;
use crate::formats::tfevents::EventWriter;
use crate::infer::Layerwise;
use crate::model::Vgg;
use crate::shim;

impl Trainer<'_> {
    /// What a resume point holds, gathered on every rank (the epoch's sums
    /// are taken across ranks); rank 0 gets it, the others None.
    fn resume_parts(&self) -> Result<Option<ResumeParts>> {
        let partial = self.global_partial()?;
        if !self.world.is_main() {
            return Ok(None);
        }
        let meta = self
            .state
            .meta(
                self.state.history.len(),
                self.state.history.last().map(|m| m.test_top1),
            )
            .to_metadata();
        let mut state = self.state.clone();
        state.partial = partial;
        state.optimizer_steps = self.opt.steps();
        state.ema_averaged = self.ema.as_ref().map(|e| e.n_averaged);
        state.swa_averaged = self.swa.as_ref().map(|s| s.n_averaged);
        if let Some(scaler) = self.opt.loss_scaler() {
            state.scaler = Some(scaler);
        }
        Ok(Some(ResumeParts {
            weights: self.model.state_dict(),
            optimizer: self.opt.state_tensors(),
            meta,
            state,
        }))
    }

    /// Writes the resume point inside an epoch (rank 0; every rank calls
    /// it): weights, optimizer state, the moving average and `TrainState`
    /// in one file, once the files of the epoch before are written.
    pub(super) fn save_resume(&mut self) -> Result<()> {
        self.writes.wait()?;
        let Some(parts) = self.resume_parts()? else {
            return Ok(());
        };
        let mut tensors = parts.weights;
        tensors.extend(parts.optimizer);
        if let Some(ema) = &self.ema {
            tensors.extend(ema.resume_tensors());
        }
        if let Some(swa) = &self.swa {
            tensors.extend(swa.resume_tensors());
        }
        self.run_dir.save_resume(&tensors, parts.meta, &parts.state)
    }

    /// An epoch's weight files (rank 0; every rank calls it): the weights
    /// into `last.safetensors` (the average into `ema.safetensors`), the
    /// rest of the resume point beside them (with `--swa-start`'s average),
    /// then the files `--keep` asks for, and at the run's end the weight
    /// average into `swa.safetensors`. Their values are taken now (copies of the live tensors); they
    /// are written on a thread of their own while the next epoch trains
    /// (the next write, and the end of the run, wait for them and report
    /// their failure).
    fn save_epoch_point(&mut self, best: bool) -> Result<()> {
        self.writes.wait()?;
        let Some(mut parts) = self.resume_parts()? else {
            return Ok(());
        };
        let mut ema = self.ema.as_ref().map(|e| e.model.state_dict());
        if let Some(swa) = &self.swa {
            parts.optimizer.extend(swa.resume_tensors());
        }
        let mut swa_out = self.swa_weights();
        // Copied off a GPU they are already the writer's own; on the CPU
        // they are the live tensors the next epoch changes.
        if self.model.device() == tch::Device::Cpu {
            let own = |v: &mut Vec<(String, Tensor)>| v.iter_mut().for_each(|(_, t)| *t = t.copy());
            own(&mut parts.weights);
            own(&mut parts.optimizer);
            ema.iter_mut().for_each(own);
            swa_out.iter_mut().for_each(|(t, _)| own(t));
        }
        let run = self.run_dir.clone();
        let keep = self.state.config.keep;
        let top1: Vec<f64> = self.state.history.iter().map(|m| m.test_top1).collect();
        self.writes.start(move || {
            let ResumeParts {
                weights,
                optimizer,
                meta,
                state,
            } = parts;
            run.save_epoch_point(&weights, ema.as_deref(), meta, &optimizer, &state)?;
            if let Some((swa, meta)) = swa_out {
                write_safetensors(&run.swa(), &swa, &meta)?;
            }
            keep_files(&run, keep, &top1, best)
        })
    }

    /// Evaluates `model` on the validation split with the run's numerics,
    /// every rank on its part, after making its running statistics rank
    /// 0's (as DDP broadcasts buffers: rank 0 saves those).
    pub(super) fn validate(
        &self,
        model: &Vgg,
        graph: Option<&mut EvalGraph>,
    ) -> Result<EvalResult> {
        let buffers = model.entries();
        self.world
            .broadcast_all(buffers.iter().filter(|e| !e.is_param).map(|e| e.tensor))?;
        let net = Layerwise {
            model,
            numerics: &self.numerics,
        };
        evaluate(
            &net,
            &self.state.config.model.classes.into(),
            &self.test,
            self.state.config.test_batch_size,
            &self.pre,
            graph,
            self.world,
        )
    }

    /// After an epoch's steps: evaluation, its record, the checkpoints, the
    /// metrics and the curves.
    pub(super) fn end_epoch(&mut self, obs: &mut dyn Observer) -> Result<EpochMetrics> {
        let epoch = self.state.epoch;
        obs.evaluating(self.test.len() as usize);
        let mut graph = self.eval_graph.take();
        let eval = self.validate(&self.model, graph.as_mut());
        self.eval_graph = graph;
        let eval = eval?;
        let ema = match self.ema.take() {
            Some(e) => {
                let mut graph = self.ema_eval_graph.take();
                let r = self.validate(&e.model, graph.as_mut());
                (self.ema, self.ema_eval_graph) = (Some(e), graph);
                let r = r?;
                Some(EmaMetrics {
                    loss: r.loss,
                    top1: r.top1,
                    top5: r.top5,
                })
            }
            None => None,
        };
        let p = self.global_partial()?;
        let m = EpochMetrics {
            epoch: epoch + 1,
            lr: self.state.lr_at(epoch),
            train_loss: p.mean_loss(),
            train_acc: p.accuracy(),
            test_loss: eval.loss,
            test_top1: eval.top1,
            test_top5: eval.top5,
            test_images: eval.images,
            ema,
            swa: None,
            images_per_s: p.images_per_s(),
            seconds: p.seconds,
            profile: self
                .state
                .config
                .profile
                .then(|| std::mem::take(&mut self.profile)),
            loss_scale: self.opt.loss_scaler().map(|s| s.scale),
            ran_as: self.ran_as(),
            peak_gpu_bytes: shim::peak_memory(self.model.device(), false)?,
        };
        self.state.history.push(m);
        let c = &self.state.config;
        let ends =
            epoch + 1 >= c.epochs || stopped_early(c.early_stop, &self.state.history).is_some();
        let swa = self.swa_after_epoch(epoch, ends)?;
        if let Some(start) = self.state.config.swa.map(|s| s.start)
            && ends
            && swa.is_none()
            && self.world.is_main()
        {
            obs.warn(&format!(
                "the run stopped at epoch {} before --swa-start {start}: nothing was averaged (no swa.safetensors)",
                epoch + 1
            ));
        }
        let m = self
            .state
            .history
            .last_mut()
            .context("an epoch was just recorded")?;
        m.swa = swa;
        let m = m.clone();
        self.state.epoch += 1;
        self.state.step = 0;
        self.state.partial = Partial::default();
        self.save_epoch(&m, &eval, obs)?;
        Ok(m)
    }

    /// The files of a finished epoch (rank 0): `last`, `best` when it is,
    /// the resume point, the metrics, the curves and the events.
    fn save_epoch(
        &mut self,
        m: &EpochMetrics,
        eval: &EvalResult,
        obs: &mut dyn Observer,
    ) -> Result<()> {
        let best = self.state.best_top1.is_none_or(|b| m.test_top1 > b);
        if best {
            self.state.best_top1 = Some(m.test_top1);
        }
        self.save_epoch_point(best)?;
        if !self.world.is_main() {
            return Ok(());
        }
        self.run_dir.write_metrics(&self.state.history)?;
        let curves = self.run_dir.curves();
        let c = &self.state.config;
        let title = format!(
            "{}: {} on {}",
            self.run_dir.dir.display(),
            c.model.model_name(),
            c.dataset
        );
        // Plots and events are conveniences; their failure must not end a run.
        if let Err(e) = curves::curves(&curves, &title, &self.state.history) {
            obs.warn(&format!("could not draw {}: {e:#}", curves.display()));
        }
        let picture = self.run_dir.confusion();
        let heading = format!(
            "{}: val confusion after epoch {} (top-1 {:.2}%)",
            self.run_dir.dir.display(),
            m.epoch,
            m.test_top1
        );
        let names = &self.state.class_names;
        if let Err(e) = confusion::write(&picture, &heading, names, &eval.confusion) {
            obs.warn(&format!("could not draw {}: {e:#}", picture.display()));
        }
        if c.tensorboard
            && let Err(e) = self.write_events(m)
        {
            obs.warn(&format!("could not write TensorBoard events: {e:#}"));
        }
        Ok(())
    }

    /// The epoch's figures as TensorBoard scalars at step `epoch` (the
    /// event file of this process is started by the first epoch it ends).
    fn write_events(&mut self, m: &EpochMetrics) -> Result<()> {
        if self.events.is_none() {
            self.events = Some(EventWriter::create(&self.run_dir.dir)?);
        }
        let events = self.events.as_ref().context("just created")?;
        let mut values = vec![
            ("loss/train", m.train_loss),
            ("loss/val", m.test_loss),
            ("accuracy/train", m.train_acc),
            ("accuracy/val_top1", m.test_top1),
            ("accuracy/val_top5", m.test_top5),
            ("lr", m.lr),
            ("images_per_s", m.images_per_s),
        ];
        if let Some(e) = &m.ema {
            values.extend([
                ("loss/val_ema", e.loss),
                ("accuracy/val_ema_top1", e.top1),
                ("accuracy/val_ema_top5", e.top5),
            ]);
        }
        if let Some(s) = &m.swa {
            values.extend([
                ("loss/val_swa", s.loss),
                ("accuracy/val_swa_top1", s.top1),
                ("accuracy/val_swa_top5", s.top5),
            ]);
        }
        events.scalars(m.epoch as i64, &values)
    }
}

/// What a resume point holds besides the moving average.
struct ResumeParts {
    weights: Vec<(String, Tensor)>,
    optimizer: Vec<(String, Tensor)>,
    meta: HashMap<String, String>,
    state: TrainState,
}

/// The weight files `--keep` asks for beside `last` (just written):
/// `best` when this epoch is, the epoch's own file when kept, and no
/// epoch file any more that the policy no longer keeps (`top1`: each
/// epoch's validation top-1 so far).
fn keep_files(run: &RunDir, keep: Keep, top1: &[f64], best: bool) -> Result<()> {
    if best && keep != Keep::Last {
        run.keep_last_as(&run.best())?;
    }
    let kept = keep.epoch_files(top1);
    if kept.contains(&top1.len()) {
        run.keep_last_as(&run.epoch_file(top1.len()))?;
    }
    for epoch in run.kept_epochs() {
        if !kept.contains(&epoch) {
            let path = run.epoch_file(epoch);
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    Ok(())
}
