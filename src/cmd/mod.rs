//! One module per subcommand, each with its `Args` and `run`; this module
//! holds the options they share and the dispatch.

mod data_opts;
mod eval;
mod export;
mod finetune;
mod info;
mod params;
mod predict;
mod progress;
mod train;

use std::io::Write;

use anyhow::{Result, bail};
use clap::{Args, Parser, Subcommand};
use tch::Device;
use vggctl::device::parse_device;
use vggctl::model::{Arch, Head, ModelSpec};

#[derive(Parser, Debug)]
#[command(
    name = "vggctl",
    about = "Train, evaluate, fine-tune and export VGG image classifiers (libtorch, no Python)",
    disable_version_flag = true
)]
pub struct Cli {
    /// Print vggctl's and libtorch's versions and what CUDA devices are visible.
    #[arg(short = 'V', long = "version", global = false)]
    version: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Versions, CUDA/cuDNN availability and device names.
    Info(info::Args),
    /// Parameters, shapes, multiply-adds and receptive fields per layer.
    Params(params::Args),
    /// Train on CIFAR-10 with the recipe (SGD 0.01, momentum 0.9, wd 5e-4, 100 epochs).
    Train(train::Args),
    /// Evaluate a checkpoint: top-1/top-5, per-class accuracy, confusion matrix.
    Eval(eval::Args),
    /// Fine-tune torchvision's ImageNet weights on your classes.
    Finetune(finetune::Args),
    /// Export to safetensors (torchvision-loadable), TorchScript or ONNX.
    Export(export::Args),
    /// Classify images with a checkpoint or torchvision's weights.
    Predict(predict::Args),
}

pub fn run(cli: Cli) -> Result<()> {
    if cli.version {
        return info::print_version(false);
    }
    let Some(command) = cli.command else {
        bail!("no subcommand given; see 'vggctl --help'");
    };
    match command {
        Command::Info(args) => info::run(args),
        Command::Params(args) => params::run(args),
        Command::Train(args) => train::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Finetune(args) => finetune::run(args),
        Command::Export(args) => export::run(args),
        Command::Predict(args) => predict::run(args),
    }
}

/// Options every model-building subcommand shares.
#[derive(Args, Debug, Clone)]
pub struct ModelOpts {
    /// vgg11, vgg13, vgg16 or vgg19 (a `_bn` suffix implies --bn).
    #[arg(long, default_value = "vgg16")]
    pub arch: String,
    /// With BatchNorm after every convolution.
    #[arg(long)]
    pub bn: bool,
    /// Classifier head: imagenet (torchvision's), cifar (512-512-N) or gap (global pool + linear).
    #[arg(long, value_enum)]
    pub head: Option<Head>,
    /// Number of classes [default: 1000 for the imagenet head, 10 otherwise].
    #[arg(long)]
    pub classes: Option<i64>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Print one JSON document on stdout instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl ModelOpts {
    /// The model these options name; `default_head` is the subcommand's.
    pub fn spec(&self, default_head: Head) -> Result<ModelSpec> {
        let (arch, bn_suffix) = Arch::parse_with_bn(&self.arch)?;
        let head = self.head.unwrap_or(default_head);
        let classes = self.classes.unwrap_or(head.default_classes());
        if classes < 1 {
            bail!("--classes {classes}: a classifier needs at least one class");
        }
        Ok(ModelSpec::new(arch, self.bn || bn_suffix, head, classes))
    }

    pub fn device(&self) -> Result<Device> {
        parse_device(&self.device)
    }
}

/// How the model computes: precision and memory layout (train, finetune,
/// eval, predict).
#[derive(Args, Debug, Clone)]
pub struct NumericsOpts {
    /// auto (fp16 with loss scaling on a GPU with tensor cores, else
    /// fp32), fp32 (strict), tf32,
    /// fp16 (autocast + dynamic loss scaling) or bf16 (autocast, also on a
    /// CPU with native bf16); what the device cannot do falls back to fp32
    /// with a warning.
    #[arg(long, value_enum, default_value = "auto")]
    pub precision: vggctl::amp::Precision,
    /// NHWC inputs and convolution weights [default: on with CUDA, and with bf16 on a CPU].
    #[arg(long, conflicts_with = "contiguous")]
    pub channels_last: bool,
    /// Plain NCHW layout even on CUDA.
    #[arg(long)]
    pub contiguous: bool,
    /// CUDA: deterministic cuDNN algorithms without autotuning
    /// (cudnn.deterministic), so a rerun gives the same numbers; slower.
    #[arg(long)]
    pub deterministic: bool,
}

/// How eval and predict run the model.
#[derive(Args, Debug, Clone)]
pub struct InferenceOpts {
    /// CUDA: run the model layer by layer as trained, instead of its
    /// inference form (BatchNorm folded into the convolutions, convolution
    /// + bias + ReLU fused, weights stored in the compute dtype).
    #[arg(long)]
    pub layerwise: bool,
}

/// CUDA graphs (train, finetune, eval).
#[derive(Args, Debug, Clone)]
pub struct GraphOpts {
    /// Capture each full-batch step (training: forward, loss, backward,
    /// fused update; eval: the forward and the sums) in a CUDA graph and
    /// replay it, which removes the per-kernel launch cost that bounds small
    /// batches [default: on with CUDA and the fused update].
    #[arg(long, conflicts_with = "no_cuda_graphs")]
    pub cuda_graphs: bool,
    /// Run every step op by op, even on CUDA.
    #[arg(long)]
    pub no_cuda_graphs: bool,
}

impl GraphOpts {
    /// Asked for, or by default on CUDA (with the shim's CUDA half and the
    /// fused update). Only an explicit request on a device that cannot
    /// graph leads to a warning, later.
    pub fn wanted(&self, device: Device, fused: bool) -> bool {
        self.cuda_graphs
            || (!self.no_cuda_graphs && device.is_cuda() && vggctl::shim::has_cuda() && fused)
    }
}

impl NumericsOpts {
    /// oneDNN's bf16 kernels want NHWC as much as cuDNN does (VGG11
    /// inference on this project's AMX CPU: 20.1 img/s NHWC, 8.2 NCHW).
    pub fn channels_last_on(&self, device: Device) -> bool {
        let cpu_bf16 =
            self.precision == vggctl::amp::Precision::Bf16 && vggctl::amp::cpu_has_native_bf16();
        self.channels_last || ((device.is_cuda() || cpu_bf16) && !self.contiguous)
    }

    /// Inference (eval, predict): resolves precision and layout for
    /// `device`, warning on stderr where a request degrades, and sets the
    /// model, the preprocessing and cuDNN's autotuning up for them.
    pub fn setup_inference(
        &self,
        device: Device,
        activity: &str,
        model: &mut vggctl::model::Vgg,
        pre: &mut vggctl::data::augment::Preprocess,
        layerwise: bool,
    ) -> Result<vggctl::amp::Resolved> {
        self.apply_determinism(device)?;
        let run = vggctl::amp::resolve(
            self.precision,
            self.channels_last_on(device),
            device,
            activity,
            &mut |w| eprintln!("warning: {w}"),
        );
        if run.channels_last {
            model.to_channels_last();
        }
        pre.channels_last = run.channels_last;
        pre.autocast = run.precision.autocast();
        vggctl::amp::autotune_cudnn(device);
        if device.is_cuda() && !layerwise {
            let kind = match run.precision.autocast() {
                Some(vggctl::shim::AutocastDtype::Float16) => tch::Kind::Half,
                Some(vggctl::shim::AutocastDtype::BFloat16) => tch::Kind::BFloat16,
                None => tch::Kind::Float,
            };
            model.inference = Some(vggctl::infer::InferencePlan::new(
                model,
                kind,
                run.channels_last,
            ));
        }
        Ok(run)
    }

    /// `--deterministic`: set before any model runs.
    pub fn apply_determinism(&self, device: Device) -> Result<()> {
        if self.deterministic && device.is_cuda() {
            vggctl::shim::set_cudnn_deterministic(true)?;
        }
        Ok(())
    }
}

/// Writes `text` to stdout; a closed pipe surfaces as an io error that main ignores.
pub fn print_out(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

pub fn print_json<T: serde::Serialize>(value: &T) -> Result<()> {
    print_out(&(serde_json::to_string_pretty(value)? + "\n"))
}
