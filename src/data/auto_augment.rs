//! torchvision's automatic augmentations on uint8 image tensors, as
//! torchvision's reference `train.py --auto-augment` offers them:
//! AutoAugment with a searched policy (`transforms.AutoAugment(policy)`),
//! RandAugment (`transforms.RandAugment(magnitude=m)`: two ops of 14 per
//! image at one magnitude) and TrivialAugment Wide
//! (`transforms.TrivialAugmentWide()`: one op at a random magnitude) and
//! AugMix (`transforms.AugMix()`: the image blended with three chains of
//! ops, bilinear as its default, the others nearest as theirs). Op for
//! op as torchvision's tensor path computes them
//! (`transforms._functional_tensor`: the affine grid and nearest
//! `grid_sample`, `_blend`, the grayscale weights, the 13-tap sharpness
//! kernel, the equalization LUT), with their draws in torchvision's order on
//! the CPU generator, so that the same generator state gives torchvision's
//! images. Each image gets its own draws, as in a DataLoader's workers;
//! the ops then run a batch at a time, the images that drew the same op
//! together, each at its own magnitude (an image comes out as it would
//! alone).

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::auto_augment_tables::{AUGMIX_OPS, CIFAR10, IMAGENET, Op, SPACE_OPS, SVHN, Step};
use super::uint8_ops::{
    auto_contrast, blend, blurred, equalize, grayscale, inverse_affine, per_image, warp,
};
use crate::choice::Choice;

/// `--auto-augment`: `AutoAugmentPolicy` (the sub-policies learned on a
/// dataset), RandAugment (`ra`), TrivialAugment Wide (`ta_wide`) or AugMix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    Imagenet,
    Cifar10,
    Svhn,
    Ra,
    #[serde(rename = "ta_wide")]
    TaWide,
    Augmix,
}

impl Choice for Policy {
    const ALL: &'static [Self] = &[
        Policy::Imagenet,
        Policy::Cifar10,
        Policy::Svhn,
        Policy::Ra,
        Policy::TaWide,
        Policy::Augmix,
    ];
    fn name(self) -> &'static str {
        match self {
            Policy::Imagenet => "imagenet",
            Policy::Cifar10 => "cifar10",
            Policy::Svhn => "svhn",
            Policy::Ra => "ra",
            Policy::TaWide => "ta_wide",
            Policy::Augmix => "augmix",
        }
    }
    fn help(self) -> &'static str {
        match self {
            Policy::Imagenet => "AutoAugment, the policy searched on ImageNet (image folders)",
            Policy::Cifar10 => "AutoAugment, the policy searched on CIFAR-10",
            Policy::Svhn => "AutoAugment, the policy searched on SVHN",
            Policy::Ra => {
                "RandAugment: two of 14 ops per image at --ra-magnitude (transforms.RandAugment)"
            }
            Policy::TaWide => {
                "TrivialAugment Wide: one of 14 ops per image at a random magnitude (transforms.TrivialAugmentWide)"
            }
            Policy::Augmix => {
                "AugMix: the image blended with three chains of 1-3 ops at --augmix-severity (transforms.AugMix)"
            }
        }
    }
}

/// `--augment-interpolation`: how the automatic augmentations' geometric
/// ops (shears, translations, rotations) sample the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Interpolation {
    Nearest,
    Bilinear,
}

impl Choice for Interpolation {
    const ALL: &'static [Self] = &[Interpolation::Nearest, Interpolation::Bilinear];
    fn name(self) -> &'static str {
        match self {
            Interpolation::Nearest => "nearest",
            Interpolation::Bilinear => "bilinear",
        }
    }
    fn help(self) -> &'static str {
        match self {
            Interpolation::Nearest => "InterpolationMode.NEAREST",
            Interpolation::Bilinear => {
                "InterpolationMode.BILINEAR (what torchvision's reference train.py passes)"
            }
        }
    }
}

impl Interpolation {
    /// grid_sample's mode.
    fn mode(self) -> i64 {
        match self {
            Interpolation::Nearest => NEAREST,
            Interpolation::Bilinear => BILINEAR,
        }
    }
}

/// RandAugment's magnitude bins: `--ra-magnitude` is 0 to `RA_BINS - 1`.
pub const RA_BINS: i64 = 31;
/// torchvision's default `--ra-magnitude` (`RandAugment(magnitude=9)`).
pub const RA_MAGNITUDE: i64 = 9;

/// AugMix's default `severity` (torchvision's): its magnitudes are drawn
/// from the first 3 of its 10 bins; `--augmix-severity` is 1 to
/// `AUGMIX_BINS`.
pub const AUGMIX_SEVERITY: i64 = 3;
pub const AUGMIX_BINS: i64 = 10;

/// Whose magnitude ranges: AutoAugment's and RandAugment's, TrivialAugment
/// Wide's, or AugMix's.
#[derive(Clone, Copy, PartialEq)]
enum Ranges {
    Auto,
    Wide,
    Augmix,
}

/// An `_augmentation_space`: `bins` magnitudes per op over `ranges`.
#[derive(Clone, Copy)]
struct Space {
    bins: i64,
    ranges: Ranges,
}

const AUTO: Space = Space {
    bins: 10,
    ranges: Ranges::Auto,
};
const RAND: Space = Space {
    bins: RA_BINS,
    ranges: Ranges::Auto,
};
const WIDE: Space = Space {
    bins: 31,
    ranges: Ranges::Wide,
};
const AUGMIX: Space = Space {
    bins: AUGMIX_BINS,
    ranges: Ranges::Augmix,
};

/// grid_sample's modes: torchvision's `InterpolationMode.NEAREST` (the
/// default of AutoAugment, RandAugment and TrivialAugment) and `BILINEAR`
/// (AugMix's).
const NEAREST: i64 = 1;
const BILINEAR: i64 = 0;

/// The `bin`-th of `space`'s magnitudes for `op` on an `h x w` image
/// (float32 as torchvision's tensors hold them), and whether it takes a
/// random sign; `None` for an op without magnitudes.
fn magnitude(space: Space, op: Op, bin: i64, h: i64, w: i64) -> Option<(f64, bool)> {
    let Space { bins, ranges } = space;
    let range = |end: f64| {
        Tensor::linspace(0.0, end, bins, (Kind::Float, Device::Cpu)).double_value(&[bin])
    };
    let wide = ranges == Ranges::Wide;
    let either = |narrow: f64, wide_end: f64| if wide { wide_end } else { narrow };
    let translate = |side: i64| match ranges {
        Ranges::Auto => 150.0 / 331.0 * side as f64,
        Ranges::Wide => 32.0,
        Ranges::Augmix => side as f64 / 3.0,
    };
    Some(match op {
        Op::ShearX | Op::ShearY => (range(either(0.3, 0.99)), true),
        Op::TranslateX => (range(translate(w)), true),
        Op::TranslateY => (range(translate(h)), true),
        Op::Rotate => (range(either(30.0, 135.0)), true),
        Op::Brightness | Op::Color | Op::Contrast | Op::Sharpness => {
            (range(either(0.9, 0.99)), true)
        }
        // top - (arange(bins) / ((bins - 1) / 4)).round().int(): top 8 (4
        // for AugMix), / 6 for TrivialAugment Wide.
        Op::Posterize => {
            let top = if ranges == Ranges::Augmix { 4 } else { 8 };
            let v = (Tensor::arange(bins, (Kind::Int64, Device::Cpu))
                / ((bins - 1) as f64 / either(4.0, 6.0)))
            .round()
            .to_kind(Kind::Int)
            .int64_value(&[bin]);
            ((top - v) as f64, false)
        }
        Op::Solarize => (
            Tensor::linspace(255.0, 0.0, bins, (Kind::Float, Device::Cpu)).double_value(&[bin]),
            false,
        ),
        Op::AutoContrast | Op::Equalize | Op::Invert | Op::Identity => return None,
    })
}

/// `--auto-augment` with its settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AutoAugment {
    pub policy: Policy,
    /// RandAugment's magnitude bin (`--ra-magnitude`).
    pub ra_magnitude: i64,
    /// AugMix's severity (`--augmix-severity`): its magnitudes come from
    /// the first that many of 10 bins.
    pub augmix_severity: i64,
    /// The geometric ops' interpolation (None: each transform's default,
    /// nearest, bilinear for AugMix).
    pub interpolation: Option<Interpolation>,
}

impl AutoAugment {
    /// Applied to each uint8 image of the NCHW batch `x` (on `x`'s device):
    /// every image's draws first, image by image in torchvision's order on
    /// the CPU generator, then the ops a batch at a time (see [`run`]).
    pub fn apply(&self, x: &Tensor) -> Tensor {
        let (b, _, h, w) = x.size4().expect("a batch of images");
        let default = match self.policy {
            Policy::Augmix => BILINEAR,
            _ => NEAREST,
        };
        let mode = self.interpolation.map_or(default, Interpolation::mode);
        let draws = |draw: &dyn Fn() -> Vec<Draw>| (0..b).map(|_| draw()).collect::<Vec<_>>();
        let drawn = match self.policy {
            Policy::Imagenet => draws(&|| searched(&IMAGENET, (h, w))),
            Policy::Cifar10 => draws(&|| searched(&CIFAR10, (h, w))),
            Policy::Svhn => draws(&|| searched(&SVHN, (h, w))),
            Policy::Ra => draws(&|| rand_augment(self.ra_magnitude, (h, w))),
            Policy::TaWide => draws(&|| trivial_augment((h, w))),
            Policy::Augmix => return aug_mix(x, self.augmix_severity, (h, w), mode),
        };
        run(x, &drawn, mode)
    }
}

/// An op as drawn for one image, with its (signed) magnitude.
type Draw = (Op, f64);

/// A draw of `torch.randint(high, (1,))`.
fn randint(high: i64) -> i64 {
    Tensor::randint(high, [1], (Kind::Int64, Device::Cpu)).int64_value(&[0])
}

/// Each image's drawn ops applied in turn, a batch at a time: at each
/// position of the lists, the images that drew the same op go through it
/// together, each with its own magnitude (about a dozen groups of a few
/// kernels each, where image by image would be some 30 kernels an image).
fn run(x: &Tensor, drawn: &[Vec<Draw>], mode: i64) -> Tensor {
    let depth = drawn.iter().map(Vec::len).max().unwrap_or(0);
    let mut x = x.copy();
    for k in 0..depth {
        let mut groups: Vec<(Op, Vec<i64>, Vec<f64>)> = Vec::new();
        for (i, &(op, m)) in drawn
            .iter()
            .enumerate()
            .filter_map(|(i, d)| Some((i, d.get(k)?)))
        {
            if op == Op::Identity {
                continue;
            }
            match groups.iter_mut().find(|g| g.0 == op) {
                Some(g) => {
                    g.1.push(i as i64);
                    g.2.push(m);
                }
                None => groups.push((op, vec![i as i64], vec![m])),
            }
        }
        for (op, at, ms) in groups {
            if at.len() == drawn.len() {
                x = apply(&x, op, &ms, mode);
                continue;
            }
            let at = Tensor::from_slice(&at).to_device(x.device());
            let out = apply(&x.index_select(0, &at), op, &ms, mode);
            let _ = x.index_copy_(0, &at, &out);
        }
    }
    x
}

/// `AutoAugment.forward`: a sub-policy, two probabilities and two signs
/// drawn, each op applied if its probability says so (negated on a 0).
fn searched(table: &[[Step; 2]], (h, w): (i64, i64)) -> Vec<Draw> {
    let id = randint(table.len() as i64) as usize;
    let probs = Tensor::rand([2], (Kind::Float, Device::Cpu));
    let signs = Tensor::randint(2, [2], (Kind::Int64, Device::Cpu));
    let mut ops = Vec::with_capacity(2);
    for (k, &(op, p, bin)) in table[id].iter().enumerate() {
        if probs.double_value(&[k as i64]) as f32 > p {
            continue;
        }
        let (mut m, signed) = match bin {
            -1 => (0.0, false),
            bin => magnitude(AUTO, op, bin as i64, h, w).unwrap_or((0.0, false)),
        };
        if signed && signs.int64_value(&[k as i64]) == 0 {
            m = -m;
        }
        ops.push((op, m));
    }
    ops
}

/// An op of `ops` drawn, then (where it has magnitudes) its bin of
/// `space` from `bin`, then its sign (signed ops; negated on a 1).
fn one_op(ops: &[Op], space: Space, bin: &dyn Fn() -> i64, (h, w): (i64, i64)) -> Draw {
    let op = ops[randint(ops.len() as i64) as usize];
    let without = matches!(op, Op::Identity | Op::AutoContrast | Op::Equalize);
    let (mut m, signed) = match without {
        true => (0.0, false),
        false => magnitude(space, op, bin(), h, w).unwrap_or((0.0, false)),
    };
    if signed && randint(2) != 0 {
        m = -m;
    }
    (op, m)
}

/// `RandAugment.forward`: two ops drawn in turn, each at the bin
/// `magnitude_bin`, a sign drawn for the signed ones (negated on a 1).
fn rand_augment(magnitude_bin: i64, frame: (i64, i64)) -> Vec<Draw> {
    (0..2)
        .map(|_| one_op(&SPACE_OPS, RAND, &|| magnitude_bin, frame))
        .collect()
}

/// `TrivialAugmentWide.forward`: one op drawn, then its bin (ops with
/// magnitudes), then its sign (signed ops; negated on a 1).
fn trivial_augment(frame: (i64, i64)) -> Vec<Draw> {
    vec![one_op(&SPACE_OPS, WIDE, &|| randint(WIDE.bins), frame)]
}

/// `AugMix.forward` (width 3, depth 1-3, alpha 1, all ops) on each image:
/// the blend weights drawn (Beta as a 2-way Dirichlet, then a
/// 3-way one), then each chain's depth, and per op its index, bin and sign
/// (negated on a 1); the image times its weight plus each chain's times
/// its own, in float32, truncated to uint8 as `.to(torch.uint8)` does.
fn aug_mix(x: &Tensor, severity: i64, frame: (i64, i64), mode: i64) -> Tensor {
    const WIDTH: usize = 3;
    let b = x.size()[0];
    let dirichlet =
        |n: i64| Tensor::ones([1, n], (Kind::Float, Device::Cpu)).internal_sample_dirichlet();
    // Per image: the image's weight, then each chain's.
    let mut weights: [Vec<f32>; WIDTH + 1] = Default::default();
    let mut chains: [Vec<Vec<Draw>>; WIDTH] = Default::default();
    for _ in 0..b {
        let beta = dirichlet(2);
        let mixed = dirichlet(WIDTH as i64) * beta.select(1, 1).view([1, -1]);
        weights[0].push(beta.double_value(&[0, 0]) as f32);
        for (i, chain) in chains.iter_mut().enumerate() {
            weights[i + 1].push(mixed.double_value(&[0, i as i64]) as f32);
            let depth =
                Tensor::randint_low(1, 4, [1], (Kind::Int64, Device::Cpu)).int64_value(&[0]);
            chain.push(
                (0..depth)
                    .map(|_| one_op(&AUGMIX_OPS, AUGMIX, &|| randint(severity), frame))
                    .collect(),
            );
        }
    }
    let weights = Tensor::from_slice(&weights.concat())
        .to_device(x.device())
        .view([WIDTH as i64 + 1, b, 1, 1, 1]);
    let mut mix = weights.get(0) * x;
    for (i, chain) in chains.iter().enumerate() {
        mix += weights.get(i as i64 + 1) * run(x, chain, mode);
    }
    mix.to_kind(Kind::Uint8)
}

/// `_apply_op` on uint8 NCHW images, image i at magnitude `ms[i]` (`mode`:
/// grid_sample's interpolation).
fn apply(img: &Tensor, op: Op, ms: &[f64], mode: i64) -> Tensor {
    let (_, c, h, w) = img.size4().expect("a batch of images");
    // F.affine with center [0, 0] (the shears) or None (the rest): the
    // centre relative to the image centre, as torchvision's tensor path has it.
    let corner = [-(w as f64) * 0.5, -(h as f64) * 0.5];
    let zero = [0.0, 0.0];
    let affine = |matrix: &dyn Fn(f64) -> [f64; 6]| {
        let matrices: Vec<[f64; 6]> = ms.iter().map(|&m| matrix(m)).collect();
        warp(img, &matrices, mode)
    };
    let ratios: Vec<f64> = ms.iter().map(|m| 1.0 + m).collect();
    match op {
        Op::ShearX => affine(&|m| inverse_affine(corner, 0.0, zero, [m.atan().to_degrees(), 0.0])),
        Op::ShearY => affine(&|m| inverse_affine(corner, 0.0, zero, [0.0, m.atan().to_degrees()])),
        Op::TranslateX => affine(&|m| inverse_affine(zero, 0.0, [m.trunc(), 0.0], zero)),
        Op::TranslateY => affine(&|m| inverse_affine(zero, 0.0, [0.0, m.trunc()], zero)),
        // F.rotate: the inverse matrix of -angle.
        Op::Rotate => affine(&|m| inverse_affine(zero, -m, zero, zero)),
        Op::Brightness => blend(img, &img.zeros_like(), &ratios),
        Op::Color if c == 1 => img.shallow_clone(),
        Op::Color => blend(img, &grayscale(img), &ratios),
        Op::Contrast => {
            let gray = match c {
                3 => grayscale(img),
                _ => img.shallow_clone(),
            };
            let mean = gray
                .to_kind(Kind::Float)
                .mean_dim(&[-3i64, -2, -1][..], true, None::<Kind>);
            blend(img, &mean, &ratios)
        }
        Op::Sharpness if h > 2 && w > 2 => blend(img, &blurred(img), &ratios),
        Op::Sharpness => img.shallow_clone(),
        // img & -int(2 ** (8 - bits)), as uint8.
        Op::Posterize => {
            let masks: Vec<u8> = ms
                .iter()
                .map(|&m| (-(1i64 << (8 - m as i64))) as u8)
                .collect();
            let masks = Tensor::from_slice(&masks)
                .to_device(img.device())
                .view([-1, 1, 1, 1]);
            img.bitwise_and_tensor(&masks)
        }
        Op::Solarize => {
            let [at] = per_image([ms.iter().map(|&m| m as f32).collect()], img.device());
            img.bitwise_not().where_self(&img.ge_tensor(&at), img)
        }
        Op::AutoContrast => auto_contrast(img),
        Op::Equalize => equalize(img),
        Op::Invert => img.bitwise_not(),
        Op::Identity => img.shallow_clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ops of every kind, two an image, each image at its own magnitude
    /// (some images none, some only one op; every op but Identity in
    /// groups of several images).
    fn drawn(n: usize) -> Vec<Vec<Draw>> {
        // Every op: RandAugment's 14 and Invert.
        let ops: Vec<Op> = SPACE_OPS.into_iter().chain([Op::Invert]).collect();
        let magnitude = |op: Op, i: usize| {
            let t = (i % 7) as f64 / 3.0 - 1.0; // -1 to 1
            match op {
                Op::ShearX | Op::ShearY => 0.3 * t,
                Op::TranslateX | Op::TranslateY => 9.7 * t,
                Op::Rotate => 30.0 * t,
                Op::Posterize => (i % 9) as f64,
                Op::Solarize => (i * 37 % 256) as f64,
                _ => 0.9 * t,
            }
        };
        (0..n)
            .map(|i| {
                (0..i % 3)
                    .map(|k| {
                        let op = ops[(i / 3 + 5 * k) % ops.len()];
                        (op, magnitude(op, i + k))
                    })
                    .collect()
            })
            .collect()
    }

    /// An image augmented in a batch comes out as it does alone (a batch
    /// of one): each image takes its own magnitude, and no op mixes images
    /// (colour, grey and odd-sized images, low-contrast and flat ones;
    /// nearest and bilinear).
    #[test]
    fn an_image_is_augmented_as_it_would_be_alone() {
        tch::manual_seed(3);
        for (c, h, w) in [(3, 24, 24), (1, 20, 30), (3, 2, 5)] {
            let n = 90;
            let x = Tensor::randint(256, [n, c, h, w], (Kind::Uint8, Device::Cpu));
            // Low-contrast images (which equalization and autocontrast
            // change: a few hundred pixels over 16 values) and a flat one.
            let mut low = x.slice(0, 0, n, 2);
            low.copy_(&(low.floor_divide_scalar(16) + 100));
            let _ = x.get(5).fill_(77);
            let d = drawn(n as usize);
            for mode in [NEAREST, BILINEAR] {
                let batched = run(&x, &d, mode);
                for (i, draws) in d.iter().enumerate() {
                    let alone = run(&x.narrow(0, i as i64, 1), std::slice::from_ref(draws), mode);
                    assert!(
                        batched.get(i as i64).equal(&alone.get(0)),
                        "image {i} ({draws:?}, {c}x{h}x{w}, mode {mode})"
                    );
                }
                assert!(!batched.equal(&x), "the ops changed nothing");
            }
        }
    }
}
