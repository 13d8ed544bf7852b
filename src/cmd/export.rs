//! `vggctl export`: safetensors that torchvision loads, TorchScript, ONNX.

use std::path::PathBuf;

use anyhow::Result;
use tch::Device;
use vggctl::checkpoint::ModelMeta;
use vggctl::choice::Choice;
use vggctl::export::{export_onnx, export_pt2, export_safetensors, export_torchscript};
use vggctl::infer::fold_bn;
use vggctl::model::{Head, Pool, Vgg, check_input, check_run_side};

use super::opts::{LoadOpts, ModelOpts, checkpoint_in, choice, module_position};
use super::output::{as_usage, print_json, print_out, usage, warn, whole};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Safetensors,
    Torchscript,
    Onnx,
    /// PyTorch 2's `torch.export` archive (`torch.export.load`, AOTInductor).
    Pt2,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A vggctl checkpoint (last/best.safetensors; a run directory means its
    /// best).
    #[arg(long, conflicts_with = "weights")]
    checkpoint: Option<PathBuf>,
    /// `imagenet` (torchvision's weights for --arch/--bn) or a state dict file
    /// (.pth/.pt/.safetensors; its architecture, head and classes inferred).
    #[arg(long, value_parser = clap::builder::NonEmptyStringValueParser::new())]
    weights: Option<String>,
    /// [default: from --out's extension: .safetensors, .pt (TorchScript), .onnx, .pt2]
    #[arg(long, value_enum)]
    format: Option<Format>,
    /// The file to write.
    #[arg(short, long)]
    out: PathBuf,
    /// Input side the TorchScript/ONNX/pt2 graph is built for [default: the checkpoint's, else 224 / 32].
    #[arg(long, value_parser = whole::<i64>)]
    input: Option<i64>,
    /// Fold BatchNorm into the preceding convolution (torchscript, onnx, pt2).
    #[arg(long)]
    fold_bn: bool,
    /// Export the model up to this module only, its output the graph's
    /// (torchscript, onnx, pt2): an embedding model, as
    /// create_feature_extractor with one return node (`classifier.4`: VGG's
    /// fc7; `features.N`, `avgpool`, `flatten`, `classifier.N`).
    #[arg(long, value_name = "NAME")]
    layer: Option<String>,
    /// Pool the --layer's feature maps over their height and width, one
    /// value per channel (an N x C embedding): avg or max.
    #[arg(long, value_name = "POOL", requires = "layer", value_parser = choice::<Pool>())]
    pool: Option<Pool>,
    /// Store float16 weights (safetensors).
    #[arg(long)]
    half: bool,
    /// Overwrite an existing --out.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    model: ModelOpts,
    #[command(flatten)]
    load: LoadOpts,
}

#[derive(serde::Serialize)]
struct Written {
    path: PathBuf,
    bytes: u64,
    format: Format,
    model: String,
    head: Head,
    classes: i64,
    /// `[null, 3, H, W]`: the batch dimension is dynamic.
    input_shape: [Option<i64>; 4],
    /// The module the model was cut at (--layer), and the output's shape
    /// (`[null, ...]`).
    layer: Option<String>,
    pool: Option<Pool>,
    output_shape: Vec<Option<i64>>,
    folded_bn: bool,
    half: bool,
}

impl Format {
    fn name(self) -> &'static str {
        match self {
            Format::Safetensors => "safetensors",
            Format::Torchscript => "TorchScript",
            Format::Onnx => "ONNX",
            Format::Pt2 => "pt2 (torch.export)",
        }
    }

    /// The format `--out`'s extension names.
    fn of(out: &std::path::Path) -> Result<Format> {
        let ext = out
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase());
        Ok(match ext.as_deref() {
            Some("safetensors") => Format::Safetensors,
            Some("pt") | Some("ts") => Format::Torchscript,
            Some("onnx") => Format::Onnx,
            Some("pt2") => Format::Pt2,
            _ => {
                return Err(usage(format!(
                    "--out {}: give --format, or an extension that names one (.safetensors, .pt, .onnx, .pt2)",
                    out.display()
                )));
            }
        })
    }
}

pub fn run(mut args: Args) -> Result<()> {
    if let Some(path) = &args.checkpoint {
        args.checkpoint = Some(checkpoint_in(path)?);
    }
    let format = match args.format {
        Some(f) => f,
        None => Format::of(&args.out)?,
    };
    run_as(&args, format)?;
    // Said once the file is written (a refused export says only why).
    if let Some(named) = Format::of(&args.out).ok().filter(|&n| n != format) {
        warn(format!(
            "{}: wrote {} into a file whose extension names {}",
            args.out.display(),
            format.name(),
            named.name()
        ));
    }
    Ok(())
}

fn run_as(args: &Args, format: Format) -> Result<()> {
    if args.half && format != Format::Safetensors {
        return Err(usage("--half applies to --format safetensors only"));
    }
    if args.layer.is_some() && format == Format::Safetensors {
        return Err(usage(
            "--layer applies to torchscript, onnx and pt2 (a safetensors file holds the whole state dict)",
        ));
    }
    if args.fold_bn && format == Format::Safetensors {
        return Err(usage(
            "--fold-bn applies to torchscript, onnx and pt2 (a folded state dict is no longer torchvision's)",
        ));
    }
    if let Some(input) = args.input {
        check_run_side("--input", input).map_err(as_usage)?;
    }
    vggctl::fsutil::check_target(&args.out, args.force)?;
    let (model, meta, input) = exported_model(args)?;
    let folded = args.fold_bn && model.spec.bn;
    let model = if folded { fold_bn(&model) } else { model }.into_inference();
    let mut output_shape = vec![None];
    output_shape.extend(model.output_shape(input).into_iter().map(Some));
    match format {
        Format::Safetensors => export_safetensors(&model, &meta, &args.out, args.half)?,
        Format::Torchscript => export_torchscript(&model, input, &args.out)?,
        Format::Onnx => export_onnx(&model, &meta, input, folded, &args.out)?,
        Format::Pt2 => export_pt2(&model, &meta, input, &args.out)?,
    }
    let written = Written {
        path: args.out.clone(),
        bytes: std::fs::metadata(&args.out).map(|m| m.len()).unwrap_or(0),
        format,
        model: meta.spec().model_name(),
        head: meta.head,
        classes: meta.classes,
        input_shape: [None, Some(3), Some(input), Some(input)],
        folded_bn: folded,
        half: args.half,
        layer: args.layer.clone(),
        pool: args.pool,
        output_shape,
    };
    report(&written, args.model.json)
}

/// The model the options name, cut at --layer and pooled by --pool (not
/// yet folded), its metadata, and the graph's input side.
fn exported_model(args: &Args) -> Result<(Vgg, ModelMeta, i64)> {
    let source = (args.checkpoint.as_deref(), args.weights.as_deref());
    let (model, meta) = args.model.load_either(source, &args.load, Device::Cpu)?;
    let input = args.input.unwrap_or(meta.input_size);
    check_input(input)?;
    // Cut before folding: a convolution whose BatchNorm is cut off keeps
    // its own output.
    let model = match &args.layer {
        Some(name) => model.cut(module_position(&model.spec, name)?),
        None => model,
    };
    let model = match (args.pool, &args.layer) {
        (Some(pool), Some(name)) => model
            .pooled(pool)
            .map_err(|e| usage(format!("--pool: {name} {e}")))?,
        _ => model,
    };
    Ok((model, meta, input))
}

/// What was written, as JSON or one line.
fn report(written: &Written, json: bool) -> Result<()> {
    if json {
        return print_json(written);
    }
    let input = written.input_shape[2].unwrap_or(0);
    let cut = match &written.layer {
        Some(name) => {
            let dims: Vec<String> = written.output_shape[1..]
                .iter()
                .map(|d| d.unwrap_or(0).to_string())
                .collect();
            let pooled = match written.pool {
                Some(p) => format!(" ({} pooled)", p.name()),
                None => String::new(),
            };
            format!(", up to {name}{pooled}: output N x {}", dims.join(" x "))
        }
        None => String::new(),
    };
    print_out(&format!(
        "wrote {} ({:.1} MiB, {}, {} with {} classes, input N x 3 x {input} x {input}{cut}{}{})\n",
        written.path.display(),
        written.bytes as f64 / (1024.0 * 1024.0),
        written.format.name(),
        written.model,
        written.classes,
        if written.folded_bn {
            ", BatchNorm folded"
        } else {
            ""
        },
        if written.half { ", float16" } else { "" },
    ))
}
