//! Batch-level training augmentations of torchvision's reference recipe,
//! drawn exactly as torchvision draws them so that the same generator state
//! gives the same batch: random erasing per image
//! (`transforms.RandomErasing(p)` after normalization), then one of MixUp
//! and CutMix per batch (`v2.RandomChoice([v2.MixUp(α), v2.CutMix(α)])` on
//! the collated batch). Every draw is on the CPU generator, as torchvision's
//! are; the images stay where they are.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// `--mixup-alpha` and `--cutmix-alpha` (0: that one is off).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Mixing {
    pub mixup_alpha: f64,
    pub cutmix_alpha: f64,
}

impl Mixing {
    pub fn is_off(&self) -> bool {
        self.mixup_alpha <= 0.0 && self.cutmix_alpha <= 0.0
    }

    /// The mixed batch and its soft labels (`classes` columns, float32):
    /// the batch rolled by one and blended (MixUp), or a box of it pasted
    /// (CutMix), the labels one-hot and mixed in the same proportion.
    /// Returns `x` and the labels unchanged when both are off.
    pub fn apply(&self, x: &Tensor, y: &Tensor, classes: i64) -> (Tensor, Tensor) {
        let mut kinds = Vec::new();
        if self.mixup_alpha > 0.0 {
            kinds.push((false, self.mixup_alpha));
        }
        if self.cutmix_alpha > 0.0 {
            kinds.push((true, self.cutmix_alpha));
        }
        if kinds.is_empty() {
            return (x.shallow_clone(), y.shallow_clone());
        }
        // RandomChoice: torch.multinomial(torch.tensor(p), 1), p uniform.
        let p = vec![1.0f32 / kinds.len() as f32; kinds.len()];
        let pick = Tensor::from_slice(&p)
            .multinomial(1, false)
            .int64_value(&[0]) as usize;
        let (cutmix, alpha) = kinds[pick];
        // Beta(α, α).sample(): torch._sample_dirichlet([[α, α]])[..., 0].
        let a = alpha as f32;
        let lam = Tensor::from_slice(&[a, a])
            .view([1, 2])
            .internal_sample_dirichlet()
            .double_value(&[0, 0]);
        let (out, lam) = if cutmix {
            cut_mix(x, lam)
        } else {
            let mixed = x
                .roll([1], [0])
                .g_mul_scalar_(1.0 - lam)
                .g_add_(&x.g_mul_scalar(lam));
            (mixed, lam)
        };
        let one_hot = y.one_hot(classes).to_kind(Kind::Float);
        let soft = one_hot
            .roll([1], [0])
            .g_mul_scalar_(1.0 - lam)
            .g_add_(&one_hot.g_mul_scalar(lam));
        (out, soft)
    }
}

/// CutMix's box for `lam` (a centre drawn uniformly, half-sides
/// `0.5·sqrt(1 − lam)` of each side, clipped), the rolled batch pasted into
/// it, and the area-corrected `lam`.
fn cut_mix(x: &Tensor, lam: f64) -> (Tensor, f64) {
    let (_, _, h, w) = x.size4().expect("a batch of images");
    let cpu = (Kind::Int64, Device::Cpu);
    let rx = Tensor::randint(w, [1], cpu).int64_value(&[0]);
    let ry = Tensor::randint(h, [1], cpu).int64_value(&[0]);
    let r = 0.5 * (1.0 - lam).sqrt();
    let (rw, rh) = ((r * w as f64) as i64, (r * h as f64) as i64);
    let (x1, y1) = ((rx - rw).max(0), (ry - rh).max(0));
    let (x2, y2) = ((rx + rw).min(w), (ry + rh).min(h));
    let out = x.copy();
    if x2 > x1 && y2 > y1 {
        let rolled = x.roll([1], [0]);
        out.narrow(2, y1, y2 - y1)
            .narrow(3, x1, x2 - x1)
            .copy_(&rolled.narrow(2, y1, y2 - y1).narrow(3, x1, x2 - x1));
    }
    let lam = 1.0 - ((x2 - x1) * (y2 - y1)) as f64 / (w * h) as f64;
    (out, lam)
}

/// `transforms.RandomErasing(p, scale=(0.02, 0.33), ratio=(0.3, 3.3),
/// value=0)` applied to each image of the normalized batch in turn, with
/// torchvision's draws (a coin, then up to ten tries of an area and a
/// log-uniform aspect ratio, then the corner); the boxes are erased on the
/// batch's device in one pass.
pub fn random_erase(x: &Tensor, p: f64) -> Tensor {
    if p <= 0.0 {
        return x.shallow_clone();
    }
    let (b, _, h, w) = x.size4().expect("a batch of images");
    let mut boxes: Vec<i64> = Vec::with_capacity(4 * b as usize);
    for _ in 0..b {
        // `torch.rand(1) < p`, compared in float32.
        let coin = uniform(0.0, 1.0).double_value(&[0]) as f32;
        let (i, j, bh, bw) = match coin < p as f32 {
            true => erase_box(h, w).unwrap_or((0, 0, 0, 0)),
            false => (0, 0, 0, 0),
        };
        boxes.extend([i, j, bh, bw]);
    }
    let boxes = Tensor::from_slice(&boxes)
        .view([b, 4])
        .to_device(x.device());
    let rows = Tensor::arange(h, (Kind::Int64, x.device())).view([1, h, 1]);
    let cols = Tensor::arange(w, (Kind::Int64, x.device())).view([1, 1, w]);
    let at = |k: i64| boxes.select(1, k).view([b, 1, 1]);
    let inside = rows
        .ge_tensor(&at(0))
        .logical_and(&rows.lt_tensor(&(at(0) + at(2))))
        .logical_and(&cols.ge_tensor(&at(1)))
        .logical_and(&cols.lt_tensor(&(at(1) + at(3))));
    x.masked_fill(&inside.unsqueeze(1), 0.0)
}

/// `torch.empty(1).uniform_(lo, hi)` (float32).
fn uniform(lo: f64, hi: f64) -> Tensor {
    Tensor::empty([1], (Kind::Float, Device::Cpu)).uniform_(lo, hi)
}

/// `RandomErasing.get_params`: the box (top, left, height, width), or None
/// when ten tries found none that fits (torchvision then leaves the image).
fn erase_box(h: i64, w: i64) -> Option<(i64, i64, i64, i64)> {
    let area = (h * w) as f64;
    // torch.log(torch.tensor(ratio)), in float32 as torchvision has it.
    let log_ratio = Tensor::from_slice(&[0.3f32, 3.3]).log();
    let (lo, hi) = (log_ratio.double_value(&[0]), log_ratio.double_value(&[1]));
    for _ in 0..10 {
        let erase_area = area * uniform(0.02, 0.33).double_value(&[0]);
        let aspect = uniform(lo, hi).exp().double_value(&[0]);
        // Python's round() rounds half to even.
        let bh = (erase_area * aspect).sqrt().round_ties_even() as i64;
        let bw = (erase_area / aspect).sqrt().round_ties_even() as i64;
        if !(bh < h && bw < w) {
            continue;
        }
        let cpu = (Kind::Int64, Device::Cpu);
        let i = Tensor::randint_low(0, h - bh + 1, [1], cpu).int64_value(&[0]);
        let j = Tensor::randint_low(0, w - bw + 1, [1], cpu).int64_value(&[0]);
        return Some((i, j, bh, bw));
    }
    None
}
