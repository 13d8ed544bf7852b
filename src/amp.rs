//! Mixed precision without a GradScaler in tch: dynamic loss scaling for
//! fp16 (skip a step whose gradients overflow and halve the scale; double it
//! after a run of clean steps), and the channels-last memory layout.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Fp32,
    Tf32,
    Fp16,
    Bf16,
}

/// What a run actually uses, after degrading what the device cannot do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub precision: Precision,
    pub channels_last: bool,
}

/// Degrades unsupported requests with a warning (through `warn`), never an error.
pub fn resolve(
    precision: Precision,
    channels_last: bool,
    device: Device,
    warn: &mut dyn FnMut(String),
) -> Resolved {
    let cuda = device.is_cuda();
    let precision = match precision {
        Precision::Fp32 => Precision::Fp32,
        p if !cuda => {
            warn(format!("--precision {p:?} needs a CUDA device; training in fp32").to_lowercase());
            Precision::Fp32
        }
        Precision::Fp16 => Precision::Fp16,
        // tch binds neither at::autocast::set_autocast_dtype (bf16) nor the
        // TF32 switches; both need the C++ shim that is not written yet.
        p => {
            warn(format!("--precision {p:?} is not available in this build (tch binds no switch for it); training in fp32").to_lowercase());
            Precision::Fp32
        }
    };
    Resolved {
        precision,
        channels_last,
    }
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

/// PyTorch GradScaler's policy: start at 2^16, halve on overflow, double
/// after `growth_interval` clean steps.
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

impl LossScaler {
    /// Looks at unscaled gradients; on inf/nan halves the scale and returns
    /// false (the caller skips the step), else counts a clean step.
    pub fn check_and_update(&mut self, grads: &Tensor) -> bool {
        let finite = grads
            .isfinite()
            .all()
            .to_kind(Kind::Int64)
            .to_device(Device::Cpu)
            .int64_value(&[])
            == 1;
        self.update(finite);
        finite
    }

    pub fn update(&mut self, finite: bool) {
        if finite {
            self.good_steps += 1;
            if self.good_steps >= self.growth_interval {
                self.scale *= self.growth_factor;
                self.good_steps = 0;
            }
        } else {
            self.scale *= self.backoff_factor;
            self.good_steps = 0;
        }
    }
}
