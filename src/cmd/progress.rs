//! People's feedback on stderr: an indicatif bar per epoch on a terminal,
//! one plain line per epoch otherwise, nothing with --quiet.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use vggctl::train::Observer;

use super::output::warn;
use vggctl::train::state::EpochMetrics;

pub struct EpochBars {
    quiet: bool,
    tty: bool,
    bar: Option<ProgressBar>,
}

impl EpochBars {
    pub fn new(quiet: bool) -> Self {
        EpochBars {
            quiet,
            tty: std::io::stderr().is_terminal(),
            bar: None,
        }
    }
}

impl Observer for EpochBars {
    fn epoch_start(&mut self, epoch: usize, epochs: usize, steps: usize, done: usize) {
        if self.quiet || !self.tty {
            return;
        }
        let bar = ProgressBar::new(steps as u64);
        bar.set_style(
            ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ETA {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_prefix(format!("epoch {epoch}/{epochs}"));
        bar.set_position(done as u64);
        bar.enable_steady_tick(Duration::from_millis(250));
        self.bar = Some(bar);
    }

    fn progress(&mut self, step: usize, loss: f64, acc: f64, images_per_s: f64) {
        if let Some(bar) = &self.bar {
            bar.set_position(step as u64);
            bar.set_message(format!(
                "loss {loss:.4} acc {acc:.2}% {images_per_s:.0} img/s"
            ));
        }
    }

    fn warn(&mut self, message: &str) {
        warn(message.to_string());
    }

    fn epoch_end(&mut self, m: &EpochMetrics) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        if !self.quiet {
            eprintln!(
                "epoch {:>3}  lr {:.5}  train loss {:.4} acc {:.2}%  test loss {:.4} top-1 {:.2}% top-5 {:.2}%  {:.0} img/s  {:.1}s",
                m.epoch,
                m.lr,
                m.train_loss,
                m.train_acc,
                m.test_loss,
                m.test_top1,
                m.test_top5,
                m.images_per_s,
                m.seconds
            );
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
                eprintln!("{line}");
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
