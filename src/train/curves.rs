//! `curves.svg`: loss and accuracy per epoch, drawn with plotters.

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::prelude::*;

use super::state::EpochMetrics;
use crate::fsutil::write_atomic_bytes;

/// A named line: its label, its (epoch, value) points and its colour.
type Series<'a> = (&'a str, Vec<(f64, f64)>, RGBColor);

/// Two panels side by side: train/test loss, and train/test top-1 accuracy.
pub fn curves(path: &Path, history: &[EpochMetrics]) -> Result<()> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (960, 400)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
        let (left, right) = root.split_horizontally(480);
        let epochs = history.len().max(2) as f64;
        let panel = |area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
                     title: &str,
                     series: [Series<'_>; 2]|
         -> Result<()> {
            let top = series
                .iter()
                .flat_map(|s| s.1.iter().map(|p| p.1))
                .filter(|v| v.is_finite())
                .fold(0.0f64, f64::max)
                .max(1e-6)
                * 1.05;
            let mut chart = ChartBuilder::on(area)
                .caption(title, ("sans-serif", 18))
                .margin(12)
                .x_label_area_size(44)
                .y_label_area_size(48)
                .build_cartesian_2d(1.0..epochs, 0.0..top)
                .map_err(|e| anyhow!("{e}"))?;
            chart
                .configure_mesh()
                .light_line_style(WHITE)
                .bold_line_style(BLACK.mix(0.15))
                .x_labels((epochs as usize).min(10))
                .x_label_formatter(&|v| format!("{v:.0}"))
                .x_desc("epoch")
                .draw()
                .map_err(|e| anyhow!("{e}"))?;
            for (name, points, color) in series {
                chart
                    .draw_series(LineSeries::new(points, color.stroke_width(2)))
                    .map_err(|e| anyhow!("{e}"))?
                    .label(name)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
            }
            chart
                .configure_series_labels()
                .border_style(BLACK)
                .background_style(WHITE.mix(0.8))
                .draw()
                .map_err(|e| anyhow!("{e}"))?;
            Ok(())
        };
        let pts = |f: fn(&EpochMetrics) -> f64| -> Vec<(f64, f64)> {
            history.iter().map(|m| (m.epoch as f64, f(m))).collect()
        };
        panel(
            &left,
            "loss",
            [
                ("train", pts(|m| m.train_loss), BLUE),
                ("test", pts(|m| m.test_loss), RED),
            ],
        )?;
        panel(
            &right,
            "top-1 accuracy (%)",
            [
                ("train", pts(|m| m.train_acc), BLUE),
                ("test", pts(|m| m.test_top1), RED),
            ],
        )?;
        root.present().map_err(|e| anyhow!("{e}"))?;
    }
    write_atomic_bytes(path, svg.as_bytes())
}
