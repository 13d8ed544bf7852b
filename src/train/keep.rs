//! `--keep`: which weight files a run keeps beside its last epoch's.

use serde::{Deserialize, Serialize};

/// Which weight files a run keeps beside `last.safetensors` (which the
/// resume point needs): `best.safetensors` (`best`, the default), nothing
/// (`last`), every epoch's `epoch-NNN.safetensors` too (`all`), or those of
/// the K best epochs by validation top-1 (`top-K`, ties to the earlier).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Keep {
    Last,
    #[default]
    Best,
    All,
    Top(usize),
}

impl std::str::FromStr for Keep {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Keep> {
        match s {
            "last" => Ok(Keep::Last),
            "best" => Ok(Keep::Best),
            "all" => Ok(Keep::All),
            _ => match s.strip_prefix("top-").map(str::parse::<usize>) {
                Some(Ok(k)) if k >= 1 => Ok(Keep::Top(k)),
                _ => {
                    anyhow::bail!("--keep {s}: expected last, best, all or top-K with K at least 1")
                }
            },
        }
    }
}

impl std::fmt::Display for Keep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Keep::Last => f.write_str("last"),
            Keep::Best => f.write_str("best"),
            Keep::All => f.write_str("all"),
            Keep::Top(k) => write!(f, "top-{k}"),
        }
    }
}

impl Serialize for Keep {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Keep {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Keep, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl Keep {
    /// The epochs (1-based) whose weights `epoch-NNN.safetensors` holds
    /// after these epochs' validation top-1s.
    pub fn epoch_files(self, top1: &[f64]) -> Vec<usize> {
        let mut epochs: Vec<usize> = (1..=top1.len()).collect();
        match self {
            Keep::Last | Keep::Best => Vec::new(),
            Keep::All => epochs,
            Keep::Top(k) => {
                // Stable: equal accuracies keep the earlier epoch first.
                epochs.sort_by(|&a, &b| top1[b - 1].total_cmp(&top1[a - 1]));
                epochs.truncate(k);
                epochs.sort_unstable();
                epochs
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// top-K ranks by accuracy, ties to the earlier epoch; the names
    /// parse back from what they print.
    #[test]
    fn keep_policies() {
        let top1 = [50.0, 70.0, 70.0, 60.0];
        assert_eq!(Keep::Top(2).epoch_files(&top1), vec![2, 3]);
        assert_eq!(Keep::Top(3).epoch_files(&top1), vec![2, 3, 4]);
        assert_eq!(Keep::Top(9).epoch_files(&top1), vec![1, 2, 3, 4]);
        assert_eq!(Keep::All.epoch_files(&top1), vec![1, 2, 3, 4]);
        assert!(Keep::Best.epoch_files(&top1).is_empty());
        for k in [Keep::Last, Keep::Best, Keep::All, Keep::Top(5)] {
            assert_eq!(k.to_string().parse::<Keep>().unwrap(), k);
        }
        assert!("top-0".parse::<Keep>().is_err() && "top".parse::<Keep>().is_err());
    }
}
