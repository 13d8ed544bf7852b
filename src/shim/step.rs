//! Safe wrappers over src/shim_step.cpp: the fused training step's
//! operations (issue #18) that libtorch has no autograd for.

use std::ffi::c_char;

use anyhow::Result;
use tch::Tensor;
use torch_sys::C_tensor;

use super::{call, ptr};

unsafe extern "C" {
    fn vggctl_conv_bias_relu(
        x: *mut C_tensor,
        w: *mut C_tensor,
        b: *mut C_tensor,
        out: *mut *mut C_tensor,
        err: *mut c_char,
        len: usize,
    ) -> std::ffi::c_int;
}

/// `relu(conv2d(x, w, b))` for a 3x3 convolution with stride 1 and padding
/// 1, as one differentiable operation: forward on CUDA is cuDNN's
/// conv+bias+ReLU kernel; backward masks with the saved output and gives
/// the bias gradient as a sum. Under autocast it computes in autocast's
/// dtype, as the eager convolution does.
pub fn conv_bias_relu(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    let mut out: *mut C_tensor = std::ptr::null_mut();
    // SAFETY: the tensors are live; `out` is written only on success;
    // err/len as in `call`.
    call("conv+bias+ReLU", |err, len| unsafe {
        vggctl_conv_bias_relu(ptr(x), ptr(w), ptr(b), &mut out, err, len)
    })?;
    // SAFETY: on success the shim handed over a new at::Tensor that nothing
    // else owns.
    Ok(unsafe { Tensor::from_ptr(out) })
}
