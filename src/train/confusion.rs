//! `confusion.svg`: the last epoch's validation confusion matrix as a
//! picture, rows the true class, columns the predicted one, each cell
//! shaded by its share of the row (the class's recall on the diagonal) and
//! labelled with its count where it is large enough to read.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;

use crate::fsutil::write_atomic_bytes;

/// Classes beyond this are not drawn (a thousand-class matrix is a million
/// cells no one can read; `vggctl eval --json` has the numbers).
pub const MAX_CLASSES: usize = 100;

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A class name cut to `max` characters (with an ellipsis).
fn short(name: &str, max: usize) -> String {
    if name.chars().count() <= max {
        return name.to_string();
    }
    let mut s: String = name.chars().take(max - 1).collect();
    s.push('…');
    s
}

/// The SVG text for `confusion[true][predicted]` with `names`; None beyond
/// [`MAX_CLASSES`].
pub fn render(title: &str, names: &[String], confusion: &[Vec<i64>]) -> Option<String> {
    let n = confusion.len();
    if n == 0 || n > MAX_CLASSES {
        return None;
    }
    let cell = (640 / n).clamp(8, 44) as i64;
    let label = names
        .iter()
        .map(|s| s.chars().count())
        .max()
        .unwrap_or(1)
        .min(24) as i64;
    let left = 40 + 7 * label;
    let top = 60 + 5 * label;
    let side = cell * n as i64;
    let (width, height) = (left + side + 20, top + side + 50);
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif">"#
    );
    let _ = writeln!(
        svg,
        r#"<rect width="100%" height="100%" fill="white"/><text x="{}" y="22" font-size="15" text-anchor="middle">{}</text>"#,
        width / 2,
        escape(title)
    );
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" font-size="13" text-anchor="middle">predicted class</text><text transform="translate(14,{}) rotate(-90)" font-size="13" text-anchor="middle">true class</text>"#,
        left + side / 2,
        top + side + 36,
        top + side / 2
    );
    let font = (cell * 2 / 5).clamp(7, 13);
    for (i, name) in names.iter().enumerate().take(n) {
        let name = escape(&short(name, 24));
        let c = cell * i as i64 + cell / 2;
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" font-size="{font}" text-anchor="end" dominant-baseline="middle">{name}</text><text transform="translate({},{}) rotate(-45)" font-size="{font}">{name}</text>"#,
            left - 6,
            top + c,
            left + c,
            top - 6
        );
    }
    cells(&mut svg, confusion, [left, top, cell, font]);
    svg.push_str("</g>\n");
    // The diagonal (correct predictions) outlined, over its neighbours.
    for i in 0..n as i64 {
        let (x, y) = (left + cell * i, top + cell * i);
        let _ = writeln!(
            svg,
            r##"<rect x="{x}" y="{y}" width="{cell}" height="{cell}" fill="none" stroke="#333"/>"##
        );
    }
    svg.push_str("</svg>\n");
    Some(svg)
}

/// The matrix's cells (`<g id="cells">`, each with its `data-count`),
/// `[left, top, cell, font]` placing them.
fn cells(svg: &mut String, confusion: &[Vec<i64>], [left, top, cell, font]: [i64; 4]) {
    let _ = writeln!(svg, r#"<g id="cells">"#);
    for (t, row) in confusion.iter().enumerate() {
        let total: i64 = row.iter().sum();
        for (p, &count) in row.iter().enumerate() {
            let share = count as f64 / total.max(1) as f64;
            // White to a deep blue, by the share of the row.
            let shade = |full: f64| (255.0 - share * (255.0 - full)).round() as u8;
            let (r, g, b) = (shade(20.0), shade(70.0), shade(160.0));
            let (x, y) = (left + cell * p as i64, top + cell * t as i64);
            let _ = write!(
                svg,
                r##"<rect x="{x}" y="{y}" width="{cell}" height="{cell}" fill="rgb({r},{g},{b})" stroke="#ddd" data-true="{t}" data-predicted="{p}" data-count="{count}"/>"##
            );
            if cell >= 18 && count > 0 {
                let ink = if share > 0.5 { "white" } else { "black" };
                let _ = write!(
                    svg,
                    r#"<text x="{}" y="{}" font-size="{font}" fill="{ink}" text-anchor="middle" dominant-baseline="middle">{count}</text>"#,
                    x + cell / 2,
                    y + cell / 2
                );
            }
            svg.push('\n');
        }
    }
}

/// Writes [`render`]'s picture to `path` (atomically); nothing beyond
/// [`MAX_CLASSES`].
pub fn write(path: &Path, title: &str, names: &[String], confusion: &[Vec<i64>]) -> Result<()> {
    match render(title, names, confusion) {
        Some(svg) => write_atomic_bytes(path, svg.as_bytes()),
        None => Ok(()),
    }
}
