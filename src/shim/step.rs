//! Safe wrappers over src/shim_step.cpp: the fused training step's
//! operations (issue #18) that libtorch has no autograd for.

use std::ffi::c_char;

use anyhow::Result;
use tch::Tensor;
use torch_sys::C_tensor;

use super::{call, opt_ptr, ptr};

unsafe extern "C" {
    fn vggctl_conv3x3(
        x: *mut C_tensor,
        w: *mut C_tensor,
        b: *mut C_tensor,
        relu: std::ffi::c_int,
        two_streams: std::ffi::c_int,
        fused_grad: std::ffi::c_int,
        out: *mut *mut C_tensor,
        err: *mut c_char,
        len: usize,
    ) -> std::ffi::c_int;
}

/// How [`conv3x3`] runs.
#[derive(Clone, Copy, Debug, Default)]
pub struct ConvOptions {
    /// The ReLU after the convolution, in the same operation.
    pub relu: bool,
    /// On CUDA, the weight and bias gradients on a side stream beside the
    /// input's.
    pub two_streams: bool,
    /// With `relu` and a bias, the ReLU's gradient and the bias's in one
    /// pass of vggctl's own kernel, where the batch is fp16 channels-last
    /// (elsewhere the plain ops).
    pub fused_grad: bool,
}

/// `conv2d(x, w, b)` for a 3x3 convolution with stride 1 and padding 1
/// (without a bias where `b` is None), then ReLU if `opts.relu`, as one
/// differentiable operation: forward on CUDA with the ReLU is cuDNN's
/// conv+bias+ReLU kernel; backward masks with the saved output and gives
/// the bias gradient as a sum (both in one kernel with `fused_grad`); with
/// `two_streams` on CUDA the weight and bias gradients are computed on a
/// side stream beside the input's. Under autocast it computes in autocast's
/// dtype, as the eager convolution does.
pub fn conv3x3(x: &Tensor, w: &Tensor, b: Option<&Tensor>, opts: ConvOptions) -> Result<Tensor> {
    let mut out: *mut C_tensor = std::ptr::null_mut();
    // SAFETY: the tensors are live (a null bias means none); `out` is
    // written only on success; err/len as in `call`.
    call("convolution", |err, len| unsafe {
        vggctl_conv3x3(
            ptr(x),
            ptr(w),
            opt_ptr(b),
            i32::from(opts.relu),
            i32::from(opts.two_streams),
            i32::from(opts.fused_grad),
            &mut out,
            err,
            len,
        )
    })?;
    // SAFETY: on success the shim handed over a new at::Tensor that nothing
    // else owns.
    Ok(unsafe { Tensor::from_ptr(out) })
}

unsafe extern "C" {
    fn vggctl_bn_relu(
        x: *mut C_tensor,
        weight: *mut C_tensor,
        bias: *mut C_tensor,
        running_mean: *mut C_tensor,
        running_var: *mut C_tensor,
        momentum: f64,
        eps: f64,
        out: *mut *mut C_tensor,
        err: *mut c_char,
        len: usize,
    ) -> std::ffi::c_int;
    fn vggctl_bn_relu_own(
        x: *mut C_tensor,
        weight: *mut C_tensor,
        bias: *mut C_tensor,
        running_mean: *mut C_tensor,
        running_var: *mut C_tensor,
        momentum: f64,
        eps: f64,
        out: *mut *mut C_tensor,
        err: *mut c_char,
        len: usize,
    ) -> std::ffi::c_int;
    fn vggctl_bn_relu_pool(
        x: *mut C_tensor,
        weight: *mut C_tensor,
        bias: *mut C_tensor,
        running_mean: *mut C_tensor,
        running_var: *mut C_tensor,
        momentum: f64,
        eps: f64,
        out: *mut *mut C_tensor,
        err: *mut c_char,
        len: usize,
    ) -> std::ffi::c_int;
    fn vggctl_relu_bias_grad(
        grad: *mut C_tensor,
        out: *mut C_tensor,
        grad_in: *mut *mut C_tensor,
        bias_grad: *mut *mut C_tensor,
        err: *mut c_char,
        len: usize,
    ) -> std::ffi::c_int;
    fn vggctl_compile_kernels(
        major: std::ffi::c_int,
        minor: std::ffi::c_int,
        bytes: *mut usize,
        err: *mut c_char,
        len: usize,
    ) -> std::ffi::c_int;
}

/// The fused step's training-mode BatchNorm operations: BatchNorm and the
/// ReLU after it (and a max-pool after that) as one differentiable
/// operation that updates the running statistics as BatchNorm does. Each
/// takes fp16 channels-last batches with fp32 parameters; anything else is
/// an error (the caller runs the plain ops).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FusedBn {
    /// `relu(batch_norm(x))`: cuDNN's BatchNorm with its ReLU in one pass
    /// forward and one backward. CUDA only, channels in multiples of 4.
    Cudnn,
    /// `relu(batch_norm(x))` in vggctl's own kernels (src/kernels.cu): one
    /// kernel forward after the statistics; backward, BatchNorm's two sums
    /// (the ReLU's mask is the saved output's sign), then one kernel for
    /// the input gradient. On CUDA (compiled by NVRTC) or the CPU (the
    /// same kernels run thread by thread: for tests).
    Own,
    /// `max_pool2d(relu(batch_norm(x)), 2)` in vggctl's own kernels: one
    /// kernel forward that writes only the pooled output and a 1-byte
    /// window position per output; backward, BatchNorm's sums over the
    /// pooled gradient, then one kernel for the input gradient with the
    /// pool's and the ReLU's backward folded in. Batches of 2x2 or more; on
    /// CUDA or the CPU, as `Own`.
    OwnPool,
}

impl FusedBn {
    /// The operation on `x` with BatchNorm's parameters and running
    /// statistics, updated with `momentum`.
    pub fn run(
        self,
        x: &Tensor,
        [weight, bias]: [&Tensor; 2],
        [running_mean, running_var]: [&Tensor; 2],
        momentum: f64,
        eps: f64,
    ) -> Result<Tensor> {
        let (what, f): (&str, BatchNormFn) = match self {
            FusedBn::Cudnn => ("BatchNorm+ReLU", vggctl_bn_relu),
            FusedBn::Own => ("BatchNorm+ReLU (vggctl's kernels)", vggctl_bn_relu_own),
            FusedBn::OwnPool => ("BatchNorm+ReLU+max-pool", vggctl_bn_relu_pool),
        };
        let mut out: *mut C_tensor = std::ptr::null_mut();
        // SAFETY: `f` is one of the shim's BatchNorm operations; the
        // tensors are live; the running statistics are written in place on
        // the device; `out` is written only on success; err/len as in
        // `call`.
        call(what, |err, len| unsafe {
            f(
                ptr(x),
                ptr(weight),
                ptr(bias),
                ptr(running_mean),
                ptr(running_var),
                momentum,
                eps,
                &mut out,
                err,
                len,
            )
        })?;
        // SAFETY: as in `conv3x3`.
        Ok(unsafe { Tensor::from_ptr(out) })
    }
}

/// The C signature of the shim's BatchNorm operations.
type BatchNormFn = unsafe extern "C" fn(
    *mut C_tensor,
    *mut C_tensor,
    *mut C_tensor,
    *mut C_tensor,
    *mut C_tensor,
    f64,
    f64,
    *mut *mut C_tensor,
    *mut c_char,
    usize,
) -> std::ffi::c_int;

/// The backward of `relu(conv(x) + bias)` up to the convolution, in one
/// pass of vggctl's own kernel (what [`ConvOptions::fused_grad`] runs):
/// `grad` where the saved output `out` is positive, else zero, and the
/// bias's gradient, its sum over batch and pixels in fp32. For fp16
/// channels-last batches of one shape, on CUDA or (for tests) the CPU.
pub fn relu_bias_grad(grad: &Tensor, out: &Tensor) -> Result<(Tensor, Tensor)> {
    let (mut g, mut b): (*mut C_tensor, *mut C_tensor) =
        (std::ptr::null_mut(), std::ptr::null_mut());
    // SAFETY: the tensors are live; the outputs are written only on
    // success; err/len as in `call`.
    call("ReLU+bias gradient", |err, len| unsafe {
        vggctl_relu_bias_grad(ptr(grad), ptr(out), &mut g, &mut b, err, len)
    })?;
    // SAFETY: on success the shim handed over two new at::Tensors that
    // nothing else owns.
    Ok(unsafe { (Tensor::from_ptr(g), Tensor::from_ptr(b)) })
}

/// Compiles the shim's kernels with NVRTC for compute capability
/// `major.minor`, as a GPU run does on first use; the cubin's size in bytes.
/// Needs no GPU, only NVRTC.
pub fn compile_kernels(major: i32, minor: i32) -> Result<usize> {
    let mut bytes = 0usize;
    // SAFETY: `bytes` is a live usize the shim writes; err/len as in `call`.
    call("compiling the kernels", |err, len| unsafe {
        vggctl_compile_kernels(major, minor, &mut bytes, err, len)
    })?;
    Ok(bytes)
}
