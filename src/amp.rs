//! Precision and memory layout: which precision a run gets on its device
//! (the switches tch lacks go through `shim`), the saved state of fp16's
//! dynamic loss scaling (tch has no GradScaler; the scaling itself runs on
//! the device inside the fused update, see `optim`), and the channels-last
//! layout.

use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use crate::shim::{self, AutocastDtype};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
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

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::Auto => "auto",
            Precision::Fp32 => "fp32",
            Precision::Tf32 => "tf32",
            Precision::Fp16 => "fp16",
            Precision::Bf16 => "bf16",
        }
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

/// What a run actually uses, after degrading what the device cannot do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub precision: Precision,
    pub channels_last: bool,
}

/// Picks what runs and sets libtorch's switches for it (TF32, the autocast
/// dtype). Degrades unsupported requests with a warning (through `warn`),
/// never an error: on a CPU, bf16 needs native bf16 instructions and
/// everything else but fp32 means fp32; a GPU without bf16 means fp16.
/// `activity` ("training", "evaluating") words the warnings.
pub fn resolve(
    precision: Precision,
    channels_last: bool,
    device: Device,
    activity: &str,
    warn: &mut dyn FnMut(String),
) -> Resolved {
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
    Resolved {
        precision,
        channels_last,
    }
}

/// cuDNN autotuning (`cudnn.benchmark`) on CUDA, unless `--deterministic`
/// asked for heuristic, deterministic algorithms.
pub fn autotune_cudnn(device: Device) {
    if device.is_cuda() && !shim::cudnn_deterministic() {
        tch::Cuda::cudnn_set_benchmark(true);
    }
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

/// NCHW shape with NHWC strides (cuDNN follows the strides); other tensors unchanged.
pub fn to_channels_last(t: &Tensor) -> Tensor {
    if t.dim() == 4 {
        t.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
    } else {
        t.shallow_clone()
    }
}

pub fn is_channels_last(t: &Tensor) -> bool {
    let (size, stride) = (t.size(), t.stride());
    size.len() == 4 && stride[1] == 1 && stride[3] == size[1]
}

/// fp16 loss scaling as saved in a resume checkpoint, with PyTorch
/// GradScaler's policy: start at 2^16, halve on overflow (and skip that
/// step), double after `growth_interval` clean steps.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    pub scale: f64,
    pub growth_factor: f64,
    pub backoff_factor: f64,
    pub growth_interval: u32,
    /// Clean steps since the last change of scale.
    pub good_steps: u32,
}

impl Default for LossScaler {
    fn default() -> Self {
        LossScaler {
            scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
            good_steps: 0,
        }
    }
}
