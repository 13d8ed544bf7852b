//! Data-parallel runs: which rank this process is, how it finds its peers
//! (the environment `torchrun` or Slurm's `srun` set), and the collectives
//! training and evaluation use, through PyTorch's c10d (`shim::dist`).
//!
//! A process started without a launcher is a world of one: every
//! collective is then a no-op, so single-process code paths need no
//! special case.

mod launch;
pub mod sampler;

pub use launch::Launch;
pub use sampler::Sampler;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{Result, bail};
use tch::{Device, Kind, Tensor};

use crate::choice::Choice;
use crate::model::SumAcross;
use crate::shim::dist::{ProcessGroup, ReduceOp, Rendezvous, await_device};

/// The collective backend: Gloo (CPU tensors, any device through host
/// copies) or NCCL (CUDA tensors on the rank's GPU); `Auto` is resolved
/// with the run's device ([`Backend::resolve`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Auto,
    Gloo,
    Nccl,
}

/// Whether this build has c10d's NCCL backend (build.rs compiles it into
/// the shim when the wheel's NCCL and CCCL headers are there).
pub const NCCL_BUILT: bool = cfg!(vggctl_nccl);

impl Choice for Backend {
    const ALL: &'static [Self] = &[Backend::Auto, Backend::Gloo, Backend::Nccl];
    fn name(self) -> &'static str {
        match self {
            Backend::Auto => "auto",
            Backend::Gloo => "gloo",
            Backend::Nccl => "nccl",
        }
    }
    fn help(self) -> &'static str {
        match self {
            Backend::Auto => "NCCL on CUDA, Gloo on a CPU (the default)",
            Backend::Gloo => "PyTorch's Gloo (any device; CUDA through host copies)",
            Backend::Nccl => "NVIDIA NCCL (CUDA)",
        }
    }
}

impl Backend {
    /// The backend a run on `device` uses: `Auto` is NCCL on CUDA (when
    /// built with it) and Gloo elsewhere; NCCL is refused off CUDA.
    pub fn resolve(self, device: Device) -> Result<Backend> {
        let cuda = matches!(device, Device::Cuda(_));
        match self {
            Backend::Auto if cuda && NCCL_BUILT => Ok(Backend::Nccl),
            Backend::Auto => Ok(Backend::Gloo),
            Backend::Nccl if !NCCL_BUILT => bail!(
                "--dist-backend nccl: this vggctl is built without NCCL; use --dist-backend gloo"
            ),
            Backend::Nccl if !cuda => {
                bail!("--dist-backend nccl needs a CUDA device; use --dist-backend gloo on a CPU")
            }
            b => Ok(b),
        }
    }
}

/// The default bound on the rendezvous and every collective.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// Runs the collective `f` in place on `t`: directly on a contiguous
/// tensor on the backend's `device` (the host for Gloo, the rank's GPU for
/// NCCL), else on a contiguous copy there whose result is copied back.
fn on_device(t: &Tensor, device: Device, f: impl FnOnce(&Tensor) -> Result<()>) -> Result<()> {
    if t.device() == device && t.is_contiguous() {
        return f(t);
    }
    let there = t.to_device(device).contiguous();
    f(&there)?;
    tch::no_grad(|| t.shallow_clone().copy_(&there));
    Ok(())
}

/// This process's place in its run's world, and its group's collectives.
pub struct World {
    pub rank: usize,
    pub size: usize,
    pub local_rank: usize,
    pub backend: Backend,
    /// Where the backend's collectives work: the host (Gloo) or the
    /// rank's GPU (NCCL).
    device: Device,
    group: Option<Arc<ProcessGroup>>,
    /// --dist-timeout: the bound on every collective and on a wait for
    /// the steps that hold collectives.
    timeout: Duration,
    /// A collective that failed inside the model's forward pass (which
    /// returns tensors, not errors), for [`World::check`].
    failure: Arc<Mutex<Option<String>>>,
    /// Who a failed collective lost (see [`World::lost`]), found once.
    lost: OnceLock<String>,
    /// Rank 0 serves the group's store (no torchrun agent does): a store
    /// out of reach then means rank 0 is gone.
    store_on_rank0: bool,
}

/// How long the survivors of a failed collective wait for each other at
/// the roll call that names the ranks lost (at most --dist-timeout).
const ROLL_CALL: Duration = Duration::from_secs(3);

/// "rank 2" or "ranks 1, 3": those absent from a roll call; empty when
/// all answered or none could be asked.
fn missing_ranks(present: &[bool]) -> String {
    let missing: Vec<String> = (0..present.len())
        .filter(|&r| !present[r])
        .map(|r| r.to_string())
        .collect();
    match missing.len() {
        0 => String::new(),
        1 => format!("rank {}", missing[0]),
        _ => format!("ranks {}", missing.join(", ")),
    }
}

/// (rank, world size) of this process once it joined a group of several,
/// for the binary's error lines.
static JOINED: OnceLock<(usize, usize)> = OnceLock::new();

/// (rank, world size) when this process joined a group of several ranks.
pub fn joined() -> Option<(usize, usize)> {
    JOINED.get().copied()
}

impl World {
    /// A world of one: every collective does nothing.
    pub fn single() -> Self {
        World {
            rank: 0,
            size: 1,
            local_rank: 0,
            backend: Backend::Gloo,
            device: Device::Cpu,
            group: None,
            timeout: DEFAULT_TIMEOUT,
            failure: Arc::default(),
            lost: OnceLock::new(),
            store_on_rank0: true,
        }
    }

    /// Joins the group `launch` describes (all ranks must call this) with
    /// `backend` as [`Backend::resolve`] gave it, for a rank that runs on
    /// `device` (NCCL's GPU).
    pub fn join(
        launch: &Launch,
        backend: Backend,
        device: Device,
        timeout: Duration,
    ) -> Result<Self> {
        let device = match (backend, device) {
            (Backend::Nccl, Device::Cuda(i)) => Device::Cuda(i),
            (Backend::Nccl, _) => bail!("NCCL needs a CUDA device"),
            _ => Device::Cpu,
        };
        if launch.world > 1 {
            let _ = JOINED.set((launch.rank, launch.world));
        }
        let prefix = format!("vggctl/{}/", launch.restart);
        let group = ProcessGroup::join(&Rendezvous {
            host: &launch.master_addr,
            port: launch.master_port,
            rank: launch.rank,
            world: launch.world,
            serve: launch.rank == 0 && !launch.agent_store,
            prefix: &prefix,
            timeout,
            nccl_device: match device {
                Device::Cuda(i) => Some(i),
                _ => None,
            },
        })
        .map_err(|e| {
            anyhow::anyhow!(
                "could not join the group of {} ranks at {}:{} within {} s: {e:#}",
                launch.world,
                launch.master_addr,
                launch.master_port,
                timeout.as_secs()
            )
        })?;
        Ok(World {
            rank: launch.rank,
            size: launch.world,
            local_rank: launch.local_rank,
            backend,
            device,
            group: Some(Arc::new(group)),
            timeout,
            failure: Arc::default(),
            lost: OnceLock::new(),
            store_on_rank0: !launch.agent_store,
        })
    }

    /// Returns once every rank has called it.
    pub fn barrier(&self) -> Result<()> {
        match &self.group {
            Some(g) => g.barrier().map_err(|e| self.lost(e)),
            None => Ok(()),
        }
    }

    /// The differentiable sum over the ranks (None for a world of one). A
    /// failure is kept for [`World::check`], and the local value returned.
    pub fn sum_across(&self) -> Option<SumAcross> {
        let group = self.group.clone()?;
        let failure = self.failure.clone();
        Some(Arc::new(move |x: &Tensor| match group.sum_autograd(x) {
            Ok(y) => y,
            Err(e) => {
                if let Ok(mut f) = failure.lock() {
                    f.get_or_insert_with(|| format!("{e:#}"));
                }
                x.shallow_clone()
            }
        }))
    }

    /// Waits for the steps queued on `device` so far: at most
    /// --dist-timeout where they hold collectives that c10d's watchdog
    /// cannot see (NCCL's all-reduce replayed by a CUDA graph, several
    /// ranks), so that a rank lost inside a step ends this one with the
    /// usual line, not a hang. Elsewhere it returns at once.
    pub fn await_steps(&self, device: Device) -> Result<()> {
        let Device::Cuda(i) = device else {
            return Ok(());
        };
        if self.size == 1 || self.backend != Backend::Nccl || await_device(i, self.timeout)? {
            return Ok(());
        }
        Err(self.lost(anyhow::anyhow!(
            "a training step did not finish within {} s",
            self.timeout.as_secs()
        )))
    }

    /// Fails if a collective inside a forward pass failed (see `sum_across`).
    pub fn check(&self) -> Result<()> {
        match self.failure.lock().ok().and_then(|f| f.clone()) {
            Some(e) => Err(self.lost(anyhow::anyhow!(e))),
            None => Ok(()),
        }
    }

    /// Rank 0: the one that prints and writes.
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    fn reduce(&self, t: &Tensor, op: ReduceOp) -> Result<()> {
        match &self.group {
            Some(g) => on_device(t, self.device, |h| g.all_reduce(h, op)).map_err(|e| self.lost(e)),
            None => Ok(()),
        }
    }

    /// What a failed collective means to the user: a peer died, hung or
    /// disagreed. In a world of two the peer is the other rank; in a
    /// larger one, the ranks that miss the roll call through the store
    /// (every survivor answers it within `ROLL_CALL`), or rank 0 when the
    /// store it served is out of reach.
    fn lost(&self, e: anyhow::Error) -> anyhow::Error {
        let who = self.lost.get_or_init(|| match (self.size, &self.group) {
            (2, _) => format!("rank {}", 1 - self.rank),
            (_, Some(g)) => {
                let wait = ROLL_CALL.min(self.timeout);
                match g.roll_call(self.rank, self.size, wait) {
                    Ok(present) => missing_ranks(&present),
                    Err(_) if self.store_on_rank0 && self.rank != 0 => "rank 0".into(),
                    Err(_) => String::new(),
                }
            }
            (_, None) => String::new(),
        });
        let who = if who.is_empty() { "another rank" } else { who };
        anyhow::anyhow!("lost contact with {who} (it stopped, or hung past --dist-timeout): {e:#}")
    }

    /// Sums `t` over the ranks, in place.
    pub fn sum(&self, t: &Tensor) -> Result<()> {
        self.reduce(t, ReduceOp::Sum)
    }

    /// The mean of the ranks' `t`, in place (DDP's gradient averaging):
    /// an all-reduce whenever there is a group, a group of one included, as
    /// DDP does.
    pub fn average(&self, t: &Tensor) -> Result<()> {
        self.sum(t)?;
        if self.size > 1 {
            let _ = t.shallow_clone().g_div_scalar_(self.size as f64);
        }
        Ok(())
    }

    /// Whether this process joined a group (a launcher's world, of one
    /// rank or more), so that its collectives run.
    pub fn has_group(&self) -> bool {
        self.group.is_some()
    }

    /// Whether the collectives can be captured in a CUDA graph: NCCL's
    /// can (they run on the GPU); Gloo's go through the host.
    pub fn graphable(&self) -> bool {
        self.group.is_none() || self.backend == Backend::Nccl
    }

    /// The largest of the ranks' `t`, in place.
    pub fn max(&self, t: &Tensor) -> Result<()> {
        self.reduce(t, ReduceOp::Max)
    }

    /// Overwrites `t` with rank 0's values, in place.
    pub fn broadcast(&self, t: &Tensor) -> Result<()> {
        match &self.group {
            Some(g) => on_device(t, self.device, |h| g.broadcast(h, 0)).map_err(|e| self.lost(e)),
            None => Ok(()),
        }
    }

    /// Whether any rank says yes (every rank must ask at the same point).
    pub fn any(&self, yes: bool) -> Result<bool> {
        if self.group.is_none() {
            return Ok(yes);
        }
        let t = Tensor::from_slice(&[i64::from(yes)]);
        self.max(&t)?;
        Ok(t.int64_value(&[0]) != 0)
    }

    /// Fails on every rank unless all ranks hold the same `fingerprint` of
    /// `what` (e.g. the model's shapes and the run's settings).
    pub fn check_same(&self, what: &str, fingerprint: i64) -> Result<()> {
        if self.group.is_none() {
            return Ok(());
        }
        // max of (f, -f) is (max f, -min f): one collective.
        let t = Tensor::from_slice(&[fingerprint, fingerprint.wrapping_neg()]);
        self.max(&t)?;
        let (hi, lo) = (t.int64_value(&[0]), t.int64_value(&[1]).wrapping_neg());
        if hi != lo {
            bail!(
                "the {} ranks disagree on {what}: every rank must be started with the same command line and data",
                self.size
            );
        }
        Ok(())
    }

    /// How this rank takes its part of each epoch's order: PyTorch's
    /// DistributedSampler's split, or with `repeats` (`--ra-sampler`)
    /// RASampler's.
    pub fn sampler(&self, repeats: Option<usize>) -> Sampler {
        Sampler {
            rank: self.rank,
            size: self.size,
            repeats,
        }
    }

    /// This rank's contiguous part (start, length) of `n` evaluation
    /// examples: no padding, so the ranks' summed counts are exactly one
    /// process's.
    pub fn range_of(&self, n: i64) -> (i64, i64) {
        let (r, w) = (self.rank as i64, self.size as i64);
        let start = n * r / w;
        (start, n * (r + 1) / w - start)
    }

    /// A seed for this rank's random draws (augmentation, dropout) from the
    /// run's: rank 0 keeps it, so one process draws what rank 0 of many does.
    pub fn seed_for(&self, seed: u64) -> u64 {
        seed ^ (self.rank as u64).wrapping_mul(0xA24B_AED4_963E_E407)
    }

    /// Broadcasts every tensor of `tensors` from rank 0, one collective per
    /// tensor.
    pub fn broadcast_all<'a>(&self, tensors: impl IntoIterator<Item = &'a Tensor>) -> Result<()> {
        for t in tensors {
            self.broadcast(t)?;
        }
        Ok(())
    }

    /// Sums `values` over the ranks (f64, on the host).
    pub fn sum_f64(&self, values: &mut [f64]) -> Result<()> {
        if self.group.is_none() {
            return Ok(());
        }
        let t = Tensor::from_slice(values).to_kind(Kind::Double);
        self.sum(&t)?;
        values.copy_from_slice(&Vec::<f64>::try_from(t)?);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `auto` is NCCL on CUDA only when built with it, Gloo otherwise;
    /// NCCL is refused on a CPU; Gloo is taken anywhere.
    #[test]
    fn backends_resolve_by_device() {
        let cuda = Device::Cuda(0);
        assert_eq!(Backend::Auto.resolve(Device::Cpu).unwrap(), Backend::Gloo);
        let auto_cuda = if NCCL_BUILT {
            Backend::Nccl
        } else {
            Backend::Gloo
        };
        assert_eq!(Backend::Auto.resolve(cuda).unwrap(), auto_cuda);
        assert_eq!(Backend::Gloo.resolve(cuda).unwrap(), Backend::Gloo);
        assert!(Backend::Nccl.resolve(Device::Cpu).is_err());
        assert_eq!(Backend::Nccl.resolve(cuda).is_ok(), NCCL_BUILT);
    }

    /// The ranks absent from a roll call, as the error line names them.
    #[test]
    fn a_roll_call_names_the_ranks_that_missed_it() {
        assert_eq!(missing_ranks(&[true, false, true]), "rank 1");
        assert_eq!(missing_ranks(&[true, false, true, false]), "ranks 1, 3");
        assert_eq!(missing_ranks(&[true, true, true]), "");
        assert_eq!(missing_ranks(&[]), "", "the store was out of reach");
    }

    /// Evaluation splits contiguously, without padding.
    #[test]
    fn evaluation_ranges_are_contiguous() {
        let w = World {
            rank: 1,
            size: 3,
            ..World::single()
        };
        assert_eq!(w.range_of(10), (3, 3));
        assert_eq!(World::single().range_of(10), (0, 10));
    }
}
