//! Safe wrappers over src/shim_dist.cpp: a c10d process group (TCPStore
//! rendezvous, Gloo backend) and its collectives. What a group is for and
//! how a run finds its peers is `crate::dist`'s.

use std::ffi::{CString, c_char, c_int, c_void};
use std::time::Duration;

use anyhow::{Context, Result};
use tch::Tensor;
use torch_sys::C_tensor;

use super::{call, ptr};

unsafe extern "C" {
    fn vggctl_dist_new(
        host: *const c_char,
        port: c_int,
        rank: c_int,
        world: c_int,
        serve: c_int,
        prefix: *const c_char,
        timeout_ms: i64,
        cuda_device: c_int,
        out: *mut *mut c_void,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    fn vggctl_dist_free(g: *mut c_void);
    fn vggctl_dist_all_reduce(
        g: *mut c_void,
        t: *mut C_tensor,
        op: c_int,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    fn vggctl_dist_broadcast(
        g: *mut c_void,
        t: *mut C_tensor,
        root: c_int,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    fn vggctl_dist_barrier(g: *mut c_void, err: *mut c_char, len: usize) -> c_int;
    fn vggctl_dist_roll_call(
        g: *mut c_void,
        rank: c_int,
        world: c_int,
        wait_ms: i64,
        present: *mut u8,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    fn vggctl_dist_await_device(
        device: c_int,
        timeout_ms: i64,
        done: *mut c_int,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    fn vggctl_dist_sum_autograd(
        g: *mut c_void,
        x: *mut C_tensor,
        out: *mut *mut C_tensor,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
}

/// How `all_reduce` combines the ranks' values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Max,
    Min,
}

/// Where and how a rank joins its group.
pub struct Rendezvous<'a> {
    pub host: &'a str,
    pub port: u16,
    pub rank: usize,
    pub world: usize,
    /// Serve the TCPStore (rank 0 when no launcher serves it).
    pub serve: bool,
    /// Prefix of this group's keys in the store.
    pub prefix: &'a str,
    /// Bound on every wait: the rendezvous and each collective.
    pub timeout: Duration,
    /// NCCL on this GPU; Gloo when None.
    pub nccl_device: Option<usize>,
}

/// A joined c10d process group with the Gloo backend.
pub struct ProcessGroup(*mut c_void);

impl ProcessGroup {
    pub fn join(r: &Rendezvous) -> Result<Self> {
        let host = CString::new(r.host).context("MASTER_ADDR holds a NUL byte")?;
        let prefix = CString::new(r.prefix).context("store prefix holds a NUL byte")?;
        let mut g: *mut c_void = std::ptr::null_mut();
        let ms = i64::try_from(r.timeout.as_millis()).unwrap_or(i64::MAX);
        // SAFETY: the strings are NUL-terminated and outlive the call; `g`
        // is written only on success; err/len as in `call`.
        call("c10d", |err, len| unsafe {
            vggctl_dist_new(
                host.as_ptr(),
                c_int::from(r.port),
                r.rank as c_int,
                r.world as c_int,
                c_int::from(r.serve),
                prefix.as_ptr(),
                ms,
                r.nccl_device.map_or(-1, |d| d as c_int),
                &mut g,
                err,
                len,
            )
        })?;
        Ok(ProcessGroup(g))
    }

    /// Combines `t` across the ranks, in place on every rank.
    pub fn all_reduce(&self, t: &Tensor, op: ReduceOp) -> Result<()> {
        let op = match op {
            ReduceOp::Sum => 0,
            ReduceOp::Max => 1,
            ReduceOp::Min => 2,
        };
        // SAFETY: `self.0` is a live group, `t` a live tensor.
        call("all-reduce", |err, len| unsafe {
            vggctl_dist_all_reduce(self.0, ptr(t), op, err, len)
        })
    }

    /// Overwrites `t` on every rank with rank `root`'s values.
    pub fn broadcast(&self, t: &Tensor, root: usize) -> Result<()> {
        // SAFETY: as in `all_reduce`.
        call("broadcast", |err, len| unsafe {
            vggctl_dist_broadcast(self.0, ptr(t), root as c_int, err, len)
        })
    }

    /// A new tensor: `x` summed over the ranks, differentiably (its backward
    /// sums the ranks' gradients, so each rank's input gets its share of
    /// every rank's loss).
    pub fn sum_autograd(&self, x: &Tensor) -> Result<Tensor> {
        let mut out: *mut C_tensor = std::ptr::null_mut();
        // SAFETY: as in `all_reduce`; `out` is written only on success.
        call("all-reduce", |err, len| unsafe {
            vggctl_dist_sum_autograd(self.0, ptr(x), &mut out, err, len)
        })?;
        // SAFETY: on success the shim handed over a new at::Tensor that
        // nothing else owns.
        Ok(unsafe { Tensor::from_ptr(out) })
    }

    /// Returns once every rank has called it.
    pub fn barrier(&self) -> Result<()> {
        // SAFETY: as in `all_reduce`.
        call("barrier", |err, len| unsafe {
            vggctl_dist_barrier(self.0, err, len)
        })
    }

    /// After a failed collective: checks in as `rank` through the store
    /// and returns, per rank of the `world`, whether it checked in within
    /// `wait` (every survivor calls this once).
    pub fn roll_call(&self, rank: usize, world: usize, wait: Duration) -> Result<Vec<bool>> {
        let mut present = vec![0u8; world];
        let ms = i64::try_from(wait.as_millis()).unwrap_or(i64::MAX);
        // SAFETY: as in `all_reduce`; `present` holds `world` bytes and
        // outlives the call.
        call("roll call", |err, len| unsafe {
            vggctl_dist_roll_call(
                self.0,
                rank as c_int,
                world as c_int,
                ms,
                present.as_mut_ptr(),
                err,
                len,
            )
        })?;
        Ok(present.into_iter().map(|p| p != 0).collect())
    }
}

/// Waits at most `timeout` for the work queued so far on GPU `device`'s
/// current stream, polling: true once it finished, false if the time ran
/// out (the work goes on). True at once in a build without CUDA.
pub fn await_device(device: usize, timeout: Duration) -> Result<bool> {
    let ms = i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX);
    let mut done: c_int = 1;
    // SAFETY: `done` outlives the call; err/len as in `call`.
    call("waiting for the GPU", |err, len| unsafe {
        vggctl_dist_await_device(device as c_int, ms, &mut done, err, len)
    })?;
    Ok(done == 1)
}

// SAFETY: c10d's process groups are used from any thread (PyTorch's own
// DDP issues collectives from autograd threads); every call from here takes
// the group by pointer and c10d serializes its work queue internally.
unsafe impl Send for ProcessGroup {}
unsafe impl Sync for ProcessGroup {}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: `self.0` came from `vggctl_dist_new` and is freed once.
        unsafe { vggctl_dist_free(self.0) }
    }
}
