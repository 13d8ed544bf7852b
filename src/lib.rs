//! vggctl's library: the VGG models and everything the subcommands share.
//! Nothing here knows about clap or the terminal; `cmd/` wires it together.

pub mod amp;
pub mod checkpoint;
pub mod data;
pub mod device;
pub mod export;
pub mod fsutil;
pub mod hub;
pub mod infer;
pub mod model;
pub mod optim;
pub mod pickle;
pub mod plot;
pub mod pth;
pub mod report;
pub mod shim;
pub mod train;
pub mod weights;

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
