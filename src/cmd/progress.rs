//! People's feedback on stderr: what a run is about to do, an indicatif
//! bar per epoch on a terminal, one plain line per epoch otherwise, nothing
//! with --quiet.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use vggctl::choice::Choice;
use vggctl::data::resize::Filter;
use vggctl::dist::World;
use vggctl::num::Num;
use vggctl::train::config::TrainConfig;
use vggctl::train::{Observer, Trainer};

use super::output::{print_json, print_out, warn};
use anyhow::Result;
use vggctl::train::state::EpochMetrics;
use vggctl::train::state::TrainSummary;

pub struct EpochBars {
    quiet: bool,
    tty: bool,
    bar: Option<ProgressBar>,
    /// The epoch under way: its number, the run's epochs, its steps, the
    /// step it started from, when, and when a plain line was last printed.
    epoch: usize,
    epochs: usize,
    steps: usize,
    first_step: usize,
    started: Instant,
    last_line: Instant,
    /// The step of the last plain line.
    last_line_step: usize,
    interval: LogInterval,
    /// Wall seconds of the epochs finished in this process (training and
    /// evaluation), for the whole run's estimate.
    epoch_seconds: Vec<f64>,
}

/// How often a plain (non-terminal) stderr hears about a running epoch
/// (`--log-interval`): every N steps, or every so many seconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LogInterval {
    Steps(usize),
    Every(Duration),
}

impl std::str::FromStr for LogInterval {
    type Err = String;
    fn from_str(s: &str) -> Result<LogInterval, String> {
        let bad = || format!("{s}: expected a number of steps (50) or of seconds (30s)");
        match s.strip_suffix('s') {
            Some(secs) => match secs.parse::<f64>() {
                Ok(v) if v >= 0.0 && v.is_finite() => {
                    Ok(LogInterval::Every(Duration::from_secs_f64(v)))
                }
                _ => Err(bad()),
            },
            None => match s.parse::<usize>() {
                Ok(n) if n >= 1 => Ok(LogInterval::Steps(n)),
                _ => Err(bad()),
            },
        }
    }
}

impl EpochBars {
    pub fn new(quiet: bool, interval: LogInterval) -> Self {
        EpochBars {
            quiet,
            tty: std::io::stderr().is_terminal(),
            bar: None,
            epoch: 0,
            epochs: 0,
            steps: 0,
            first_step: 0,
            started: Instant::now(),
            last_line: Instant::now(),
            last_line_step: 0,
            interval,
            epoch_seconds: Vec::new(),
        }
    }

    /// Whether a plain line is due at `step` (the epoch's last step has
    /// its epoch line instead).
    fn line_due(&self, step: usize) -> bool {
        if step >= self.steps {
            return false;
        }
        match self.interval {
            LogInterval::Steps(n) => step >= self.last_line_step + n,
            LogInterval::Every(t) => self.last_line.elapsed() >= t,
        }
    }

    /// Time left in the epoch from its own pace so far; a dash until a
    /// step has finished (an estimate from nothing is a guess). With an
    /// epoch finished and more to come, the whole run's too: the epochs
    /// left at the mean wall time of those finished here.
    fn eta(&self, step: usize) -> String {
        let done = step.saturating_sub(self.first_step);
        if done == 0 {
            return "—".into();
        }
        let per_step = self.started.elapsed().as_secs_f64() / done as f64;
        let epoch_left = per_step * self.steps.saturating_sub(step) as f64;
        let finished = &self.epoch_seconds;
        if finished.is_empty() || self.epoch >= self.epochs {
            return clock(epoch_left);
        }
        let mean = finished.iter().sum::<f64>() / finished.len() as f64;
        let run_left = epoch_left + mean * (self.epochs - self.epoch) as f64;
        format!("{} (run {})", clock(epoch_left), clock(run_left))
    }
}

/// Seconds as `1h02m`, `3m05s` or `42s`.
fn clock(secs: f64) -> String {
    let s = secs.round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

impl Observer for EpochBars {
    fn epoch_start(&mut self, epoch: usize, epochs: usize, steps: usize, done: usize) {
        (self.epoch, self.epochs, self.steps, self.first_step) = (epoch, epochs, steps, done);
        self.started = Instant::now();
        self.last_line = Instant::now();
        self.last_line_step = done;
        if self.quiet || !self.tty {
            return;
        }
        let bar = ProgressBar::new(steps as u64);
        bar.set_style(
            ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_prefix(format!("epoch {epoch}/{epochs}"));
        bar.set_position(done as u64);
        bar.set_message("ETA —");
        bar.enable_steady_tick(Duration::from_millis(250));
        self.bar = Some(bar);
    }

    fn progress(&mut self, step: usize, loss: f64, acc: f64, images_per_s: f64) {
        let figures = format!("loss {loss:.4} acc {acc:.2}% {images_per_s:.0} img/s");
        if let Some(bar) = &self.bar {
            bar.set_position(step as u64);
            bar.set_message(format!("{figures} ETA {}", self.eta(step)));
        } else if !self.quiet && self.line_due(step) {
            // Not a terminal (a log file, CI): a line now and then, so that
            // minutes of silence do not look like a hang.
            self.last_line = Instant::now();
            self.last_line_step = step;
            super::output::say(&format!(
                "  epoch {}/{} step {step}/{}  {figures}  ETA {}",
                self.epoch,
                self.epochs,
                self.steps,
                self.eta(step)
            ));
        }
    }

    fn evaluating(&mut self, images: usize) {
        if let Some(bar) = &self.bar {
            bar.set_message(format!("evaluating on {images} val images..."));
        }
    }

    fn warn(&mut self, message: &str) {
        warn(message.to_string());
    }

    fn epoch_end(&mut self, m: &EpochMetrics) {
        if self.first_step == 0 {
            self.epoch_seconds
                .push(self.started.elapsed().as_secs_f64());
        }
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        if !self.quiet {
            super::output::say(&format!(
                "epoch {:>3}  lr {:.5}  train loss {:.4} acc {:.2}%  val loss {:.4} top-1 {:.2}% top-5 {:.2}%{}{}  {:.0} img/s  {:.1}s",
                m.epoch,
                m.lr,
                m.train_loss,
                m.train_acc,
                m.test_loss,
                m.test_top1,
                m.test_top5,
                match &m.ema {
                    Some(e) => format!("  EMA top-1 {:.2}%", e.top1),
                    None => String::new(),
                },
                match &m.swa {
                    Some(s) => format!("  SWA top-1 {:.2}%", s.top1),
                    None => String::new(),
                },
                m.images_per_s,
                m.seconds
            ));
            if let Some(p) = &m.profile {
                let per = |s: f64, n: u64| 1000.0 * s / n.max(1) as f64;
                let eager = p.steps - p.graphed_steps;
                let mut line = format!("           per step: data {:.2} ms", per(p.data, p.steps));
                if p.graphed_steps > 0 {
                    line += &format!(
                        ", CUDA graph (forward+backward+update) {:.2} ms ({} steps)",
                        per(p.graphed, p.graphed_steps),
                        p.graphed_steps
                    );
                }
                if eager > 0 {
                    line += &format!(
                        ", forward {:.2} ms, backward {:.2} ms, update {:.2} ms ({eager} eager steps)",
                        per(p.forward, eager),
                        per(p.backward, eager),
                        per(p.update, eager),
                    );
                }
                if let Some(b) = m.peak_gpu_bytes {
                    line += &format!("; peak GPU memory {:.0} MiB", b as f64 / (1024.0 * 1024.0));
                }
                super::output::say(&line);
            }
        }
    }
}

/// A byte-count bar for downloads (hidden when stderr is not a terminal).
pub fn download_bar(quiet: bool) -> impl FnMut(u64, Option<u64>) {
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "downloading [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    move |done, total| {
        if let Some(t) = total {
            bar.set_length(t);
        }
        bar.set_position(done);
        if total == Some(done) {
            bar.finish_and_clear();
        }
    }
}

/// What a run is about to do, on stderr: where a resumed run continues
/// from, then the run.
pub fn print_header(trainer: &Trainer, dataset: &vggctl::data::Dataset, world: &World) {
    let c = &trainer.state.config;
    let st = &trainer.state;
    // Steps per epoch as each rank takes them.
    let per_rank = world.sampler(c.ra_reps).len(dataset.train.len());
    let steps = (per_rank as usize).div_ceil(c.batch_size as usize);
    if st.epoch > 0 || st.step > 0 {
        super::output::say(&format!(
            "resuming {} at epoch {}/{}, step {}/{steps}{}",
            c.out.display(),
            st.epoch + 1,
            c.epochs,
            st.step,
            match st.history.last() {
                Some(m) => format!(
                    " (last val top-1 {:.2}% after epoch {})",
                    m.test_top1, m.epoch
                ),
                None => String::new(),
            }
        ));
    }
    let trainable: i64 = trainer
        .model
        .trainable_parameters()
        .iter()
        .map(|(_, t)| t.numel() as i64)
        .sum();
    let mut batch = match world.size {
        1 if world.has_group() => format!(
            "batch {} on 1 rank ({})",
            c.batch_size,
            world.backend.name()
        ),
        1 => format!("batch {}", c.batch_size),
        n => format!(
            "batch {} per rank on {n} ranks ({}; global batch {})",
            c.batch_size,
            world.backend.name(),
            c.batch_size * n as i64
        ),
    };
    if let Some(k) = c.ra_reps {
        batch += &format!(
            ", repeated augmentation x{k} ({per_rank} images an epoch{})",
            if world.size > 1 { " per rank" } else { "" }
        );
    }
    super::output::say(&format!(
        "training {} ({} head, {} classes, {} trainable parameters) on {} ({} train / {} val images, {}) on {} ({}), {} epoch{}{}, {batch}, writing {}",
        c.model.model_name(),
        c.model.head.name(),
        c.model.classes,
        trainable,
        c.dataset,
        dataset.train.len(),
        dataset.test.len(),
        image_sides(c),
        c.device,
        trainer.ran_as(),
        c.epochs,
        if c.epochs == 1 { "" } else { "s" },
        match c.unreached_milestones() {
            Some(m) => format!(
                " (milestones {m} are not before the last epoch: the LR never decays there)"
            ),
            None => String::new(),
        },
        c.out.display()
    ));
    warn_small_val(c, dataset.test.len());
    warn_short_run(c, steps);
}

/// The sides of a run's images: `32x32`, or where training crops another
/// side or evaluation resizes to other than torchvision's 256/224,
/// `176x176 training, 224x224 evaluation (resized to 232 first)`, and
/// the filter where it is not bilinear.
fn image_sides(c: &TrainConfig) -> String {
    let (train, eval) = (c.train_crop(), c.input_size);
    let mut sides = match train == eval {
        true => format!("{eval}x{eval}"),
        false => format!("{train}x{train} training, {eval}x{eval} evaluation"),
    };
    if c.val_resize_size.is_some() {
        sides += &format!(" (resized to {} first)", c.val_resize());
    }
    if c.interpolation != Filter::Bilinear {
        sides += &format!(", resized {}", c.interpolation.name());
    }
    sides
}

/// Warns where the run is too short for what its options ask: a warm-up
/// longer than the run (the LR never reaches --lr), an accumulation of
/// more batches than an epoch's `steps` (every update is of fewer).
fn warn_short_run(c: &TrainConfig, steps: usize) {
    if c.warmup_epochs > c.epochs {
        warn(format!(
            "--warmup-epochs {} is longer than the run's {} epoch{}: the LR never reaches --lr {} (its last is {})",
            c.warmup_epochs,
            c.epochs,
            if c.epochs == 1 { "" } else { "s" },
            Num(c.lr),
            Num(c.lr_at(c.epochs - 1, &[]))
        ));
    }
    if c.accum_steps > steps {
        warn(format!(
            "--accum-steps {} is more than an epoch's {steps} step{}: every update sums {steps} batch{} of loss / {}, as an epoch's last, shorter group does",
            c.accum_steps,
            if steps == 1 { "" } else { "s" },
            if steps == 1 { "" } else { "es" },
            c.accum_steps
        ));
    }
}

/// Warns where the validation split is too small for its top-1 to pick
/// the best epoch, with what this run can change to hold more.
fn warn_small_val(c: &TrainConfig, val: i64) {
    if val >= SMALL_VAL {
        return;
    }
    let helps = match (c.limit_test, &c.val_dir) {
        (Some(_), _) => "a larger --limit-test helps",
        (None, Some(_)) => "more images in --val-dir help",
        (None, None) if c.dataset == "folder" => "a larger --val-split helps",
        (None, None) => "more validation images help",
    };
    warn(format!(
        "the validation split holds only {val} image{}: its top-1 moves in steps of {:.2}%, so the best epoch (best.safetensors, --early-stop) may be chosen by chance; {helps}",
        if val == 1 { "" } else { "s" },
        100.0 / val.max(1) as f64
    ));
}

/// Fewer validation images than this: one image is more than a point of
/// top-1, and a run is warned that its best epoch is a matter of chance.
const SMALL_VAL: i64 = 100;

/// What a finished run prints on stdout: its length, where its files are,
/// how it ended, its last and best figures (`--json`: the summary).
pub fn report(s: &TrainSummary, json: bool) -> Result<()> {
    if json {
        return print_json(s);
    }
    let mut text = format!(
        "trained {} epoch{}; files in {}\n",
        s.epochs,
        if s.epochs == 1 { "" } else { "s" },
        s.out.display()
    );
    if let Some(best) = s.stopped_early {
        text += &format!(
            "stopped early: no better val top-1 than epoch {best}'s in the {} since\n",
            match s.epochs - best {
                1 => "epoch".to_string(),
                n => format!("{n} epochs"),
            }
        );
    }
    if let Some(m) = &s.final_metrics {
        let ci = match m.top1_interval() {
            Some([lo, hi]) => format!(" (95% CI {lo:.2}-{hi:.2})"),
            None => String::new(),
        };
        text += &format!(
            "final: val top-1 {:.2}%{ci}  top-5 {:.2}%  loss {:.4}  (train acc {:.2}%)\n",
            m.test_top1, m.test_top5, m.test_loss, m.train_acc
        );
    }
    if let (Some(b), Some(path)) = (s.best_top1, &s.best) {
        text += &format!("best val top-1 {b:.2}% -> {}\n", path.display());
    }
    let swa = s.final_metrics.as_ref().and_then(|m| m.swa.as_ref());
    if let (Some(a), Some(path)) = (swa, &s.swa) {
        text += &format!(
            "weight average (SWA): val top-1 {:.2}%  top-5 {:.2}%  loss {:.4} -> {}\n",
            a.top1,
            a.top5,
            a.loss,
            path.display()
        );
    }
    print_out(&text)
}
