//! Which examples of an epoch's order each rank trains on: PyTorch's
//! `DistributedSampler`, or with repeated augmentation torchvision's
//! `RASampler` (train.py `--ra-sampler --ra-reps K`, also timm's
//! `RepeatAugSampler`).
//!
//! Both are one rule: the order with each example written `repeats` times
//! in a row (once for DistributedSampler) and wrapped around to a multiple
//! of the world size; rank `r` takes its `r`-th, `r + size`-th, … entries,
//! as many as [`Sampler::len`] says.

use tch::{Kind, Tensor};

/// Repeated augmentation keeps floor(N / this) · this examples an epoch
/// over all ranks (RASampler's rounding; a rank's share is rounded down).
const RA_ROUND: i64 = 256;

/// The most copies `--ra-reps` takes (torchvision's recipes use 3 or 4;
/// the bound keeps N · repeats far from overflowing).
pub const MAX_REPEATS: usize = 1000;

/// How a world of `size` ranks splits an epoch's order, as seen by `rank`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sampler {
    pub rank: usize,
    pub size: usize,
    /// Repeated augmentation: each example this many times in a row, the
    /// copies dealt to the ranks in turn (None: DistributedSampler's split).
    pub repeats: Option<usize>,
}

impl Sampler {
    /// The examples each rank takes in an epoch of `n`: DistributedSampler's
    /// ceil(n / size); RASampler's floor(floor(n / 256) · 256 / size), which
    /// keeps about 1/repeats of the distinct examples. Below 256 examples,
    /// where RASampler would keep none, ceil(n / size) as timm's does.
    pub fn len(&self, n: i64) -> i64 {
        let size = self.size as i64;
        let Some(repeats) = self.repeats else {
            return (n + size - 1) / size;
        };
        let all = (n * repeats as i64 + size - 1) / size;
        let kept = match n >= RA_ROUND {
            true => n / RA_ROUND * RA_ROUND / size,
            false => (n + size - 1) / size,
        };
        kept.min(all)
    }

    /// This rank's examples of an epoch whose order is `perm` (the same on
    /// every rank), on `perm`'s device.
    pub fn shard(&self, perm: &Tensor) -> Tensor {
        let n = perm.size()[0];
        let repeats = self.repeats.unwrap_or(1) as i64;
        // Entry j of this rank is entry rank + j·size of the repeated,
        // wrapped order, which is example (that mod n·repeats) / repeats.
        let at = Tensor::arange(self.len(n), (Kind::Int64, perm.device())) * self.size as i64
            + self.rank as i64;
        let at = at.remainder(n * repeats).floor_divide_scalar(repeats);
        perm.index_select(0, &at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(perm: &[i64], rank: usize, size: usize, repeats: Option<usize>) -> Vec<i64> {
        let s = Sampler {
            rank,
            size,
            repeats,
        };
        Vec::<i64>::try_from(s.shard(&Tensor::from_slice(perm))).unwrap()
    }

    /// DistributedSampler's split (the expected values are what
    /// `DistributedSampler(range(5), num_replicas, rank, shuffle=False)`
    /// picks from the order): padding from the start, then strided.
    #[test]
    fn shards_are_distributed_samplers() {
        let perm = [4i64, 0, 3, 1, 2];
        assert_eq!(shard(&perm, 0, 2, None), vec![4, 3, 2]);
        assert_eq!(shard(&perm, 1, 2, None), vec![0, 1, 4]);
        assert_eq!(shard(&perm, 2, 3, None), vec![3, 4]);
        assert_eq!(shard(&perm, 0, 1, None), vec![4, 0, 3, 1, 2]);
        // More ranks than examples: the order repeats.
        assert_eq!(shard(&perm, 6, 7, None), vec![0]);
    }

    /// RASampler's split (the expected values are what timm's
    /// `RepeatAugSampler(range(n), size, rank, shuffle=False, num_repeats)`
    /// lists, mapped through the order; torchvision's RASampler lists the
    /// same from 256 examples on): each example `repeats` times in a row,
    /// dealt out to the ranks in turn; ceil(n / size) below 256 examples;
    /// 300 examples keep 256 / size.
    #[test]
    fn repeated_shards_are_ra_samplers() {
        let perm = [4i64, 0, 3, 1, 2];
        assert_eq!(shard(&perm, 0, 2, Some(3)), vec![4, 4, 0]);
        assert_eq!(shard(&perm, 1, 2, Some(3)), vec![4, 0, 0]);
        assert_eq!(shard(&perm, 0, 1, Some(3)), vec![4, 4, 4, 0, 0]);
        assert_eq!(shard(&perm, 2, 4, Some(2)), vec![0, 1]);
        let long: Vec<i64> = (0..300).collect();
        let s = shard(&long, 1, 2, Some(3));
        assert_eq!(s.len(), 128);
        assert_eq!(&s[..4], &[0, 1, 1, 2]);
        assert_eq!(s[127], 85);
        // Each example on three ranks in a world of three.
        let firsts: Vec<i64> = (0..3).map(|r| shard(&long, r, 3, Some(3))[0]).collect();
        assert_eq!(firsts, vec![0, 0, 0]);
        let kept = Sampler {
            rank: 0,
            size: 3,
            repeats: Some(3),
        };
        assert_eq!(kept.len(300), 85);
        assert_eq!(kept.len(255), 85);
        assert_eq!(kept.len(2), 1);
        // A world larger than the kept examples leaves a rank none.
        let wide = Sampler {
            rank: 0,
            size: 512,
            repeats: Some(3),
        };
        assert_eq!(wide.len(300), 0);
        assert_eq!(wide.shard(&Tensor::from_slice(&long)).size(), vec![0]);
    }
}
