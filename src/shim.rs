//! Safe wrappers over src/shim.cpp: the libtorch calls tch does not bind
//! (autocast dtype, CPU autocast, TF32, bf16 support, CUDA memory statistics, CUDA
//! graphs, the fused SGD, Adam and AdamW updates; c10d's process group in `dist`,
//! over src/shim_dist.cpp; the fused step's operations in `step`, over
//! src/shim_step.cpp). This module and those under it are the only ones
//! with `unsafe` code of vggctl's own.
//!
//! Every call reports a C++ exception as an `Err` with libtorch's message;
//! on a build or a device without CUDA they answer "unsupported" rather
//! than fail, so callers degrade with a warning.

use std::ffi::{CStr, c_char, c_int, c_void};

use anyhow::{Result, bail};
use tch::{Device, Tensor};
use torch_sys::C_tensor;

pub mod dist;
pub mod profiler;
pub mod step;
mod update;

pub use update::{AdamHyper, Group, SgdHyper, fused_adam, fused_sgd};

const ERR_LEN: usize = 1024;

unsafe extern "C" {
    fn vggctl_install_stop_signals();
    fn vggctl_stop_signal() -> c_int;
    fn vggctl_send_signal(pid: c_int, sig: c_int) -> c_int;
    fn vggctl_exit_now(code: c_int) -> !;
    fn vggctl_temp_add(path: *const c_char) -> c_int;
    fn vggctl_temp_remove(slot: c_int);
    fn vggctl_one_cpu_thread_here() -> c_int;
    fn vggctl_map_big_blocks(bytes: usize) -> c_int;
    fn vggctl_pooled_bytes(
        dims: *const i64,
        ndims: usize,
        out: *mut *mut C_tensor,
        data: *mut *mut u8,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    fn vggctl_jit_save_bytes(
        module: *mut c_void,
        ctx: *mut c_void,
        sink: extern "C" fn(*mut c_void, *const c_char, usize),
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    fn vggctl_shim_has_cuda() -> c_int;
    fn vggctl_set_autocast_dtype_cuda(dtype: c_int, err: *mut c_char, len: usize) -> c_int;
    fn vggctl_set_autocast_cache(on: c_int, err: *mut c_char, len: usize) -> c_int;
    fn vggctl_cpu_autocast_enter(prev: *mut c_int, err: *mut c_char, len: usize) -> c_int;
    fn vggctl_cpu_autocast_leave(prev: c_int, err: *mut c_char, len: usize) -> c_int;
    fn vggctl_set_tf32(on: c_int, err: *mut c_char, len: usize) -> c_int;
    fn vggctl_set_cudnn_deterministic(on: c_int, err: *mut c_char, len: usize) -> c_int;
    fn vggctl_cudnn_deterministic() -> c_int;
    fn vggctl_cuda_capability(
        device: c_int,
        out: *mut c_int,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    fn vggctl_cuda_peak_bytes(
        device: c_int,
        out: *mut i64,
        reset: c_int,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    fn vggctl_graph_new(device: c_int, g: *mut *mut c_void, err: *mut c_char, len: usize) -> c_int;
    fn vggctl_graph_free(g: *mut c_void);
    fn vggctl_graph_enter(g: *mut c_void, err: *mut c_char, len: usize) -> c_int;
    fn vggctl_graph_leave(g: *mut c_void, err: *mut c_char, len: usize) -> c_int;
    fn vggctl_graph_capture_begin(g: *mut c_void, err: *mut c_char, len: usize) -> c_int;
    fn vggctl_graph_capture_end(g: *mut c_void, err: *mut c_char, len: usize) -> c_int;
    fn vggctl_graph_replay(g: *mut c_void, err: *mut c_char, len: usize) -> c_int;
}

/// A tensor handle for the shim. libtorch's in-place kernels write through
/// the shared storage, so a shared reference is enough on the Rust side.
fn ptr(t: &Tensor) -> *mut C_tensor {
    t.as_ptr() as *mut C_tensor
}

fn opt_ptr(t: Option<&Tensor>) -> *mut C_tensor {
    t.map_or(std::ptr::null_mut(), ptr)
}

/// Runs one shim call with an error buffer; a non-zero status becomes an error.
fn call(what: &str, f: impl FnOnce(*mut c_char, usize) -> c_int) -> Result<()> {
    let mut buf = [0 as c_char; ERR_LEN];
    if f(buf.as_mut_ptr(), ERR_LEN) == 0 {
        return Ok(());
    }
    // SAFETY: the shim always NUL-terminates what it copies into `buf`, and
    // `buf` starts zeroed, so it holds a C string either way.
    let msg = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy();
    let first = msg.lines().next().unwrap_or("").trim();
    bail!("{what}: {first}")
}

/// From now on the first SIGINT (Ctrl-C) or SIGTERM only records itself
/// (see [`stop_signal`]) and a second one ends the process at once (exit
/// 128 + signal) without running exit handlers, so libtorch's threads are
/// never torn down while they run.
pub fn install_stop_signals() {
    // SAFETY: installs a handler that only writes to stderr, stores a flag
    // and calls _exit, all async-signal-safe.
    unsafe { vggctl_install_stop_signals() }
}

/// The signal that asked the process to stop (2 for SIGINT, 15 for
/// SIGTERM), once [`install_stop_signals`] has seen one.
pub fn stop_signal() -> Option<i32> {
    // SAFETY: reads a sig_atomic_t.
    let sig = unsafe { vggctl_stop_signal() };
    (sig != 0).then_some(sig)
}

/// A file being written that a signal ending the process (SIGINT, SIGTERM,
/// SIGHUP, where nothing else handles them; a training run's second
/// Ctrl-C) removes first, until this is dropped.
pub struct RemovedOnSignal(c_int);

/// Registers `path`, a file being written, to be removed should a signal
/// end the process before the returned guard is dropped (a path with a NUL
/// byte, or over 4,095 bytes, is not registered).
pub fn remove_on_signal(path: &std::path::Path) -> RemovedOnSignal {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return RemovedOnSignal(-1);
    };
    // SAFETY: `c` is a NUL-terminated string the shim copies before
    // returning; the handlers it installs make only async-signal-safe calls.
    RemovedOnSignal(unsafe { vggctl_temp_add(c.as_ptr()) })
}

impl Drop for RemovedOnSignal {
    fn drop(&mut self) {
        // SAFETY: releases this guard's slot (-1 is ignored).
        unsafe { vggctl_temp_remove(self.0) }
    }
}

/// Sends signal `sig` to process `pid` (a child this process started);
/// a process that has ended already is no error.
pub fn send_signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) with a child's PID; it touches no memory of ours.
    let _ = unsafe { vggctl_send_signal(pid as c_int, sig) };
}

/// Ends the process with `code` once stdout and stderr (Rust's and C's)
/// are flushed, skipping the C++ static destructors: libtorch's undo its
/// operator registrations one by one, about 0.1 s of every command's
/// exit, and nothing of ours waits on them (files are written and closed,
/// children waited for, before `main` gets here).
pub fn exit_now(code: u8) -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: flushes C's streams and calls _exit; no memory of ours is
    // touched afterwards, as the process ends.
    unsafe { vggctl_exit_now(c_int::from(code)) }
}

/// libtorch's CPU operators called from this thread (a data-loading
/// worker) use this thread only, not a team of all cores each; false where
/// that could not be arranged.
pub fn one_cpu_thread_here() -> bool {
    // SAFETY: sets a per-thread OpenMP setting; touches no memory of ours.
    unsafe { vggctl_one_cpu_thread_here() != 0 }
}

/// What each data-loading thread runs first: libtorch's CPU operators
/// there use that thread alone ([`one_cpu_thread_here`]), and blocks of
/// 4 MiB and more (a batch of 28 or more images of 224 x 224) are mapped
/// on their own ([`map_big_blocks`]), so that a streamed run's peak memory
/// stays flat.
pub fn data_worker_setup() {
    one_cpu_thread_here();
    map_big_blocks(4 << 20);
}

/// Memory blocks of `bytes` or more are mapped from the kernel on their
/// own and given back when freed (glibc's `M_MMAP_THRESHOLD`, fixed):
/// batches of images, made by one thread and freed by another, then never
/// pile up in malloc's heaps, whose peak would grow over a long run.
/// False where malloc has no such setting.
pub fn map_big_blocks(bytes: usize) -> bool {
    // SAFETY: mallopt(3) changes a malloc setting; touches no memory of ours.
    unsafe { vggctl_map_big_blocks(bytes) != 0 }
}

/// A new uint8 tensor of `shape` on the CPU whose bytes `fill` writes in
/// place (a batch of images, written by the data-loading threads, with no
/// copy). Its memory is reused: when the tensor is freed its bytes wait
/// for the next batch of that size (a few are kept), so that a run faults
/// pages in for its first batches only (see src/shim.cpp). The bytes
/// `fill` sees are an earlier batch's or zeros.
pub fn filled_u8(shape: &[i64], fill: &mut dyn FnMut(&mut [u8])) -> Result<Tensor> {
    let n: i64 = shape.iter().product();
    let (mut out, mut data) = (std::ptr::null_mut(), std::ptr::null_mut());
    call("allocating a batch", |err, len| {
        // SAFETY: `shape` is `shape.len()` sizes; the shim writes a new
        // tensor handle and its data pointer into `out` and `data`.
        unsafe { vggctl_pooled_bytes(shape.as_ptr(), shape.len(), &mut out, &mut data, err, len) }
    })?;
    // SAFETY: `out` is a new heap-allocated torch::Tensor handle, which
    // the returned Tensor now owns (and frees).
    let t = unsafe { Tensor::from_ptr(out) };
    // SAFETY: `data` is the start of `t`'s storage, at least `n` bytes
    // (one byte for an empty shape), initialized (zeroed when new, or
    // written by an earlier batch), referred to by no other handle; the
    // slice lives only while `fill` runs, and `t` outlives it.
    let bytes = unsafe { std::slice::from_raw_parts_mut(data, n as usize) };
    fill(bytes);
    Ok(t)
}

extern "C" fn append_bytes(ctx: *mut c_void, data: *const c_char, len: usize) {
    // SAFETY: `ctx` is the `Vec<u8>` that `jit_save_bytes` passed, alive for
    // the call; `data` points to `len` bytes owned by the shim for the call.
    unsafe {
        let out = &mut *(ctx as *mut Vec<u8>);
        out.extend_from_slice(std::slice::from_raw_parts(data as *const u8, len));
    }
}

/// A TorchScript module serialized as `torch.jit.save` writes it, in memory.
pub fn jit_save_bytes(module: &tch::CModule) -> Result<Vec<u8>> {
    const _: () = assert!(size_of::<tch::CModule>() == size_of::<*mut c_void>());
    // SAFETY: tch's CModule is a struct of one field, the torch::jit::Module
    // pointer it owns (checked in size above); it is only borrowed here.
    let handle: *mut c_void = unsafe { std::mem::transmute_copy(module) };
    let mut out: Vec<u8> = Vec::new();
    let ctx = &mut out as *mut Vec<u8> as *mut c_void;
    // SAFETY: the module outlives the call; `append_bytes` writes only into `out`.
    call("saving TorchScript", |err, len| unsafe {
        vggctl_jit_save_bytes(handle, ctx, append_bytes, err, len)
    })?;
    Ok(out)
}

/// Whether this binary was built with the shim's CUDA half (CUDA headers found).
pub fn has_cuda() -> bool {
    // SAFETY: takes no arguments, touches no state.
    unsafe { vggctl_shim_has_cuda() == 1 }
}

fn cuda_index(device: Device) -> Option<c_int> {
    match device {
        Device::Cuda(i) => Some(i as c_int),
        _ => None,
    }
}

/// The dtype CUDA autocast computes in on this thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AutocastDtype {
    Float16,
    BFloat16,
}

pub fn set_autocast_dtype(dtype: AutocastDtype) -> Result<()> {
    let code = match dtype {
        AutocastDtype::Float16 => 0,
        AutocastDtype::BFloat16 => 1,
    };
    // SAFETY: `err`/`len` describe the live buffer `call` owns.
    call("setting the autocast dtype", |err, len| unsafe {
        vggctl_set_autocast_dtype_cuda(code, err, len)
    })
}

/// Runs `f` under CPU autocast to bfloat16 (`torch.autocast("cpu")`).
pub fn cpu_autocast<T>(f: impl FnOnce() -> T) -> Result<T> {
    let mut prev: c_int = 0;
    // SAFETY: `prev` outlives the call; err/len as above.
    call("starting CPU autocast", |err, len| unsafe {
        vggctl_cpu_autocast_enter(&mut prev, err, len)
    })?;
    let out = f();
    // SAFETY: as above; entered just before.
    call("ending CPU autocast", |err, len| unsafe {
        vggctl_cpu_autocast_leave(prev, err, len)
    })?;
    Ok(out)
}

/// Autocast's cache of cast weights; off while a CUDA graph is captured.
pub fn set_autocast_cache(on: bool) -> Result<()> {
    // SAFETY: as above.
    call("switching the autocast cache", |err, len| unsafe {
        vggctl_set_autocast_cache(c_int::from(on), err, len)
    })
}

/// TensorFloat-32 in cuBLAS matmuls and cuDNN convolutions.
pub fn set_tf32(on: bool) -> Result<()> {
    // SAFETY: as above.
    call("switching TF32", |err, len| unsafe {
        vggctl_set_tf32(c_int::from(on), err, len)
    })
}

/// cuDNN restricted to deterministic algorithms, without autotuning
/// (`--deterministic`): the same run gives the same numbers.
pub fn set_cudnn_deterministic(on: bool) -> Result<()> {
    // SAFETY: as above.
    call("switching cuDNN determinism", |err, len| unsafe {
        vggctl_set_cudnn_deterministic(c_int::from(on), err, len)
    })
}

pub fn cudnn_deterministic() -> bool {
    // SAFETY: reads one flag of libtorch's global context.
    unsafe { vggctl_cudnn_deterministic() == 1 }
}

/// The major compute capability of `device`; None on CPU and in builds
/// without the CUDA half.
pub fn compute_capability(device: Device) -> Result<Option<i32>> {
    let Some(i) = cuda_index(device).filter(|_| has_cuda()) else {
        return Ok(None);
    };
    let mut out: c_int = 0;
    // SAFETY: `out` outlives the call; err/len as above.
    call("querying the GPU", |err, len| unsafe {
        vggctl_cuda_capability(i, &mut out, err, len)
    })?;
    Ok(Some(out))
}

/// Whether `device` computes natively in bfloat16 (compute capability >= 8).
pub fn bf16_supported(device: Device) -> Result<bool> {
    Ok(compute_capability(device)?.is_some_and(|m| m >= 8))
}

/// Peak bytes held by tensors on `device` since the last reset (what
/// `torch.cuda.max_memory_allocated` reports); None on CPU or without the
/// CUDA half. `reset` starts a new peak.
pub fn peak_memory(device: Device, reset: bool) -> Result<Option<i64>> {
    let Some(i) = cuda_index(device).filter(|_| has_cuda()) else {
        return Ok(None);
    };
    let mut out: i64 = 0;
    // SAFETY: `out` outlives the call; err/len as above.
    call("reading CUDA memory statistics", |err, len| unsafe {
        vggctl_cuda_peak_bytes(i, &mut out, c_int::from(reset), err, len)
    })?;
    Ok(Some(out))
}

/// A CUDA graph (libtorch's `at::cuda::CUDAGraph`) with the side stream it
/// warms up and captures on. Capture records kernels without running them;
/// `replay` runs them on the current stream with the same tensor addresses,
/// so everything a graph reads or writes must stay allocated while it lives.
pub struct CudaGraph {
    ptr: *mut c_void,
    entered: bool,
    warmup_left: usize,
}

/// Eager warm-up steps on the graph's stream before the capture: they
/// settle cuDNN's algorithm choices and cuBLAS's workspace, which a capture
/// must not create.
const GRAPH_WARMUP_STEPS: usize = 3;

impl CudaGraph {
    pub fn new(device: Device) -> Result<Self> {
        let Some(i) = cuda_index(device) else {
            bail!("CUDA graphs need a CUDA device");
        };
        let mut ptr = std::ptr::null_mut();
        // SAFETY: `ptr` outlives the call and receives a new object or stays null.
        call("creating a CUDA graph", |err, len| unsafe {
            vggctl_graph_new(i, &mut ptr, err, len)
        })?;
        Ok(CudaGraph {
            ptr,
            entered: false,
            warmup_left: GRAPH_WARMUP_STEPS,
        })
    }

    /// True for the first few calls (counting them): the caller runs those
    /// steps eagerly on the side stream, then captures the next one.
    pub fn warming_up(&mut self) -> bool {
        let warm = self.warmup_left > 0;
        self.warmup_left = self.warmup_left.saturating_sub(1);
        warm
    }

    /// Whether the warm-up is over (the next step captures or replays).
    pub fn warmed_up(&self) -> bool {
        self.warmup_left == 0
    }

    /// Runs `f` on the graph's side stream (after the work queued so far;
    /// the stream that was current then waits for it).
    pub fn on_side_stream<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        // SAFETY: `self.ptr` is a live graph until drop.
        call("entering the graph's stream", |err, len| unsafe {
            vggctl_graph_enter(self.ptr, err, len)
        })?;
        self.entered = true;
        let out = f(self);
        self.entered = false;
        // SAFETY: as above; entered just before.
        let left = call("leaving the graph's stream", |err, len| unsafe {
            vggctl_graph_leave(self.ptr, err, len)
        });
        let out = out?;
        left?;
        Ok(out)
    }

    /// Captures what `f` enqueues (without running it). Call inside
    /// `on_side_stream`, after a few eager warm-up runs of the same work.
    pub fn capture<T>(&mut self, f: impl FnOnce() -> T) -> Result<T> {
        if !self.entered {
            bail!("a CUDA graph captures on its own stream (on_side_stream)");
        }
        // Autocast's cached casts of the weights would be made inside the
        // capture and freed with it; every capture runs without the cache.
        set_autocast_cache(false)?;
        // SAFETY: `self.ptr` is a live graph.
        let begun = call("starting the CUDA graph capture", |err, len| unsafe {
            vggctl_graph_capture_begin(self.ptr, err, len)
        });
        if let Err(e) = begun {
            set_autocast_cache(true)?;
            return Err(e);
        }
        // An operation that cannot be captured makes tch panic; that must
        // end the capture and come back as an error, not as a crash. (The
        // binary's panic hook, in main.rs, prints nothing for it.)
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        // SAFETY: as above; capture was begun.
        let ended = call("ending the CUDA graph capture", |err, len| unsafe {
            vggctl_graph_capture_end(self.ptr, err, len)
        });
        set_autocast_cache(true)?;
        match out {
            Ok(out) => ended.map(|_| out),
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("unknown error");
                let first = msg.lines().next().unwrap_or("").trim();
                bail!(
                    "capturing the step in a CUDA graph failed (run without --cuda-graphs): {first}"
                )
            }
        }
    }

    pub fn replay(&self) -> Result<()> {
        // SAFETY: `self.ptr` is a live graph.
        call("replaying the CUDA graph", |err, len| unsafe {
            vggctl_graph_replay(self.ptr, err, len)
        })
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        // SAFETY: created by vggctl_graph_new, freed once here.
        unsafe { vggctl_graph_free(self.ptr) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_answers_unsupported_without_failing() {
        assert!(!bf16_supported(Device::Cpu).unwrap());
        assert_eq!(peak_memory(Device::Cpu, true).unwrap(), None);
        assert!(CudaGraph::new(Device::Cpu).is_err());
        // The dtype and TF32 switches are plain settings: harmless without a GPU.
        set_autocast_dtype(AutocastDtype::BFloat16).unwrap();
        set_autocast_dtype(AutocastDtype::Float16).unwrap();
        set_tf32(false).unwrap();
    }

    /// A batch holds what `fill` wrote; its memory is taken again only
    /// once no tensor (a view either) refers to it.
    #[test]
    fn batches_are_written_in_place_and_their_memory_reused() {
        // A size no other test asks for.
        let shape = [3, 5, 7, 11];
        let pattern = |b: &mut [u8]| b.iter_mut().enumerate().for_each(|(i, v)| *v = i as u8);
        let a = filled_u8(&shape, &mut |b| pattern(b)).unwrap();
        assert_eq!(a.size(), shape);
        let expected = Tensor::arange(3 * 5 * 7 * 11, (tch::Kind::Int64, Device::Cpu))
            .remainder(256)
            .to_kind(tch::Kind::Uint8);
        assert!(a.view([-1]).equal(&expected));
        let (first, view) = (a.data_ptr() as usize, a.narrow(0, 1, 1));
        drop(a);
        let b = filled_u8(&shape, &mut |_| {}).unwrap();
        assert_ne!(b.data_ptr() as usize, first, "taken while a view held it");
        drop(view);
        let c = filled_u8(&shape, &mut |b| assert_eq!(b[300], 300u16 as u8)).unwrap();
        assert_eq!(c.data_ptr() as usize, first);
        let other = filled_u8(&[3, 5, 7, 12], &mut |_| {}).unwrap();
        assert_ne!(other.data_ptr() as usize, b.data_ptr() as usize);
    }

    #[test]
    fn cpu_autocast_computes_in_bf16_inside_only() {
        let a = Tensor::ones([4, 4], (tch::Kind::Float, Device::Cpu));
        let inside = cpu_autocast(|| a.matmul(&a)).unwrap();
        assert_eq!(inside.kind(), tch::Kind::BFloat16);
        // Nested regions restore the outer state, and the outermost ends it.
        let nested = cpu_autocast(|| cpu_autocast(|| a.matmul(&a)).unwrap().kind()).unwrap();
        assert_eq!(nested, tch::Kind::BFloat16);
        assert_eq!(a.matmul(&a).kind(), tch::Kind::Float);
    }
}
