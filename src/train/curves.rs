//! `curves.svg`: loss, accuracy and learning rate per epoch, drawn with
//! plotters, under a title naming the run, with the best epoch marked; the
//! weights' averages where the run keeps them (`--model-ema`'s line, the
//! point `--swa-start`'s average makes at the run's end).

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::coord::Shift;
use plotters::prelude::*;

use super::state::{EmaMetrics, EpochMetrics, best_epoch};
use crate::fsutil::write_atomic_bytes;

/// A named line: its label, its (epoch, value) points and its colour.
type Series<'a> = (&'a str, Vec<(f64, f64)>, RGBColor);

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("{e}")
}

/// One panel: its lines, a grey vertical line at the best epoch, and the
/// legend where the lines are not (`legend`: losses fall, so upper right;
/// accuracies rise, so lower right).
fn panel(
    area: &Area<'_>,
    title: &str,
    series: &[Series<'_>],
    epochs: f64,
    best: Option<usize>,
    legend: SeriesLabelPosition,
) -> Result<()> {
    let values = || series.iter().flat_map(|s| s.1.iter().map(|p| p.1));
    let top = values()
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max)
        .max(1e-6)
        * 1.08;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 17))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(1.0..epochs, 0.0..top)
        .map_err(err)?;
    chart
        .configure_mesh()
        .light_line_style(WHITE)
        .bold_line_style(BLACK.mix(0.15))
        .x_labels((epochs as usize).min(10))
        .x_label_formatter(&|v| format!("{v:.0}"))
        .x_desc("epoch")
        .draw()
        .map_err(err)?;
    if let Some(b) = best {
        let grey = BLACK.mix(0.35);
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(b as f64, 0.0), (b as f64, top)],
                grey.stroke_width(1),
            )))
            .map_err(err)?
            .label(format!("best: epoch {b}"))
            .legend(move |(x, y)| PathElement::new(vec![(x + 8, y - 6), (x + 8, y + 6)], grey));
    }
    for (name, points, color) in series {
        let color = *color;
        // A series of one point (the weight average's) is a dot.
        let dot = if points.len() == 1 { 4 } else { 0 };
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)).point_size(dot))
            .map_err(err)?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
    }
    if series.len() > 1 || best.is_some() {
        chart
            .configure_series_labels()
            .position(legend)
            .border_style(BLACK)
            .background_style(WHITE.mix(0.85))
            .draw()
            .map_err(err)?;
    }
    Ok(())
}

/// Three panels side by side under `title`: train/val loss, train/val
/// top-1 accuracy, and the learning rate.
pub fn curves(path: &Path, title: &str, history: &[EpochMetrics]) -> Result<()> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1200, 420)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let root = root.titled(title, ("sans-serif", 20)).map_err(err)?;
        let panels = root.split_evenly((1, 3));
        let epochs = history.len().max(2) as f64;
        let best = best_epoch(history);
        let pts = |f: fn(&EpochMetrics) -> f64| -> Vec<(f64, f64)> {
            history.iter().map(|m| (m.epoch as f64, f(m))).collect()
        };
        let mut loss = vec![
            ("train", pts(|m| m.train_loss), BLUE),
            ("val", pts(|m| m.test_loss), RED),
        ];
        loss.extend(averages(history, |a| a.loss));
        let upper = || SeriesLabelPosition::UpperRight;
        panel(&panels[0], "loss", &loss, epochs, best, upper())?;
        let mut accuracy = vec![
            ("train", pts(|m| m.train_acc), BLUE),
            ("val", pts(|m| m.test_top1), RED),
        ];
        accuracy.extend(averages(history, |a| a.top1));
        let lower = SeriesLabelPosition::LowerRight;
        panel(
            &panels[1],
            "top-1 accuracy (%)",
            &accuracy,
            epochs,
            best,
            lower,
        )?;
        let lr = [("learning rate", pts(|m| m.lr), GREEN)];
        panel(&panels[2], "learning rate", &lr, epochs, None, upper())?;
        root.present().map_err(err)?;
    }
    write_atomic_bytes(path, svg.as_bytes())
}

/// The averages' validation `figure` per epoch, where the run has them:
/// `--model-ema`'s every epoch, `--swa-start`'s at the run's end.
fn averages(history: &[EpochMetrics], figure: fn(&EmaMetrics) -> f64) -> Vec<Series<'static>> {
    let of = |average: fn(&EpochMetrics) -> Option<&EmaMetrics>| -> Vec<(f64, f64)> {
        history
            .iter()
            .filter_map(|m| average(m).map(|a| (m.epoch as f64, figure(a))))
            .collect()
    };
    [
        ("val (EMA)", of(|m| m.ema.as_ref()), MAGENTA),
        ("val (SWA)", of(|m| m.swa.as_ref()), BLACK),
    ]
    .into_iter()
    .filter(|s| !s.1.is_empty())
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn epoch(epoch: usize, ema: Option<f64>, swa: Option<f64>) -> EpochMetrics {
        let figures = |v: f64| EmaMetrics {
            loss: v / 100.0,
            top1: v,
            top5: v,
        };
        EpochMetrics {
            epoch,
            lr: 0.1,
            train_loss: 2.0,
            train_acc: 10.0 * epoch as f64,
            test_loss: 1.5,
            test_top1: 12.0 * epoch as f64,
            test_top5: 50.0,
            test_images: 10,
            ema: ema.map(figures),
            swa: swa.map(figures),
            images_per_s: 1.0,
            seconds: 1.0,
            profile: None,
            loss_scale: None,
            ran_as: String::new(),
            peak_gpu_bytes: None,
        }
    }

    /// The averages get a legend entry in the loss and accuracy panels each
    /// where the run has them, none where it does not.
    #[test]
    fn averages_are_drawn_where_the_run_keeps_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("curves.svg");
        let labels = |history: &[EpochMetrics]| -> [usize; 2] {
            curves(&path, "run", history).unwrap();
            let svg = std::fs::read_to_string(&path).unwrap();
            ["val (EMA)", "val (SWA)"].map(|l| svg.matches(l).count())
        };
        let plain = [epoch(1, None, None), epoch(2, None, None)];
        assert_eq!(labels(&plain), [0, 0]);
        let both = [epoch(1, Some(20.0), None), epoch(2, Some(30.0), Some(40.0))];
        assert_eq!(labels(&both), [2, 2]);
    }
}
