//! The training loop (`Trainer`: `train_one_epoch`, `fit`): the CIFAR recipe
//! on a device-resident dataset, with checkpoints that resume exactly.
//! - `config`: the options and the LR schedule; `state`: epoch records and
//!   the resume state; `run_dir`: the files of a run;
//! - `step`: the forward-loss-accuracy computation both steps share;
//!   `graphed`: the CUDA-graph step; `profile`: `--profile`'s timings;
//!   `curves`: `curves.svg`; `confusion`: `confusion.svg`; `ema`: `--model-ema`'s average;
//!   `swa`: `--swa-start`'s average and its schedule;
//!   `epoch_end`: evaluation and the files of each finished epoch;
//! - `start`: a fresh or resumed start (the state, the ranks made alike,
//!   the preprocessing, the optimizer and the averages); `feed`: an
//!   epoch's batches, and the seed of each position (`position_seed`).
//!
//! Exact resume comes from the randomness being a function of the position:
//! each epoch's permutation is drawn after seeding with (seed, epoch), and
//! each step's augmentation and dropout after seeding with (seed, epoch, step).
//! A run restarted at any step therefore draws exactly what the uninterrupted
//! run drew.

pub mod config;
pub mod confusion;
pub mod curves;
pub mod cyclic;
pub mod ema;
mod epoch_end;
mod feed;
pub mod graphed;
pub mod keep;
mod lr;
pub mod onecycle;
pub mod profile;
mod resume_file;
pub mod run_dir;
pub mod schedule;
pub mod start;
pub mod state;
pub mod step;
pub mod swa;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Result, bail};
use tch::{Device, Kind, Tensor};

use crate::Interrupted;
use crate::data::augment::Preprocess;
use crate::data::mix::random_erase;
use crate::data::{Dataset, Images};
use crate::dist::World;
use crate::eval::EvalGraph;
use crate::formats::tfevents::EventWriter;
use crate::model::Vgg;
use crate::numerics::{Numerics, Precision};
use crate::optim::{Gradients, LossScaler, Optimizer};
use crate::shim;
use config::TrainConfig;
use ema::Ema;
use feed::{Feed, PERMUTATION_STEP, position_seed};
use graphed::{GraphedStep, StepParts, graphs};
use keep::Keep;
use profile::{OpsRecorder, StepProfile, StepTimer};
use start::{averages, build_optimizer, fuse_step, join_world, preprocess, start_state};
use state::{EpochMetrics, Partial, TrainState, TrainSummary};
use step::{Forward, forward_loss};
use swa::Swa;

pub use config::SchedulerKind;
pub use resume_file::read_resume;
use run_dir::Background;
pub use run_dir::RunDir;
pub use start::Resume;

/// Hooks for whoever shows progress and warnings (the CLI's bars and lines).
pub trait Observer {
    fn epoch_start(&mut self, _epoch: usize, _epochs: usize, _steps: usize, _done: usize) {}
    fn progress(&mut self, _step: usize, _loss: f64, _acc: f64, _images_per_s: f64) {}
    /// The epoch's steps are done; its evaluation on `_images` test images starts.
    fn evaluating(&mut self, _images: usize) {}
    fn epoch_end(&mut self, _m: &EpochMetrics) {}
    /// Something the user should know that does not stop the run.
    fn warn(&mut self, _message: &str) {}
}

/// Everything a training run holds.
pub struct Trainer<'a> {
    pub state: TrainState,
    pub model: Vgg,
    numerics: Numerics,
    opt: Optimizer,
    train: Images,
    test: Images,
    pre: Preprocess,
    graph: Option<GraphedStep>,
    eval_graph: Option<EvalGraph>,
    /// `--model-ema`: the moving average of the weights, and its own
    /// evaluation graph (CUDA graphs).
    ema: Option<Ema>,
    ema_eval_graph: Option<EvalGraph>,
    /// `--swa-start`: the equal average of the epochs' weights.
    swa: Option<Swa>,
    /// Gradient accumulation: the gradients of the batches so far of the
    /// optimizer step under way.
    accumulated: Option<Gradients>,
    /// `--tensorboard`: this process's event file, from the first epoch it ends.
    events: Option<EventWriter>,
    profile: StepProfile,
    /// `--profile`'s operators and kernels of a few warm steps (ops.csv).
    ops: OpsRecorder,
    run_dir: RunDir,
    /// The last epoch's files, being written while the next one trains.
    writes: Background,
    stop: &'a AtomicBool,
    /// The ranks of a data-parallel run (a world of one otherwise).
    world: &'a World,
}

impl<'a> Trainer<'a> {
    /// A new run (`resume` None) or the continuation of a saved one, in the
    /// numerics decided for it.
    pub fn new(
        config: TrainConfig,
        data: &Dataset,
        mut model: Vgg,
        resume: Option<Resume>,
        mut numerics: Numerics,
        stop: &'a AtomicBool,
        world: &'a World,
    ) -> Result<Self> {
        let device = model.device();
        let train = data.train.to_device(device);
        let test = data.test.to_device(device);
        if train.is_empty() || test.is_empty() {
            bail!(
                "{}: the training and test splits must both hold images",
                data.source
            );
        }
        let pre = preprocess(&config, data, device);
        let run_dir = RunDir {
            dir: config.out.clone(),
        };
        model.freeze_features(config.freeze_prefix);
        model.set_dropout(config.dropout);
        model.set_bn_momentum(config.bn_momentum);
        let (mut state, resume_tensors) = start_state(config, data, &mut model, resume, &run_dir)?;
        if world.sampler(state.config.ra_reps).len(train.len()) == 0 {
            bail!(
                "--ra-sampler: {} training images over {} ranks leave none to a rank (an epoch keeps floor(N/256)*256/ranks each); use fewer ranks or leave out --ra-sampler",
                train.len(),
                world.size
            );
        }
        join_world(
            world,
            &mut model,
            &mut state,
            &mut numerics,
            [train.len(), test.len()],
        )?;
        fuse_step(&mut model, &mut numerics);
        let mut opt = build_optimizer(&mut model, &numerics, &state.config);
        let (graph, eval_graph, ema_eval_graph) = graphs(&numerics, &state.config, device)?;
        let (ema, swa) = averages(&state, &model, &mut opt, resume_tensors)?;
        if numerics.precision == Precision::Fp16 {
            opt.enable_loss_scaling(state.scaler.get_or_insert_with(LossScaler::default));
        }
        Ok(Trainer {
            ops: OpsRecorder::new(state.config.profile && world.is_main(), device),
            state,
            model,
            numerics,
            opt,
            train,
            test,
            pre,
            graph,
            eval_graph,
            ema,
            ema_eval_graph,
            swa,
            accumulated: None,
            events: None,
            profile: StepProfile::default(),
            run_dir,
            writes: Background::default(),
            stop,
            world,
        })
    }

    /// The epoch's sums so far over all ranks (the slowest rank's time).
    fn global_partial(&self) -> Result<Partial> {
        let p = &self.state.partial;
        let mut sums = [p.loss_sum, p.correct as f64, p.seen as f64];
        self.world.sum_f64(&mut sums)?;
        let mut time = [p.seconds];
        if self.world.size > 1 {
            let t = Tensor::from_slice(&time);
            self.world.max(&t)?;
            time[0] = t.double_value(&[0]);
        }
        Ok(Partial {
            loss_sum: sums[0],
            correct: sums[1].round() as i64,
            seen: sums[2].round() as i64,
            seconds: time[0],
        })
    }

    /// Trains until `config.epochs`, or until Ctrl-C (then `Interrupted`).
    pub fn fit(&mut self, obs: &mut dyn Observer) -> Result<TrainSummary> {
        if self.world.is_main() {
            self.run_dir.start(&self.state.config)?;
        }
        let device = self.model.device();
        let mut stopped_early = None;
        while self.state.epoch < self.state.config.epochs {
            shim::peak_memory(device, true)?;
            self.train_one_epoch(obs)?;
            let m = self.end_epoch(obs)?;
            obs.epoch_end(&m);
            // Every rank decides alike: the metrics are global.
            stopped_early = state::stopped_early(self.state.config.early_stop, &self.state.history);
            if stopped_early.is_some() {
                break;
            }
        }
        self.writes.wait()?;
        Ok(TrainSummary {
            out: self.run_dir.dir.clone(),
            epochs: self.state.history.len(),
            final_metrics: self.state.history.last().cloned(),
            best_top1: self.state.best_top1,
            last: self.run_dir.last(),
            best: (self.state.config.keep != Keep::Last).then(|| self.run_dir.best()),
            stopped_early,
            swa: self.swa_file(),
        })
    }

    fn train_one_epoch(&mut self, obs: &mut dyn Observer) -> Result<()> {
        let cfg = self.state.config.clone();
        let epoch = self.state.epoch;
        let b = cfg.batch_size;
        let dev = self.model.device();
        // Streamed images are picked on the host.
        let perm_dev = match self.train.is_streamed() {
            true => Device::Cpu,
            false => dev,
        };
        tch::manual_seed(position_seed(cfg.seed, epoch, PERMUTATION_STEP));
        // Every rank draws the same order and takes its own part of it.
        let order = Tensor::randperm(self.train.len(), (Kind::Int64, perm_dev));
        let perm = self.world.sampler(cfg.ra_reps).shard(&order);
        let seed = self.world.seed_for(cfg.seed);
        let mut feed = Feed::new(
            &self.train,
            perm,
            b,
            (seed, epoch, self.state.step),
            &self.pre,
        )?;
        let steps = feed.steps();
        obs.epoch_start(epoch + 1, cfg.epochs, steps, self.state.step);

        // Losses and correct counts stay on the device and are read every
        // few steps: a read is a host-device synchronization.
        let report_every = if dev == Device::Cpu { 1 } else { 25 };
        let mut pending: Vec<Pending> = Vec::new();
        let mut clock = Instant::now();
        let k = cfg.accum_steps.max(1);
        // Ranks agree on a stop through a collective, on a GPU a wait for
        // the step before: there, every `report_every` steps only.
        let agree_every = match self.world.has_group() {
            true => k * report_every,
            false => k,
        };
        while self.state.step < steps {
            let step = self.state.step;
            // Gradient accumulation stops only between optimizer steps, so
            // a resume point never holds half-summed gradients.
            self.stop_if_asked(epoch, step, agree_every)?;
            feed.prefetch(step);
            tch::manual_seed(position_seed(seed, epoch, step));
            let updates = (step + 1).is_multiple_of(k) || step + 1 == steps;
            let (loss, correct, len) = self.step(&mut feed, step, updates)?;
            if updates && let Some(ema) = &mut self.ema {
                ema.after_step(&self.model, epoch, step / k, cfg.warmup_epochs);
            }
            self.profile.steps += 1;
            pending.push(Pending {
                step,
                loss,
                correct,
                len,
            });
            self.state.step += 1;
            if pending.len() >= report_every || self.state.step == steps {
                self.flush(&mut pending, epoch, &mut clock)?;
                let p = &self.state.partial;
                obs.progress(
                    self.state.step,
                    p.mean_loss(),
                    p.accuracy(),
                    p.images_per_s(),
                );
            }
        }
        self.ops.finish(&self.run_dir.ops())?;
        if !feed.skipped.is_empty() {
            obs.warn(&skipped_message(&feed.skipped, epoch));
        }
        if let Some(why) = self.model.features.take_fusion_failure() {
            obs.warn(&format!(
                "the fused step's {why}; those layers run the plain ops from then on"
            ));
        }
        Ok(())
    }

    /// Where `step` is a multiple of `every`: if any rank was asked to stop,
    /// saves the resume point and stops with [`Interrupted`].
    fn stop_if_asked(&mut self, epoch: usize, step: usize, every: usize) -> Result<()> {
        if !step.is_multiple_of(every) || !self.world.any(self.stop.load(Ordering::SeqCst))? {
            return Ok(());
        }
        self.save_resume()?;
        Err(Interrupted(format!(
            "interrupted at epoch {}, step {step}; resume with --resume {}",
            epoch + 1,
            self.run_dir.resume().display()
        ))
        .into())
    }

    /// One step on `step`'s batch (random erasing and mixing after the
    /// transform, as torchvision's reference does them): through the CUDA
    /// graph when there is one, the batch is full and every batch is an
    /// optimizer step, else eagerly; the optimizer updates when `updates`
    /// (the last batch of an accumulation). Returns the loss, the correct
    /// count (on the device) and the batch's size.
    fn step(
        &mut self,
        feed: &mut Feed,
        step: usize,
        updates: bool,
    ) -> Result<(Tensor, Tensor, i64)> {
        let cfg = &self.state.config;
        let (lr, momentum) = self.state.update_hypers(step / cfg.accum_steps.max(1));
        if let Some(m) = momentum {
            self.opt.set_cycled_momentum(m);
        }
        let dev = self.model.device();
        let warm = self.graph.as_ref().is_none_or(|g| g.warmed_up());
        self.ops.before_step(warm)?;
        let timer = StepTimer::start(cfg.profile, dev);
        let (x, labels) = feed.batch(&self.train, step, &self.pre, dev)?;
        let len = labels.size()[0];
        let full = len == cfg.batch_size;
        let x = random_erase(&x, cfg.random_erase);
        let (x, y) = cfg.mixing.apply(&x, &labels, cfg.model.classes);
        let timer = timer.lap(&mut self.profile.data);
        let whole_steps = cfg.accum_steps <= 1;
        let (loss, correct) = match self.graph.take() {
            Some(mut g) if full && whole_steps => {
                let out = if g.warming_up() {
                    g.eager(|| self.eager_step(&x, &y, lr, None, true))
                } else {
                    let parts = StepParts {
                        model: &self.model,
                        numerics: &self.numerics,
                        opt: &mut self.opt,
                        label_smoothing: self.state.config.label_smoothing,
                        world: self.world,
                    };
                    g.step(parts, &x, &y, lr)
                };
                self.graph = Some(g);
                let out = out?;
                timer.lap(&mut self.profile.graphed);
                self.profile.graphed_steps += 1;
                out
            }
            g => {
                // The last, partial batch runs eagerly.
                self.graph = g;
                self.eager_step(&x, &y, lr, Some(timer), updates)?
            }
        };
        self.ops.after_step(&self.run_dir.ops())?;
        Ok((loss, correct, len))
    }

    /// One training step, op by op: forward, loss, backward and, when
    /// `updates`, the update (else the gradients add up for a later one;
    /// with accumulation each batch's loss counts 1/accum_steps). Returns
    /// the loss and the number of correct predictions (on the device).
    fn eager_step(
        &mut self,
        x: &Tensor,
        y: &Tensor,
        lr: f64,
        timer: Option<StepTimer>,
        updates: bool,
    ) -> Result<(Tensor, Tensor)> {
        let Forward { loss, correct } = forward_loss(
            &self.model,
            &self.numerics,
            x,
            y,
            self.state.config.label_smoothing,
        );
        // SyncBatchNorm's collectives report a failure here, before backward.
        self.world.check()?;
        let timer = timer.map(|t| t.lap(&mut self.profile.forward));
        let k = self.state.config.accum_steps.max(1);
        let share = match k {
            1 => loss.shallow_clone(),
            _ => &loss / k as f64,
        };
        let grads = self.opt.backward_adding(&share, self.accumulated.take());
        if !updates {
            self.accumulated = Some(grads);
            if let Some(t) = timer {
                t.lap(&mut self.profile.backward);
            }
            return Ok((loss.detach(), correct));
        }
        self.opt.prepare(lr);
        let world = self.world;
        self.opt.reduce_gradients(&grads, |g| world.average(g))?;
        let timer = timer.map(|t| t.lap(&mut self.profile.backward));
        self.opt.update(grads)?;
        if let Some(t) = timer {
            t.lap(&mut self.profile.update);
        }
        Ok((loss.detach(), correct))
    }

    /// What this run computes with, for `metrics.jsonl` and the log; CUDA
    /// graphs for evaluation only where the training step runs eagerly
    /// (accumulation, OneCycleLR's cycled momentum).
    pub fn ran_as(&self) -> String {
        let s = self.numerics.ran_as(None);
        match self.numerics.cuda_graphs && self.graph.is_none() {
            true => format!("{s} (evaluation only)"),
            false => s,
        }
    }

    /// Reads the pending per-step values, stops on a non-finite loss (naming
    /// its epoch and step), and adds them to the epoch's sums.
    fn flush(
        &mut self,
        pending: &mut Vec<Pending>,
        epoch: usize,
        clock: &mut Instant,
    ) -> Result<()> {
        self.world.await_steps(self.model.device())?;
        let losses = Tensor::stack(
            &pending
                .iter()
                .map(|p| p.loss.to_kind(Kind::Double))
                .collect::<Vec<_>>(),
            0,
        );
        let corrects = Tensor::stack(&pending.iter().map(|p| &p.correct).collect::<Vec<_>>(), 0);
        let losses: Vec<f64> = Vec::try_from(losses.to_device(Device::Cpu))?;
        let corrects: Vec<i64> = Vec::try_from(corrects.to_device(Device::Cpu))?;
        self.state.partial.seconds += clock.elapsed().as_secs_f64();
        *clock = Instant::now();
        for (p, (loss, correct)) in pending.iter().zip(losses.iter().zip(corrects)) {
            if !loss.is_finite() {
                let last = self.run_dir.last();
                let saved = if last.is_file() {
                    format!("the last good checkpoint is {}", last.display())
                } else {
                    "no checkpoint had been written yet".to_string()
                };
                bail!(
                    "loss became {loss} at epoch {}, step {}; stopped without saving ({saved}; a smaller --lr may help)",
                    epoch + 1,
                    p.step + 1
                );
            }
            self.state.partial.loss_sum += loss * p.len as f64;
            self.state.partial.correct += correct;
            self.state.partial.seen += p.len;
        }
        pending.clear();
        Ok(())
    }
}

/// The warning for the images an epoch could not read: how many, and the
/// first one's message.
fn skipped_message(skipped: &[String], epoch: usize) -> String {
    format!(
        "skipped {} unreadable image(s) in epoch {} (--strict makes this an error), e.g. {}",
        skipped.len(),
        epoch + 1,
        skipped[0]
    )
}

/// A step's figures, still on the device until the next flush.
struct Pending {
    step: usize,
    loss: Tensor,
    correct: Tensor,
    len: i64,
}
