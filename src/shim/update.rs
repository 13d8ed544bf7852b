//! libtorch's fused optimizer kernels (`_fused_sgd_`, `_fused_adam_`, `_fused_adamw_`)
//! over src/shim.cpp: one multi-tensor update of a parameter group.

use std::ffi::{c_char, c_int};

use anyhow::Result;
use tch::Tensor;
use torch_sys::C_tensor;

use super::{call, opt_ptr, ptr};

unsafe extern "C" {
    fn vggctl_fused_sgd(
        params: *const *mut C_tensor,
        grads: *const *mut C_tensor,
        bufs: *const *mut C_tensor,
        n: usize,
        weight_decay: f64,
        momentum: f64,
        lr: *mut C_tensor,
        nesterov: c_int,
        found_inf: *mut C_tensor,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    fn vggctl_fused_adam(
        params: *const *mut C_tensor,
        grads: *const *mut C_tensor,
        exp_avgs: *const *mut C_tensor,
        exp_avg_sqs: *const *mut C_tensor,
        max_exp_avg_sqs: *const *mut C_tensor,
        n: usize,
        step: *mut C_tensor,
        lr: *mut C_tensor,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        decoupled: c_int,
        found_inf: *mut C_tensor,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
}

/// SGD's hyper-parameters for `fused_sgd`.
pub struct SgdHyper {
    pub weight_decay: f64,
    pub momentum: f64,
    pub nesterov: bool,
}

/// The tensors of one parameter group for a fused update: parameters,
/// gradients and the optimizer's state, the same number of each, every
/// parameter dense and of one dtype and shape with its gradient and state,
/// all on one device.
pub struct Group<'a> {
    pub params: &'a [Tensor],
    pub grads: &'a [Tensor],
    /// SGD: the momentum buffers (none without momentum). Adam(W): the first
    /// and second moments, and AMSGrad's largest second moments (none
    /// without).
    pub state: [&'a [Tensor]; 3],
}

impl Group<'_> {
    /// The tensors' handles as the shim takes them, after checking that
    /// `list` is as long as the parameters' (`n`).
    fn pointers(list: &[Tensor], n: usize, what: &str) -> Result<Vec<*mut C_tensor>> {
        if list.len() != n {
            anyhow::bail!(
                "a fused update got {} {what} for {n} parameters",
                list.len()
            );
        }
        Ok(list.iter().map(ptr).collect())
    }
}

/// One SGD update of `group` by libtorch's fused kernel (`_fused_sgd_`), in
/// place; its momentum buffers are `group.state[0]` (empty without
/// momentum), `lr` a 0-dim float tensor on the parameters' device. With
/// `found_inf` (a 0-dim float, 1 when an fp16 step overflowed) the kernel
/// changes nothing on such a step.
pub fn fused_sgd(
    group: &Group,
    lr: &Tensor,
    hyper: &SgdHyper,
    found_inf: Option<&Tensor>,
) -> Result<()> {
    let n = group.params.len();
    let params = Group::pointers(group.params, n, "parameters")?;
    let grads = Group::pointers(group.grads, n, "gradients")?;
    let bufs = match group.state[0] {
        [] => None,
        bufs => Some(Group::pointers(bufs, n, "momentum buffers")?),
    };
    // SAFETY: every pointer is a live tch tensor (or null where the C++
    // side accepts null) that outlives the call, each array holds `n`
    // of them; err/len as above.
    call("the fused SGD update", |err, len| unsafe {
        vggctl_fused_sgd(
            params.as_ptr(),
            grads.as_ptr(),
            bufs.as_ref().map_or(std::ptr::null(), |b| b.as_ptr()),
            n,
            hyper.weight_decay,
            hyper.momentum,
            ptr(lr),
            c_int::from(hyper.nesterov),
            opt_ptr(found_inf),
            err,
            len,
        )
    })
}

/// Adam's hyper-parameters for `fused_adam`.
pub struct AdamHyper {
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub eps: f64,
    /// AdamW's decoupled weight decay, else Adam's L2 term.
    pub decoupled: bool,
}

/// One Adam or AdamW update of `group` by libtorch's fused kernel
/// (`_fused_adam_` / `_fused_adamw_`), in place, its moments
/// `group.state` (AMSGrad with a third list); `step` counts the updates, this one included (a 0-dim
/// float tensor on the parameters' device). Otherwise as `fused_sgd`.
pub fn fused_adam(
    group: &Group,
    step: &Tensor,
    lr: &Tensor,
    hyper: &AdamHyper,
    found_inf: Option<&Tensor>,
) -> Result<()> {
    let n = group.params.len();
    let params = Group::pointers(group.params, n, "parameters")?;
    let grads = Group::pointers(group.grads, n, "gradients")?;
    let exp_avgs = Group::pointers(group.state[0], n, "first moments")?;
    let exp_avg_sqs = Group::pointers(group.state[1], n, "second moments")?;
    let maxes = match group.state[2] {
        [] => None,
        maxes => Some(Group::pointers(maxes, n, "largest second moments")?),
    };
    // SAFETY: as in `fused_sgd`.
    call("the fused Adam update", |err, len| unsafe {
        vggctl_fused_adam(
            params.as_ptr(),
            grads.as_ptr(),
            exp_avgs.as_ptr(),
            exp_avg_sqs.as_ptr(),
            maxes.as_ref().map_or(std::ptr::null(), |m| m.as_ptr()),
            n,
            ptr(step),
            ptr(lr),
            hyper.beta1,
            hyper.beta2,
            hyper.weight_decay,
            hyper.eps,
            c_int::from(hyper.decoupled),
            opt_ptr(found_inf),
            err,
            len,
        )
    })
}
