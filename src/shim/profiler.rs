//! libtorch's profiler (Kineto, as `torch.profiler` runs it) over
//! src/shim.cpp: the operators a stretch of work called on the host and
//! the kernels it ran on the GPU. What is made of them is
//! `train::profile`'s.

use std::ffi::{CStr, c_char, c_int, c_void};

use anyhow::Result;

use super::call;

unsafe extern "C" {
    fn vggctl_profiler_start(cuda: c_int, err: *mut c_char, len: usize) -> c_int;
    fn vggctl_profiler_stop(
        ctx: *mut c_void,
        sink: extern "C" fn(*mut c_void, *const c_char, c_int, u64, u64, u64),
        err: *mut c_char,
        len: usize,
    ) -> c_int;
}

/// One recorded event: an operator on a host thread, or a kernel (or
/// copy) on a GPU stream.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub name: String,
    pub gpu: bool,
    /// The host thread or GPU stream it ran on.
    pub lane: u64,
    pub start_ns: u64,
    pub duration_ns: u64,
}

/// Starts recording: host operators, and GPU kernels when `cuda`.
pub fn start(cuda: bool) -> Result<()> {
    // SAFETY: takes a flag and the error buffer `call` provides.
    call("starting libtorch's profiler", |err, len| unsafe {
        vggctl_profiler_start(c_int::from(cuda), err, len)
    })
}

extern "C" fn push_event(
    ctx: *mut c_void,
    name: *const c_char,
    gpu: c_int,
    lane: u64,
    start_ns: u64,
    duration_ns: u64,
) {
    // SAFETY: `ctx` is the `Vec<Event>` that `stop` passed, alive for the
    // call; `name` is a NUL-terminated string the shim owns for the call.
    unsafe {
        let events = &mut *(ctx as *mut Vec<Event>);
        events.push(Event {
            name: CStr::from_ptr(name).to_string_lossy().into_owned(),
            gpu: gpu != 0,
            lane,
            start_ns,
            duration_ns,
        });
    }
}

/// Stops recording and returns what was recorded.
pub fn stop() -> Result<Vec<Event>> {
    let mut events: Vec<Event> = Vec::new();
    let ctx = &mut events as *mut Vec<Event> as *mut c_void;
    // SAFETY: `push_event` writes only into `events`, which outlives the call.
    call("stopping libtorch's profiler", |err, len| unsafe {
        vggctl_profiler_stop(ctx, push_event, err, len)
    })?;
    Ok(events)
}
