//! How a run computes, decided once per run for train, finetune, eval and
//! predict: the precision the device can do (TF32, fp16/bf16 autocast, with
//! the switches tch lacks set through `shim`), the memory layout, the fused
//! update, CUDA graphs and cuDNN's determinism, and the `ran_as` line that
//! reports them. What the user asked for is a [`NumericsRequest`];
//! [`Numerics::decide`] degrades what the device cannot do (warning through
//! the caller's callback, never failing for that) and nothing below
//! re-derives any of it. [`Numerics::forward`] runs a model in that
//! precision and layout.

use anyhow::Result;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::choice::Choice;
use crate::model::{Vgg, to_channels_last};
use crate::shim::{self, AutocastDtype};

mod step_parts;

pub use step_parts::{FusedStep, StepPart};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// fp16 with loss scaling on a CUDA GPU with tensor cores (compute
    /// capability 7.0 on), else fp32 (on a CPU too).
    Auto,
    /// Strict fp32 (TF32 off in cuBLAS and cuDNN).
    Fp32,
    /// fp32 storage, TensorFloat-32 matmuls and convolutions (Ampere and later).
    Tf32,
    /// float16 autocast with dynamic loss scaling.
    Fp16,
    /// bfloat16 autocast (no loss scaling needed); on a CPU with native
    /// bf16 too.
    Bf16,
}

impl Choice for Precision {
    const ALL: &'static [Self] = &[
        Precision::Auto,
        Precision::Fp32,
        Precision::Tf32,
        Precision::Fp16,
        Precision::Bf16,
    ];

    fn name(self) -> &'static str {
        match self {
            Precision::Auto => "auto",
            Precision::Fp32 => "fp32",
            Precision::Tf32 => "tf32",
            Precision::Fp16 => "fp16",
            Precision::Bf16 => "bf16",
        }
    }

    fn help(self) -> &'static str {
        match self {
            Precision::Auto => {
                "fp16 with loss scaling on a CUDA GPU with tensor cores (compute capability 7.0 on), else fp32 (on a CPU too)"
            }
            Precision::Fp32 => "strict fp32 (TF32 off in cuBLAS and cuDNN)",
            Precision::Tf32 => {
                "fp32 storage, TensorFloat-32 matmuls and convolutions (Ampere and later)"
            }
            Precision::Fp16 => "float16 autocast with dynamic loss scaling",
            Precision::Bf16 => {
                "bfloat16 autocast (no loss scaling needed); on a CPU with native bf16 too"
            }
        }
    }
}

impl Precision {
    pub fn name(self) -> &'static str {
        Choice::name(self)
    }

    /// The dtype the forward pass autocasts to, if any.
    pub fn autocast(self) -> Option<AutocastDtype> {
        match self {
            Precision::Fp16 => Some(AutocastDtype::Float16),
            Precision::Bf16 => Some(AutocastDtype::BFloat16),
            _ => None,
        }
    }
}

/// What the run does, for the rules that differ (the fused update and its
/// CUDA-graph requirement are training's) and for the warnings' wording.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activity {
    Training,
    Evaluating,
    Predicting,
}

impl Activity {
    fn word(self) -> &'static str {
        match self {
            Activity::Training => "training",
            Activity::Evaluating => "evaluating",
            Activity::Predicting => "predicting",
        }
    }

    /// How a step runs without a CUDA graph.
    fn eagerly(self) -> &'static str {
        match self {
            Activity::Training => "running eagerly",
            Activity::Evaluating | Activity::Predicting => "evaluating eagerly",
        }
    }
}

/// What the user asked for; `None` takes the device's default.
#[derive(Clone, Debug, PartialEq)]
pub struct NumericsRequest {
    pub precision: Precision,
    pub channels_last: Option<bool>,
    pub cuda_graphs: Option<bool>,
    /// Training: one flat parameter buffer and libtorch's fused update.
    pub fused: bool,
    /// Training on CUDA: the parts of the fused step it may use (all but
    /// those `--no-fused-step` names).
    pub fused_step: FusedStep,
    /// CUDA: deterministic cuDNN algorithms without autotuning.
    pub deterministic: bool,
}

impl NumericsRequest {
    /// NHWC, asked for or by default on CUDA, and with bf16 on a CPU with
    /// native bf16: oneDNN's bf16 kernels want NHWC as much as cuDNN does
    /// (VGG11 inference on this project's AMX CPU: 20.1 img/s NHWC, 8.2 NCHW).
    pub fn channels_last_on(&self, device: Device) -> bool {
        let cpu_bf16 = self.precision == Precision::Bf16 && cpu_has_native_bf16();
        self.channels_last.unwrap_or(device.is_cuda() || cpu_bf16)
    }

    /// CUDA graphs, asked for or by default on CUDA (with the shim's CUDA
    /// half and the fused update). Only an explicit request on a device
    /// that cannot graph leads to a warning, in `decide`.
    pub fn cuda_graphs_on(&self, device: Device) -> bool {
        self.cuda_graphs
            .unwrap_or(device.is_cuda() && shim::has_cuda() && self.fused)
    }
}

/// What a run computes with, on which device: every numerics decision.
#[derive(Clone, Debug, PartialEq)]
pub struct Numerics {
    pub device: Device,
    pub precision: Precision,
    pub channels_last: bool,
    /// Training with the fused update (fp16's loss scaling needs it).
    pub fused: bool,
    /// Training on CUDA: the parts of the fused step it uses (see
    /// [`StepPart`]); the trainer keeps those that apply to the model and
    /// pass their start-up checks (`train::start::fuse_step`).
    pub fused_step: FusedStep,
    pub cuda_graphs: bool,
}

impl Numerics {
    /// Decides what runs and sets libtorch's switches for it (cuDNN
    /// determinism or autotuning, TF32, the autocast dtype). Degrades
    /// unsupported requests with a warning through `warn`, never an error:
    /// on a CPU, bf16 needs native bf16 instructions and everything else
    /// but fp32 means fp32; a GPU without bf16 means fp16; CUDA graphs need
    /// a CUDA device (and, training, the fused update).
    pub fn decide(
        req: &NumericsRequest,
        device: Device,
        activity: Activity,
        warn: &mut dyn FnMut(String),
    ) -> Result<Numerics> {
        if req.deterministic && device.is_cuda() {
            shim::set_cudnn_deterministic(true)?;
        }
        if device.is_cuda() && !shim::cudnn_deterministic() {
            tch::Cuda::cudnn_set_benchmark(true);
        }
        let precision = resolve_precision(req.precision, device, activity.word(), warn);
        let training = activity == Activity::Training;
        let fused = training && (req.fused || precision == Precision::Fp16);
        let mut cuda_graphs = req.cuda_graphs_on(device);
        if cuda_graphs && !device.is_cuda() {
            warn(format!(
                "--cuda-graphs needs a CUDA device; {}",
                activity.eagerly()
            ));
            cuda_graphs = false;
        } else if cuda_graphs && training && !fused {
            // The per-parameter update accumulates into .grad.
            warn(format!(
                "--cuda-graphs needs the fused update (not --no-fused); {}",
                activity.eagerly()
            ));
            cuda_graphs = false;
        }
        Ok(Numerics {
            device,
            precision,
            channels_last: req.channels_last_on(device),
            fused,
            fused_step: match training && device.is_cuda() {
                true => req.fused_step,
                false => FusedStep::NONE,
            },
            cuda_graphs,
        })
    }

    /// fp32 on the CPU, contiguous, op by op: what tests and tools use
    /// when no run decided anything.
    pub fn plain_cpu() -> Numerics {
        Numerics {
            device: Device::Cpu,
            precision: Precision::Fp32,
            channels_last: false,
            fused: false,
            fused_step: FusedStep::NONE,
            cuda_graphs: false,
        }
    }

    /// The dtype of the forward pass's matrix work.
    pub fn compute_kind(&self) -> Kind {
        match self.precision.autocast() {
            Some(AutocastDtype::Float16) => Kind::Half,
            Some(AutocastDtype::BFloat16) => Kind::BFloat16,
            None => Kind::Float,
        }
    }

    /// A batch in the run's memory layout.
    pub fn input(&self, x: &Tensor) -> Tensor {
        if self.channels_last {
            to_channels_last(x)
        } else {
            x.shallow_clone()
        }
    }

    /// Float32 logits of `model` on the fp32 batch `x`, in the run's layout
    /// and precision (`train`: training mode, else evaluation mode).
    pub fn forward(&self, model: &Vgg, x: &Tensor, train: bool) -> Tensor {
        self.within(x, |x| model.forward_t(x, train))
            .to_kind(Kind::Float)
    }

    /// `f` of the fp32 batch `x` in the run's layout, under its autocast.
    pub fn within<T>(&self, x: &Tensor, f: impl Fn(&Tensor) -> T) -> T {
        let x = self.input(x);
        match self.precision.autocast() {
            // decide has checked that CPU autocast starts and ends, so the
            // plain call here is a fallback that cannot happen.
            Some(_) if x.device() == Device::Cpu => {
                shim::cpu_autocast(|| f(&x)).unwrap_or_else(|_| f(&x))
            }
            Some(dtype) => {
                // Autocast's dtype is per thread; decide has checked that
                // setting it works, so a failure here cannot happen.
                let _ = shim::set_autocast_dtype(dtype);
                tch::autocast(true, || f(&x))
            }
            None => f(&x),
        }
    }

    /// What the run computes with, for `metrics.jsonl`, eval's report and
    /// the log: precision, layout, the update, the model's `form` (eval and
    /// predict), CUDA graphs.
    pub fn ran_as(&self, form: Option<&str>) -> String {
        let mut parts = vec![self.precision.name().to_string()];
        if self.channels_last {
            parts.push("channels_last".into());
        }
        if self.fused {
            parts.push("fused update".into());
        }
        parts.extend(form.map(String::from));
        if self.fused_step.any() {
            parts.push(format!("fused step ({})", self.fused_step.names()));
        }
        if self.cuda_graphs {
            parts.push("CUDA graph".into());
        }
        parts.join(", ")
    }
}

/// The precision that runs on `device` for the one asked for (see
/// `Numerics::decide`), with TF32 and the autocast dtype set for it.
fn resolve_precision(
    precision: Precision,
    device: Device,
    activity: &str,
    warn: &mut dyn FnMut(String),
) -> Precision {
    let cuda = device.is_cuda();
    let major = match shim::compute_capability(device) {
        Ok(m) => m.unwrap_or(0),
        Err(e) => {
            warn(format!("{e:#}; assuming no bf16 and no tensor cores"));
            0
        }
    };
    let bf16 = major >= 8;
    let mut precision = match precision {
        // fp16 with loss scaling: on an H200 it trained VGG16-BN 7-11 %
        // faster than bf16 at the same accuracy (README, benchmarks);
        // tensor cores take fp16 from compute capability 7.0 on.
        Precision::Auto if cuda && major >= 7 => Precision::Fp16,
        Precision::Auto => Precision::Fp32,
        Precision::Fp32 => Precision::Fp32,
        Precision::Bf16 if !cuda => match cpu_bf16() {
            Ok(()) => Precision::Bf16,
            Err(why) => {
                warn(format!(
                    "--precision bf16 on the CPU {why}; {activity} in fp32"
                ));
                Precision::Fp32
            }
        },
        p if !cuda => {
            warn(format!(
                "--precision {} needs a CUDA device; {activity} in fp32",
                p.name()
            ));
            Precision::Fp32
        }
        Precision::Bf16 if !bf16 => {
            warn(if shim::has_cuda() {
                format!(
                    "this GPU has no native bf16 (compute capability < 8.0); {activity} in fp16 with loss scaling"
                )
            } else {
                format!(
                    "this vggctl was built without the CUDA runtime headers, so it cannot check for bf16; {activity} in fp16 with loss scaling"
                )
            });
            Precision::Fp16
        }
        p => p,
    };
    if cuda {
        // PyTorch's own default is TF32 in cuDNN but not in cuBLAS; here
        // fp32 means fp32 and tf32 means both.
        if let Err(e) = shim::set_tf32(precision == Precision::Tf32) {
            warn(format!("{e:#}"));
            if precision == Precision::Tf32 {
                precision = Precision::Fp32;
            }
        }
        if let Some(dtype) = precision.autocast()
            && let Err(e) = shim::set_autocast_dtype(dtype)
        {
            warn(format!("{e:#}; {activity} in fp32"));
            precision = Precision::Fp32;
        }
    }
    precision
}

/// Whether this CPU computes bfloat16 natively (AVX512-BF16, which CPUs
/// with AMX also have, or Arm's BF16): without it oneDNN emulates bf16,
/// slower than fp32.
pub fn cpu_has_native_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("bf16")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// Ok when CPU autocast to bf16 is worth running here; else why not.
fn cpu_bf16() -> std::result::Result<(), String> {
    if !cpu_has_native_bf16() {
        return Err(
            "needs native bf16 instructions (AVX512-BF16 or AMX), which this CPU lacks".into(),
        );
    }
    shim::cpu_autocast(|| ()).map_err(|e| format!("failed: {e:#}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(precision: Precision) -> NumericsRequest {
        NumericsRequest {
            precision,
            channels_last: None,
            cuda_graphs: None,
            fused: true,
            fused_step: FusedStep::without(&[]),
            deterministic: false,
        }
    }

    fn decide(req: &NumericsRequest, activity: Activity) -> (Numerics, Vec<String>) {
        let mut warnings = Vec::new();
        let n = Numerics::decide(req, Device::Cpu, activity, &mut |w| warnings.push(w)).unwrap();
        (n, warnings)
    }

    /// On the CPU: fp16 and explicit CUDA graphs degrade with one warning
    /// each, worded for the activity; training's update is fused, fp32.
    #[test]
    fn the_cpu_degrades_requests_with_a_warning_each() {
        let mut req = request(Precision::Fp16);
        req.cuda_graphs = Some(true);
        let (n, w) = decide(&req, Activity::Training);
        assert_eq!(n.precision, Precision::Fp32);
        assert!(!n.cuda_graphs && n.fused && !n.channels_last);
        assert!(!n.fused_step.any(), "the fused step is CUDA's");
        assert_eq!(
            w,
            [
                "--precision fp16 needs a CUDA device; training in fp32",
                "--cuda-graphs needs a CUDA device; running eagerly"
            ]
        );
        assert_eq!(n.ran_as(None), "fp32, fused update");
        let (n, w) = decide(&req, Activity::Evaluating);
        assert!(!n.fused, "no update when evaluating");
        assert_eq!(
            w[1],
            "--cuda-graphs needs a CUDA device; evaluating eagerly"
        );
        assert_eq!(
            n.ran_as(Some("inference form, plain ops")),
            "fp32, inference form, plain ops"
        );
    }

    /// Defaults: nothing asked, nothing warned; auto is fp32 on the CPU;
    /// channels-last only where asked (or bf16 on a CPU with native bf16).
    #[test]
    fn cpu_defaults_are_quiet_fp32_nchw() {
        let (n, w) = decide(&request(Precision::Auto), Activity::Predicting);
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(
            (n.precision, n.channels_last, n.cuda_graphs),
            (Precision::Fp32, false, false)
        );
        let mut req = request(Precision::Auto);
        req.channels_last = Some(true);
        let (n, _) = decide(&req, Activity::Training);
        assert_eq!(n.ran_as(None), "fp32, channels_last, fused update");
        assert_eq!(
            request(Precision::Bf16).channels_last_on(Device::Cpu),
            cpu_has_native_bf16()
        );
    }

    /// `forward` feeds the model in the decided layout and returns fp32.
    #[test]
    fn forward_in_channels_last_equals_the_plain_forward() {
        let _seeded = crate::seeded();
        use crate::model::{Arch, Head, ModelSpec};
        tch::manual_seed(1);
        let mut model = Vgg::new(ModelSpec::new(Arch::Vgg11, true, Head::Gap, 4), Device::Cpu);
        let x = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
        let plain = tch::no_grad(|| Numerics::plain_cpu().forward(&model, &x, false));
        model.to_channels_last();
        let nhwc = Numerics {
            channels_last: true,
            ..Numerics::plain_cpu()
        };
        let got = tch::no_grad(|| nhwc.forward(&model, &x, false));
        assert_eq!(got.kind(), Kind::Float);
        let err = (&got - &plain).abs().max().double_value(&[]);
        assert!(err < 1e-4, "{err}");
    }
}
