//! vggctl's library: the VGG models and everything the subcommands share.
//! Nothing here knows about clap or the terminal; `cmd/` wires it together,
//! and what a user should see (progress, warnings) leaves through the
//! callbacks and observers the commands supply.
//!
//! Dependencies point down:
//! - bottom: `shim` (the only `unsafe`), `fsutil`, `device`, `choice`,
//!   `dist` (the ranks of a data-parallel run, c10d's collectives),
//!   `formats` (pickle, numpy, `.pth`, safetensors);
//! - `model`, `data`, `optim`, then `numerics` (runs a model in a precision
//!   and layout);
//! - `checkpoint`, `hub`, `report`, `infer` (how eval and predict run a model);
//! - `eval`, `export`, then `train`.

pub mod checkpoint;
pub mod choice;
pub mod data;
pub mod device;
pub mod dist;
pub mod eval;
pub mod export;
pub mod formats;
pub mod fsutil;
pub mod hub;
pub mod infer;
pub mod model;
pub mod num;
pub mod numerics;
pub mod optim;
pub mod report;
pub mod shim;
pub mod train;

/// Returned when Ctrl-C stopped a run after it saved its state; the binary
/// exits with 130.
#[derive(Debug)]
pub struct Interrupted(pub String);

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Interrupted {}

/// libtorch's random generator is the process's: a unit test that seeds it
/// or draws from it holds this, so that tests running side by side do not
/// draw from each other's sequence.
#[cfg(test)]
pub(crate) fn seeded() -> std::sync::MutexGuard<'static, ()> {
    static SEEDED: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SEEDED.lock().unwrap_or_else(|e| e.into_inner())
}
