//! What a launcher (torchrun, Slurm's `srun`) tells a process about its
//! place in a data-parallel run, read from the environment it set.

use anyhow::{Result, bail};

/// What a launcher says about this process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// torchrun's agent serves the store (`TORCHELASTIC_USE_AGENT_STORE`):
    /// every rank is its client.
    pub agent_store: bool,
    /// torchrun's restart count (keys of a restarted group stay apart).
    pub restart: u32,
}

fn parse<T: std::str::FromStr>(var: &str, value: &str) -> Result<T> {
    match value.trim().parse() {
        Ok(v) => Ok(v),
        Err(_) => bail!("{var}={value:?} is not a non-negative integer"),
    }
}

impl Launch {
    /// The launch `env` describes (torchrun's `RANK`/`WORLD_SIZE`/..., else
    /// Slurm's `SLURM_PROCID`/`SLURM_NTASKS`/`SLURM_LOCALID`), or `None`
    /// for a single process.
    pub fn from_env(env: impl Fn(&str) -> Option<String>) -> Result<Option<Launch>> {
        let (rank_var, world_var, local_var) =
            if env("RANK").is_some() || env("WORLD_SIZE").is_some() {
                ("RANK", "WORLD_SIZE", "LOCAL_RANK")
            } else if env("SLURM_NTASKS").is_some() {
                ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
            } else {
                return Ok(None);
            };
        let get = |var: &str| -> Result<String> {
            match env(var) {
                Some(v) => Ok(v),
                None => bail!(
                    "{world_var} is set but {var} is not: launch with torchrun (or srun), or set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT"
                ),
            }
        };
        let world: usize = parse(world_var, &get(world_var)?)?;
        let rank: usize = parse(rank_var, &get(rank_var)?)?;
        if world == 0 || rank >= world {
            bail!("{rank_var}={rank} is not a rank of a world of {world_var}={world}");
        }
        // One rank with a rendezvous address (`torchrun --nproc-per-node
        // 1`) joins a group of one, as `init_process_group` does; without
        // one (a one-task Slurm job, say) it is a plain process.
        if world == 1 && (env("MASTER_ADDR").is_none() || env("MASTER_PORT").is_none()) {
            return Ok(None);
        }
        let local_rank = match env(local_var) {
            Some(v) => parse(local_var, &v)?,
            None => 0,
        };
        let master_addr = get("MASTER_ADDR")?;
        let master_port: u16 = match parse("MASTER_PORT", &get("MASTER_PORT")?) {
            Ok(0) | Err(_) => bail!("MASTER_PORT must be a port number (1-65535)"),
            Ok(p) => p,
        };
        let agent_store = env("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v == "True");
        let restart = match env("TORCHELASTIC_RESTART_COUNT") {
            Some(v) => parse("TORCHELASTIC_RESTART_COUNT", &v)?,
            None => 0,
        };
        Ok(Some(Launch {
            rank,
            world,
            local_rank,
            master_addr,
            master_port,
            agent_store,
            restart,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn launch(vars: &[(&str, &str)]) -> Result<Option<Launch>> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Launch::from_env(|k| map.get(k).cloned())
    }

    #[test]
    fn launches_are_read_as_torchrun_and_slurm_write_them() {
        assert_eq!(launch(&[]).unwrap(), None);
        let torchrun = launch(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "29500"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
            ("TORCHELASTIC_RESTART_COUNT", "3"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            (torchrun.rank, torchrun.world, torchrun.local_rank),
            (1, 2, 1)
        );
        assert!(torchrun.agent_store);
        assert_eq!(torchrun.restart, 3);
        let slurm = launch(&[
            ("SLURM_PROCID", "3"),
            ("SLURM_NTASKS", "4"),
            ("SLURM_LOCALID", "1"),
            ("MASTER_ADDR", "node1"),
            ("MASTER_PORT", "12345"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((slurm.rank, slurm.world, slurm.local_rank), (3, 4, 1));
        assert!(!slurm.agent_store);
        // One rank is one process, unless it has a group to join.
        assert_eq!(launch(&[("RANK", "0"), ("WORLD_SIZE", "1")]).unwrap(), None);
        assert_eq!(
            launch(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1")]).unwrap(),
            None
        );
        let one = [
            ("RANK", "0"),
            ("WORLD_SIZE", "1"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "29500"),
        ];
        let one = launch(&one).unwrap().unwrap();
        assert_eq!((one.rank, one.world, one.local_rank), (0, 1, 0));
    }

    #[test]
    fn bad_launches_say_what_is_missing() {
        let e = launch(&[("WORLD_SIZE", "2")]).unwrap_err().to_string();
        assert!(e.contains("WORLD_SIZE is set but RANK is not"), "{e}");
        let e = launch(&[("RANK", "2"), ("WORLD_SIZE", "2")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("RANK=2 is not a rank"), "{e}");
        let e = launch(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("MASTER_PORT is not"), "{e}");
        let e = launch(&[("RANK", "x"), ("WORLD_SIZE", "2")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("RANK=\"x\""), "{e}");
    }
}
