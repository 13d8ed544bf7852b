//! The parameter report behind `vggctl params`: per-layer shapes, parameters,
//! multiply-adds and receptive fields, and the case for stacked 3x3 convolutions.
//!
//! Everything is computed from the same layer list that builds the model, so
//! the report describes exactly the network that `Vgg::new` creates.

use anyhow::{Result, anyhow};
use serde::{Deserialize, Serialize};

use crate::model::{LayerKind, ModelSpec, check_input};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LayerRow {
    /// Module path in the state dict (`features.0`, `classifier.6`).
    pub name: String,
    pub layer: String,
    /// Output shape for one image (C, H, W) or (features,).
    pub output_shape: Vec<i64>,
    pub params: i64,
    /// Multiply-accumulates for one image (convolutions and linear layers).
    pub macs: i64,
    /// Side of the input window one output element sees; `None` once the
    /// head's pooling has mixed the whole image.
    pub receptive_field: Option<i64>,
    /// Output elements for one image.
    pub activation_elements: i64,
}

/// One block of k stacked 3x3 convolutions against the single
/// (2k+1)x(2k+1) convolution that sees the same window.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StackRow {
    pub block: usize,
    /// Module paths of the block's convolutions.
    pub convs: Vec<String>,
    pub k: usize,
    /// Block width C (both sides C channels, as in the VGG paper's argument).
    pub channels: i64,
    pub receptive_field: i64,
    /// k * 9 * C^2
    pub stacked_weights: i64,
    /// (2k+1)^2 * C^2
    pub single_weights: i64,
    /// 100 * (1 - stacked / single)
    pub saving_percent: f64,
    pub stacked_nonlinearities: usize,
    pub single_nonlinearities: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ParamsReport {
    pub model: String,
    pub arch: String,
    pub bn: bool,
    pub head: String,
    pub classes: i64,
    pub input: i64,
    pub total_params: i64,
    pub trainable_params: i64,
    /// fp32 parameters in MiB.
    pub size_mib: f64,
    pub total_macs: i64,
    pub total_gmacs: f64,
    /// Sum of every layer's output for one image, and its fp32 size.
    pub activation_elements: i64,
    pub activation_mib: f64,
    pub layers: Vec<LayerRow>,
    pub stacking: Vec<StackRow>,
}

const MIB: f64 = 1024.0 * 1024.0;

pub fn params_report(spec: &ModelSpec, input: i64) -> Result<ParamsReport> {
    check_input(input)?;
    let mut shape = vec![3, input, input];
    // Receptive field side and the distance between neighbouring outputs, in input pixels.
    let (mut rf, mut jump) = (1i64, 1i64);
    let mut global = false;
    let mut rows = Vec::new();
    // Counts in 128 bits, checked into the report's 64 at the end: a huge
    // --input must be an error, not a negative figure.
    let too_large =
        || anyhow!("--input {input} is too large: its counts do not fit in 64-bit integers");
    let fit = |v: i128| i64::try_from(v).map_err(|_| too_large());
    for l in spec.layers() {
        let mut macs: i128 = 0;
        match l.kind {
            LayerKind::Conv { cin, cout } => {
                shape = vec![cout, shape[1], shape[2]];
                macs = [cin, 9, cout, shape[1], shape[2]]
                    .iter()
                    .map(|&v| v as i128)
                    .product();
                rf += 2 * jump;
            }
            LayerKind::MaxPool => {
                shape = vec![shape[0], shape[1] / 2, shape[2] / 2];
                rf += jump;
                jump *= 2;
            }
            LayerKind::AdaptiveAvgPool { size } => {
                // Each output averages a window of the feature map; once that
                // window is the whole map the output sees the whole image.
                if size == 1 || shape[1] < size {
                    global = true;
                } else {
                    let window = (shape[1] + size - 1) / size;
                    rf += (window - 1) * jump;
                }
                shape = vec![shape[0], size, size];
            }
            LayerKind::Flatten => shape = vec![shape.iter().product()],
            LayerKind::Linear { fin, fout } => {
                shape = vec![fout];
                macs = fin as i128 * fout as i128;
                global = true;
            }
            LayerKind::BatchNorm { .. } | LayerKind::Relu | LayerKind::Dropout { .. } => {}
        }
        rows.push(LayerRow {
            name: l.name.clone(),
            layer: l.kind.describe(),
            output_shape: shape.clone(),
            params: l.kind.param_count(),
            macs: fit(macs)?,
            receptive_field: (!global).then_some(rf),
            activation_elements: fit(shape.iter().map(|&v| v as i128).product())?,
        });
    }
    let total_params: i64 = rows.iter().map(|r| r.params).sum();
    let total_macs = fit(rows.iter().map(|r| r.macs as i128).sum())?;
    let activation_elements = fit(rows.iter().map(|r| r.activation_elements as i128).sum())?;
    Ok(ParamsReport {
        model: spec.model_name(),
        arch: spec.arch.name().into(),
        bn: spec.bn,
        head: spec.head.name().into(),
        classes: spec.classes,
        input,
        total_params,
        trainable_params: total_params,
        size_mib: total_params as f64 * 4.0 / MIB,
        total_macs,
        total_gmacs: total_macs as f64 / 1e9,
        activation_elements,
        activation_mib: activation_elements as f64 * 4.0 / MIB,
        layers: rows,
        stacking: stacking_rows(spec),
    })
}

/// Splits `features` at its poolings and compares each block's stack of 3x3
/// convolutions with one large convolution of the same receptive field.
fn stacking_rows(spec: &ModelSpec) -> Vec<StackRow> {
    let mut blocks: Vec<Vec<(String, i64)>> = vec![Vec::new()];
    for l in spec.feature_layers() {
        match l.kind {
            LayerKind::Conv { cout, .. } => blocks.last_mut().unwrap().push((l.name, cout)),
            LayerKind::MaxPool => blocks.push(Vec::new()),
            _ => {}
        }
    }
    blocks
        .into_iter()
        .filter(|b| !b.is_empty())
        .enumerate()
        .map(|(i, convs)| {
            let k = convs.len();
            let c = convs[0].1;
            let side = 2 * k as i64 + 1;
            let stacked = k as i64 * 9 * c * c;
            let single = side * side * c * c;
            StackRow {
                block: i + 1,
                convs: convs.into_iter().map(|(n, _)| n).collect(),
                k,
                channels: c,
                receptive_field: side,
                stacked_weights: stacked,
                single_weights: single,
                saving_percent: 100.0 * (1.0 - stacked as f64 / single as f64),
                stacked_nonlinearities: k,
                single_nonlinearities: 1,
            }
        })
        .collect()
}

fn group(n: i64) -> String {
    let s = n.abs().to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    if n < 0 { format!("-{out}") } else { out }
}

fn shape_str(s: &[i64]) -> String {
    s.iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join("x")
}

/// The per-layer table: names and layer descriptions left-aligned, numbers
/// right-aligned, every column as wide as its widest cell.
fn layer_table(r: &ParamsReport) -> String {
    let header = [
        "name",
        "layer",
        "output",
        "params",
        "mult-adds",
        "RF",
        "activations",
    ];
    let cells: Vec<[String; 7]> = r
        .layers
        .iter()
        .map(|l| {
            [
                l.name.clone(),
                l.layer.clone(),
                shape_str(&l.output_shape),
                group(l.params),
                group(l.macs),
                l.receptive_field.map_or("all".into(), |v| v.to_string()),
                group(l.activation_elements),
            ]
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.len());
        }
    }
    let fmt_row = |row: &[String]| -> String {
        let mut line = String::new();
        for (i, (c, w)) in row.iter().zip(&widths).enumerate() {
            if i < 2 {
                line.push_str(&format!("{c:<w$}  "));
            } else {
                line.push_str(&format!("{c:>w$}  "));
            }
        }
        line.trim_end().to_string() + "\n"
    };
    let mut out = fmt_row(&header.map(String::from));
    out.push_str(&fmt_row(
        &widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>(),
    ));
    for row in &cells {
        out.push_str(&fmt_row(row));
    }
    out
}

/// The human-readable report printed by `vggctl params`.
pub fn render_table(r: &ParamsReport) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "{} ({} head, {} classes), input 3x{}x{}\n\n",
        r.model, r.head, r.classes, r.input, r.input
    ));
    out.push_str(&layer_table(r));
    out.push('\n');
    out.push_str(&format!(
        "total parameters      {}\n",
        group(r.total_params)
    ));
    out.push_str(&format!(
        "trainable parameters  {}\n",
        group(r.trainable_params)
    ));
    out.push_str(&format!("size (fp32)           {:.2} MiB\n", r.size_mib));
    out.push_str(&format!(
        "multiply-adds         {} ({:.3} G)\n",
        group(r.total_macs),
        r.total_gmacs
    ));
    out.push_str(&format!(
        "activations / image   {} elements ({:.2} MiB fp32, forward only)\n\n",
        group(r.activation_elements),
        r.activation_mib
    ));
    out.push_str(
        "Why stacked 3x3 convolutions: k of them see a (2k+1)x(2k+1) window, like one large\n\
         convolution, with fewer weights and k non-linearities instead of one (C channels in and out):\n",
    );
    for s in &r.stacking {
        out.push_str(&format!(
            "  block {} ({}): {} x 3x3 = {} weights vs one {}x{} = {}: {:.1}% fewer, {} ReLUs vs {}\n",
            s.block,
            s.channels,
            s.k,
            group(s.stacked_weights),
            s.receptive_field,
            s.receptive_field,
            group(s.single_weights),
            s.saving_percent,
            s.stacked_nonlinearities,
            s.single_nonlinearities
        ));
    }
    out
}
