//! Where an epoch's training batches come from: rows of the in-memory
//! split, or batches that a loader prepares from the files a few steps
//! ahead (streamed folders).
//!
//! Streamed random crops stay a function of the position: the draws of
//! step `s` are made right after seeding with `s`'s seed, when its job is
//! given to the loader, and drawn again (the same numbers) when step `s`
//! runs, so the generator reaches the step's erasing, mixing and dropout
//! exactly where an in-memory batch leaves it.

use anyhow::{Result, bail};
use tch::{Device, Kind, Tensor};

use crate::data::Images;
use crate::data::augment::{Preprocess, Transform};
use crate::data::resized_crop::{CropRange, ImageDraws, draw_resized_crops};
use crate::data::stream::{AHEAD, Job, Loader};

/// A seed for libtorch's generator from (seed, epoch, step), well mixed so
/// that neighbouring positions get unrelated streams (splitmix64).
pub(super) fn position_seed(seed: u64, epoch: usize, step: usize) -> i64 {
    let mut z = seed
        ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (step as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) >> 1) as i64
}

/// The step position whose seed draws an epoch's permutation.
pub(super) const PERMUTATION_STEP: usize = usize::MAX;

/// One epoch's batches (of this rank's part of the permutation).
pub(super) struct Feed {
    perm: Tensor,
    batch: i64,
    seed: u64,
    epoch: usize,
    loader: Option<(Loader, Transform)>,
    /// RandomResizedCrop's scale and ratio, and the flip's probability.
    crop: (CropRange, f64),
    /// Streamed: the next step whose job is not given yet.
    next_job: usize,
    /// Streamed: the images skipped so far this epoch (their messages).
    pub skipped: Vec<String>,
}

impl Feed {
    /// `perm`: this rank's examples for the epoch, in order (on the CPU
    /// for streamed images); `seed`: this rank's; from step `first`.
    pub fn new(
        images: &Images,
        perm: Tensor,
        batch: i64,
        (seed, epoch, first): (u64, usize, usize),
        pre: &Preprocess,
    ) -> Result<Self> {
        let loader = match images {
            Images::Resident(_) => None,
            Images::Streamed(s) => {
                let t = pre.stream_transform(true);
                Some((Loader::new(s, t)?, t))
            }
        };
        Ok(Feed {
            perm,
            batch,
            seed,
            epoch,
            loader,
            crop: (pre.crop, pre.hflip),
            next_job: first,
            skipped: Vec::new(),
        })
    }

    pub fn len(&self) -> i64 {
        self.perm.size()[0]
    }

    /// The steps of the epoch.
    pub fn steps(&self) -> usize {
        batches(self.len(), self.batch)
    }

    /// The examples of `step`.
    fn indices(&self, step: usize) -> Tensor {
        let start = step as i64 * self.batch;
        self.perm
            .narrow(0, start, self.batch.min(self.len() - start))
    }

    /// The draws of `step`'s random crops, after seeding for it (None
    /// where the loader does not crop).
    fn draws(&self, step: usize, transform: Transform) -> Vec<ImageDraws> {
        match transform {
            Transform::Random { .. } => {
                tch::manual_seed(position_seed(self.seed, self.epoch, step));
                draw_resized_crops(self.indices(step).size()[0], self.crop.0, self.crop.1)
            }
            _ => Vec::new(),
        }
    }

    /// Streamed: gives the loader the jobs of the steps up to [`AHEAD`]
    /// past `step`. Call before seeding for `step` (it seeds for others).
    pub fn prefetch(&mut self, step: usize) {
        let steps = self.steps();
        let Some((_, t)) = &self.loader else {
            return;
        };
        let t = *t;
        let mut jobs = Vec::new();
        while self.next_job < steps && self.next_job <= step + AHEAD {
            let indices = Vec::<i64>::try_from(&self.indices(self.next_job)).unwrap_or_default();
            jobs.push(Job {
                indices,
                draws: self.draws(self.next_job, t),
            });
            self.next_job += 1;
        }
        if let Some((loader, _)) = &mut self.loader {
            jobs.into_iter().for_each(|j| loader.submit(j));
        }
    }

    /// `step`'s batch as the model's input and its labels, on `device`,
    /// after seeding for the step: the in-memory split's rows through the
    /// training transform, or the loader's next batch (its crop draws made
    /// again, so that the generator moves on as for an in-memory batch).
    pub fn batch(
        &mut self,
        images: &Images,
        step: usize,
        pre: &Preprocess,
        device: Device,
    ) -> Result<(Tensor, Tensor)> {
        let len = self.indices(step).size()[0];
        match (images, &mut self.loader) {
            (Images::Resident(split), _) => {
                let batch = split.select(&self.indices(step));
                Ok((pre.batch(&batch, true), batch.labels))
            }
            (Images::Streamed(_), Some((loader, t))) => {
                if let Transform::Random { .. } = t {
                    draw_resized_crops(len, self.crop.0, self.crop.1);
                }
                let t = *t;
                let loaded = loader.take()?;
                self.skipped.extend(loaded.skipped);
                if loaded.batch.is_empty() {
                    bail!(
                        "none of the {len} images of epoch {}, step {} could be read ({} skipped this epoch)",
                        self.epoch + 1,
                        step + 1,
                        self.skipped.len()
                    );
                }
                let batch = loaded.batch.to_device(device);
                let x = pre.streamed(&batch.images, true, t);
                Ok((x, batch.labels.to_kind(Kind::Int64)))
            }
            (Images::Streamed(_), None) => bail!("a streamed split without its loader"),
        }
    }
}

/// The batches of `batch` that `len` examples make, the last one short.
pub fn batches(len: i64, batch: i64) -> usize {
    // Not (len + batch - 1) / batch: a batch near i64::MAX overflows.
    (len / batch + i64::from(len % batch != 0)) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Neighbouring positions get unrelated seeds, the same position the
    /// same seed (which exact resume rests on), and every seed is a
    /// non-negative i64 (libtorch's `manual_seed` takes those).
    #[test]
    fn position_seed_is_a_pure_well_mixed_function_of_the_position() {
        assert_eq!(position_seed(7, 3, 11), position_seed(7, 3, 11));
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..3 {
            for epoch in 0..20 {
                for step in (0..50).chain([PERMUTATION_STEP]) {
                    let s = position_seed(seed, epoch, step);
                    assert!(s >= 0);
                    assert!(
                        seen.insert(s),
                        "seed {seed} epoch {epoch} step {step} repeats"
                    );
                }
            }
        }
        // One flipped input bit changes about half of the output bits.
        let a = position_seed(0, 1, 2) as u64;
        let b = position_seed(0, 1, 3) as u64;
        let flipped = (a ^ b).count_ones();
        assert!((16..=48).contains(&flipped), "{flipped} bits differ");
    }
}
