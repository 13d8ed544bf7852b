//! The options several subcommands share (the model, how it computes,
//! CUDA graphs), each turned into the library's plain request once, and
//! clap's parser for the library's named value sets.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;
use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use tch::Device;
use vggctl::checkpoint::{Build, ModelMeta, load_checkpoint, load_resolved, meta_for_weights};
use vggctl::choice::Choice;
use vggctl::data::resize::Filter;
use vggctl::device::parse_device;
use vggctl::dist::{Backend, DEFAULT_TIMEOUT, Launch, World};
use vggctl::hub::weights_file;
use vggctl::model::{Arch, Head, ModelSpec, SpecRequest, Values, Vgg, check_run_side};
use vggctl::numerics::{FusedStep, NumericsRequest, Precision};
use vggctl::train::RunDir;

use super::output::{as_usage, note, started, usage, whole};
use super::progress::download_bar;

/// Options every model-building subcommand shares.
#[derive(Args, Debug, Clone)]
pub struct ModelOpts {
    /// vgg11, vgg13, vgg16 or vgg19 (a `_bn` suffix implies --bn)
    /// [default: vgg16; with a plain state dict: what its weights are].
    #[arg(long, alias = "model", help_heading = "Model")]
    pub arch: Option<String>,
    /// With BatchNorm after every convolution.
    #[arg(long, help_heading = "Model")]
    pub bn: bool,
    /// Classifier head: imagenet (torchvision's), cifar (512-512-N) or gap
    /// (global pool + linear) [default: the subcommand's; with a plain state
    /// dict: what its weights are].
    #[arg(long, value_parser = choice::<Head>(), help_heading = "Model")]
    pub head: Option<Head>,
    /// Number of classes [default: 1000 for the imagenet head, 10 otherwise;
    /// with a plain state dict: what its weights are].
    #[arg(long, alias = "num-classes", help_heading = "Model", value_parser = whole::<i64>)]
    pub classes: Option<i64>,
    /// Print one JSON document on stdout instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// How weights are read (every subcommand that reads them; `params` reads
/// none).
#[derive(Args, Debug, Clone)]
pub struct LoadOpts {
    /// Load weights that hold NaN or infinite values (refused by default).
    #[arg(long, help_heading = "Model")]
    pub allow_nonfinite: bool,
}

impl LoadOpts {
    /// What weight values loading accepts.
    pub fn values(&self) -> Values {
        if self.allow_nonfinite {
            Values::Any
        } else {
            Values::FiniteOnly
        }
    }
}

impl ModelOpts {
    /// What these options say about the model (`None` where nothing).
    pub fn request(&self) -> Result<SpecRequest> {
        let (arch, bn_suffix) = match &self.arch {
            Some(a) => {
                let (arch, bn) = Arch::parse_with_bn(a).map_err(as_usage)?;
                (Some(arch), bn)
            }
            None => (None, false),
        };
        if let Some(c) = self.classes {
            vggctl::model::check_classes(c).map_err(as_usage)?;
        }
        Ok(SpecRequest {
            arch,
            // --arch vgg16 says "no BatchNorm" unless --bn says otherwise.
            bn: match arch {
                Some(_) => Some(self.bn || bn_suffix),
                None => self.bn.then_some(true),
            },
            head: self.head,
            classes: self.classes,
        })
    }

    /// The model these options name; `default_head` is the subcommand's.
    pub fn spec(&self, default_head: Head) -> Result<ModelSpec> {
        self.request()?.spec(default_head).map_err(as_usage)
    }

    /// The model in `--weights`: `imagenet` (torchvision's file for
    /// --arch/--bn, found or downloaded) or a state dict file, whose
    /// architecture, head and classes are inferred where no flag gives them
    /// (and said on stderr); with the file it read.
    pub fn load_weights(
        &self,
        weights: &str,
        request: SpecRequest,
        how: (Device, Values, Build),
        quiet: bool,
    ) -> Result<(Vgg, PathBuf)> {
        if weights != "imagenet" {
            let path = checkpoint_in(Path::new(weights))?;
            let (model, inferred) = load_resolved(&path, request, Head::Imagenet, how)?;
            if let Some(line) = inferred {
                note(line);
            }
            return Ok((model, path));
        }
        let spec = request.spec(Head::Imagenet).map_err(as_usage)?;
        let path = weights_file(weights, spec.arch, spec.bn, &mut download_bar(quiet))?;
        let request = SpecRequest {
            arch: Some(spec.arch),
            bn: Some(spec.bn),
            ..request
        };
        let (model, _) = load_resolved(&path, request, Head::Imagenet, how)?;
        Ok((model, path))
    }

    /// The model of `--checkpoint` (with its metadata) or of `--weights`
    /// (with the metadata a state dict implies), on `device`.
    pub fn load_either(
        &self,
        (checkpoint, weights): (Option<&Path>, Option<&str>),
        load: &LoadOpts,
        device: Device,
    ) -> Result<(Vgg, ModelMeta)> {
        if let Some(path) = checkpoint {
            return load_checkpoint(path, self.request()?, device, load.values());
        }
        let Some(w) = weights else {
            return Err(usage("give --checkpoint PATH or --weights imagenet|PATH"));
        };
        let how = (device, load.values(), Build::Blank);
        let (model, _) = self.load_weights(w, self.request()?, how, false)?;
        let meta = meta_for_weights(model.spec);
        Ok((model, meta))
    }
}

/// The position in `spec.layers()` of the module `--layer` names by
/// torchvision's name; a usage error listing the model's names otherwise.
pub fn module_position(spec: &ModelSpec, name: &str) -> Result<usize> {
    spec.position(name).ok_or_else(|| {
        let known: Vec<String> = spec.layers().into_iter().map(|l| l.name).collect();
        usage(format!(
            "--layer {name}: {} ({} head) has no module of that name; its modules are {}",
            spec.model_name(),
            spec.head.name(),
            known.join(", ")
        ))
    })
}

/// Where the model runs (train, finetune, eval, predict; export and params
/// work on the CPU's copy).
#[derive(Args, Debug, Clone)]
pub struct DeviceOpts {
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
}

impl DeviceOpts {
    /// The device `--device` names, or a usage error.
    pub fn get(&self) -> Result<Device> {
        parse_device(&self.device).map_err(as_usage)
    }
}

/// Data-parallel runs: launched by torchrun (or srun), which set RANK,
/// WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (train, finetune,
/// eval).
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Data-parallel")]
pub struct DistOpts {
    /// Data-parallel runs: the collective backend (PyTorch's c10d).
    #[arg(long, value_parser = choice::<Backend>(), default_value = "auto")]
    pub dist_backend: Backend,
    /// Data-parallel runs: seconds a rank waits for the others (to join, and
    /// in every collective) before it fails naming the rank it lost.
    #[arg(long, default_value_t = DEFAULT_TIMEOUT.as_secs(), value_parser = whole::<u64>)]
    pub dist_timeout: u64,
    /// Start N ranks of this command on this machine and wait for them
    /// (torchrun --standalone --nproc-per-node N); not under torchrun or srun.
    #[arg(long, value_name = "N", value_parser = started)]
    pub nproc_per_node: Option<usize>,
    /// With --nproc-per-node: after a rank fails, start all ranks again, up
    /// to K times, each continuing from the run's last checkpoint (needs
    /// --resume auto with --out, or --resume DIR), as torchrun --max-restarts.
    #[arg(long, value_name = "K", default_value_t = 0, value_parser = whole::<usize>)]
    pub max_restarts: usize,
}

impl DistOpts {
    /// A usage error for launcher options that cannot work: `--max-restarts`
    /// restarts `--nproc-per-node`'s ranks, which continue a run only with
    /// `--resume` (`resumes`).
    pub fn validate(&self, resumes: bool) -> Result<()> {
        if self.max_restarts == 0 {
            return Ok(());
        }
        if self.nproc_per_node.is_none() {
            return Err(usage(
                "--max-restarts restarts the ranks --nproc-per-node starts (under torchrun, give torchrun --max-restarts)",
            ));
        }
        if !resumes {
            return Err(usage(
                "--max-restarts continues the restarted ranks from the run's last checkpoint: give --resume auto with --out DIR (or --resume DIR)",
            ));
        }
        Ok(())
    }

    /// The world the launcher's environment describes, joined with the
    /// backend for `device`, or a world of one without a launcher; and the
    /// device this rank runs on: its own GPU (cuda:LOCAL_RANK) when the
    /// device is CUDA and the world has several ranks.
    pub fn join(&self, device: Device) -> Result<(World, Device)> {
        if self.dist_timeout == 0 {
            return Err(usage("--dist-timeout must be at least 1 second"));
        }
        let Some(launch) = Launch::from_env(|k| std::env::var(k).ok())? else {
            return Ok((World::single(), device));
        };
        let device = match device {
            Device::Cuda(_) if launch.world > 1 => Device::Cuda(launch.local_rank),
            d => d,
        };
        let backend = self.dist_backend.resolve(device).map_err(as_usage)?;
        let timeout = std::time::Duration::from_secs(self.dist_timeout);
        Ok((World::join(&launch, backend, device, timeout)?, device))
    }
}

/// How the model computes: precision and memory layout (train, finetune,
/// eval, predict).
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Speed")]
pub struct NumericsOpts {
    /// auto (fp16 with loss scaling on a GPU with tensor cores, else
    /// fp32), fp32 (strict), tf32,
    /// fp16 (autocast + dynamic loss scaling) or bf16 (autocast, also on a
    /// CPU with native bf16); what the device cannot do falls back to fp32
    /// with a warning.
    #[arg(long, value_parser = choice::<Precision>(), default_value = "auto")]
    pub precision: Precision,
    /// torchvision's --amp: --precision fp16.
    #[arg(long, conflicts_with = "precision")]
    pub amp: bool,
    /// NHWC inputs and convolution weights [default: on with CUDA, and with bf16 on a CPU].
    #[arg(long, conflicts_with = "contiguous")]
    pub channels_last: bool,
    /// Plain NCHW layout even on CUDA.
    #[arg(long)]
    pub contiguous: bool,
    /// CUDA: deterministic cuDNN algorithms without autotuning
    /// (cudnn.deterministic), so a rerun gives the same numbers; slower.
    #[arg(long, alias = "use-deterministic-algorithms")]
    pub deterministic: bool,
}

/// How eval and predict read an image for the model, where the command
/// line overrides the checkpoint's evaluation transform.
#[derive(Args, Debug, Clone, Copy)]
pub struct ReadOpts {
    /// Input side for the model; the resize before the centre crop keeps
    /// its ratio to it (256/224) [default: the checkpoint's; 224 for
    /// weights with the ImageNet head, else 32].
    #[arg(long, aliases = ["val-crop-size", "img-size"], value_parser = whole::<i64>)]
    pub input: Option<i64>,
    /// The side the shorter one is resized to before the centre crop
    /// (torchvision's --val-resize-size) [default: the checkpoint's, scaled
    /// with --input].
    #[arg(long, value_name = "R", value_parser = whole::<i64>)]
    pub val_resize_size: Option<i64>,
    /// How images are resized before the centre crop: bilinear or bicubic
    /// (torchvision's --interpolation) [default: the checkpoint's, else
    /// bilinear].
    #[arg(long, value_name = "MODE", value_parser = choice::<Filter>())]
    pub interpolation: Option<Filter>,
}

impl ReadOpts {
    /// A usage error for an --input no model runs at.
    pub fn check(&self) -> Result<()> {
        match self.input {
            Some(input) => check_run_side("--input", input).map_err(as_usage),
            None => Ok(()),
        }
    }

    /// `meta`'s evaluation transform as this command line reads images:
    /// at --input (the resize scaled alike), resized to --val-resize-size
    /// and with --interpolation, where given. A resize for a model that
    /// reads its images whole (a CIFAR-10 or digits run), or under the
    /// crop, is a usage error.
    pub fn apply(&self, meta: ModelMeta) -> Result<ModelMeta> {
        let meta = ModelMeta {
            interpolation: self.interpolation.unwrap_or(meta.interpolation),
            ..meta
        };
        let meta = match self.input {
            Some(input) => meta.at_input(input),
            None => meta,
        };
        let Some(r) = self.val_resize_size else {
            return Ok(meta);
        };
        if let (None, side) = meta.host_crop() {
            return Err(usage(format!(
                "--val-resize-size: this {} model reads its images whole, squeezed to {side}x{side}, with no resize before a crop",
                meta.dataset
            )));
        }
        if r < meta.input_size {
            return Err(usage(format!(
                "--val-resize-size {r} is under the crop {}: give {} or more",
                meta.input_size, meta.input_size
            )));
        }
        check_run_side("--val-resize-size", r).map_err(as_usage)?;
        Ok(ModelMeta {
            resize: Some(r),
            ..meta
        })
    }
}

/// How eval and predict run the model.
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Speed")]
pub struct InferenceOpts {
    /// CUDA: run the model layer by layer as trained, instead of its
    /// inference form (BatchNorm folded into the convolutions, convolution
    /// + bias + ReLU fused, weights stored in the compute dtype).
    #[arg(long)]
    pub layerwise: bool,
}

/// CUDA graphs (train, finetune, eval).
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Speed")]
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

/// Yes, no, or the default: a pair of flags as one request.
fn either(yes: bool, no: bool) -> Option<bool> {
    match (yes, no) {
        (true, _) => Some(true),
        (_, true) => Some(false),
        _ => None,
    }
}

impl NumericsOpts {
    /// The precision asked for (`--amp` is fp16).
    pub fn precision(&self) -> Precision {
        match self.amp {
            true => Precision::Fp16,
            false => self.precision,
        }
    }

    /// What these flags ask for; `graphs` None where the subcommand has no
    /// CUDA graphs (predict), `fused` false where it has no optimizer.
    pub fn request(&self, graphs: Option<&GraphOpts>, fused: bool) -> NumericsRequest {
        NumericsRequest {
            precision: self.precision(),
            channels_last: either(self.channels_last, self.contiguous),
            cuda_graphs: match graphs {
                Some(g) => either(g.cuda_graphs, g.no_cuda_graphs),
                None => Some(false),
            },
            fused,
            fused_step: FusedStep::NONE,
            deterministic: self.deterministic,
        }
    }
}

/// clap's parser for one of the library's named value sets: their names,
/// with their help, are the possible values.
pub fn choice<T: Choice>() -> impl TypedValueParser<Value = T> {
    let other_forms = T::other_forms().iter();
    PossibleValuesParser::new(
        T::ALL
            .iter()
            .map(|v| {
                PossibleValue::new(v.name())
                    .help(v.help())
                    .aliases(v.aliases().iter().copied())
            })
            // Taken, never shown, so that `parse` names vggctl's form.
            .chain(other_forms.map(|(name, _)| PossibleValue::new(*name).hide(true))),
    )
    .try_map(|s| vggctl::choice::parse::<T>("value", &s))
}

/// torchvision's train.py options vggctl offers in another form: hidden,
/// each one usage line pointing to that form (clap would suggest an
/// unrelated option) (train, finetune).
#[derive(Args, Debug, Clone)]
pub struct OtherForms {
    #[arg(long, hide = true)]
    test_only: bool,
    #[arg(long, hide = true, value_name = "N")]
    start_epoch: Option<String>,
    #[arg(long, hide = true)]
    cache_dataset: bool,
}

impl OtherForms {
    /// A usage error naming vggctl's form of the first one given.
    pub fn check(&self) -> Result<()> {
        let forms = [
            (
                self.test_only,
                "--test-only: evaluation is a command of its own, vggctl eval --checkpoint FILE",
            ),
            (
                self.start_epoch.is_some(),
                "--start-epoch: a run continues from where it stopped with --resume DIR",
            ),
            (
                self.cache_dataset,
                "--cache-dataset: image folders are cached without asking (--cache-dir, --cache-mem)",
            ),
        ];
        match forms.into_iter().find(|(given, _)| *given) {
            Some((_, form)) => Err(usage(form)),
            None => Ok(()),
        }
    }
}

/// `--checkpoint DIR` (`--weights DIR`, `--initial-checkpoint DIR`) for a
/// run directory: the checkpoint its report names, `best.safetensors`, else `last.safetensors` (a run kept with
/// `--keep last`), said in a note (by rank 0 of a launched group); any
/// other path as it is.
pub fn checkpoint_in(path: &Path) -> Result<PathBuf> {
    if !path.is_dir() {
        return Ok(path.to_path_buf());
    }
    let run = RunDir {
        dir: path.to_path_buf(),
    };
    let Some(file) = [run.best(), run.last()].into_iter().find(|f| f.is_file()) else {
        anyhow::bail!(
            "{}: a directory without best.safetensors or last.safetensors (a run directory's checkpoints); name the checkpoint file",
            path.display()
        );
    };
    let rank = Launch::from_env(|v| std::env::var(v).ok())
        .ok()
        .flatten()
        .map_or(0, |l| l.rank);
    if rank == 0 {
        note(format!(
            "{} is a run directory: using {}",
            path.display(),
            file.display()
        ));
    }
    Ok(file)
}
