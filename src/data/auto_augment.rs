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
//! images. Each image of a batch is augmented in turn, as a DataLoader's
//! workers would.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::uint8_ops::{auto_contrast, blend, blurred, equalize, grayscale, warp};
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    ShearX,
    ShearY,
    TranslateX,
    TranslateY,
    Rotate,
    Brightness,
    Color,
    Contrast,
    Sharpness,
    Posterize,
    Solarize,
    AutoContrast,
    Equalize,
    Invert,
    Identity,
}

/// RandAugment's and TrivialAugment's ops, in their `_augmentation_space`'s order.
const SPACE_OPS: [Op; 14] = [
    Op::Identity,
    Op::ShearX,
    Op::ShearY,
    Op::TranslateX,
    Op::TranslateY,
    Op::Rotate,
    Op::Brightness,
    Op::Color,
    Op::Contrast,
    Op::Sharpness,
    Op::Posterize,
    Op::Solarize,
    Op::AutoContrast,
    Op::Equalize,
];

/// An op, its probability and its magnitude bin (-1: none).
type Step = (Op, f32, i8);

const IMAGENET: [[Step; 2]; 25] = [
    [(Op::Posterize, 0.4, 8), (Op::Rotate, 0.6, 9)],
    [(Op::Solarize, 0.6, 5), (Op::AutoContrast, 0.6, -1)],
    [(Op::Equalize, 0.8, -1), (Op::Equalize, 0.6, -1)],
    [(Op::Posterize, 0.6, 7), (Op::Posterize, 0.6, 6)],
    [(Op::Equalize, 0.4, -1), (Op::Solarize, 0.2, 4)],
    [(Op::Equalize, 0.4, -1), (Op::Rotate, 0.8, 8)],
    [(Op::Solarize, 0.6, 3), (Op::Equalize, 0.6, -1)],
    [(Op::Posterize, 0.8, 5), (Op::Equalize, 1.0, -1)],
    [(Op::Rotate, 0.2, 3), (Op::Solarize, 0.6, 8)],
    [(Op::Equalize, 0.6, -1), (Op::Posterize, 0.4, 6)],
    [(Op::Rotate, 0.8, 8), (Op::Color, 0.4, 0)],
    [(Op::Rotate, 0.4, 9), (Op::Equalize, 0.6, -1)],
    [(Op::Equalize, 0.0, -1), (Op::Equalize, 0.8, -1)],
    [(Op::Invert, 0.6, -1), (Op::Equalize, 1.0, -1)],
    [(Op::Color, 0.6, 4), (Op::Contrast, 1.0, 8)],
    [(Op::Rotate, 0.8, 8), (Op::Color, 1.0, 2)],
    [(Op::Color, 0.8, 8), (Op::Solarize, 0.8, 7)],
    [(Op::Sharpness, 0.4, 7), (Op::Invert, 0.6, -1)],
    [(Op::ShearX, 0.6, 5), (Op::Equalize, 1.0, -1)],
    [(Op::Color, 0.4, 0), (Op::Equalize, 0.6, -1)],
    [(Op::Equalize, 0.4, -1), (Op::Solarize, 0.2, 4)],
    [(Op::Solarize, 0.6, 5), (Op::AutoContrast, 0.6, -1)],
    [(Op::Invert, 0.6, -1), (Op::Equalize, 1.0, -1)],
    [(Op::Color, 0.6, 4), (Op::Contrast, 1.0, 8)],
    [(Op::Equalize, 0.8, -1), (Op::Equalize, 0.6, -1)],
];

const CIFAR10: [[Step; 2]; 25] = [
    [(Op::Invert, 0.1, -1), (Op::Contrast, 0.2, 6)],
    [(Op::Rotate, 0.7, 2), (Op::TranslateX, 0.3, 9)],
    [(Op::Sharpness, 0.8, 1), (Op::Sharpness, 0.9, 3)],
    [(Op::ShearY, 0.5, 8), (Op::TranslateY, 0.7, 9)],
    [(Op::AutoContrast, 0.5, -1), (Op::Equalize, 0.9, -1)],
    [(Op::ShearY, 0.2, 7), (Op::Posterize, 0.3, 7)],
    [(Op::Color, 0.4, 3), (Op::Brightness, 0.6, 7)],
    [(Op::Sharpness, 0.3, 9), (Op::Brightness, 0.7, 9)],
    [(Op::Equalize, 0.6, -1), (Op::Equalize, 0.5, -1)],
    [(Op::Contrast, 0.6, 7), (Op::Sharpness, 0.6, 5)],
    [(Op::Color, 0.7, 7), (Op::TranslateX, 0.5, 8)],
    [(Op::Equalize, 0.3, -1), (Op::AutoContrast, 0.4, -1)],
    [(Op::TranslateY, 0.4, 3), (Op::Sharpness, 0.2, 6)],
    [(Op::Brightness, 0.9, 6), (Op::Color, 0.2, 8)],
    [(Op::Solarize, 0.5, 2), (Op::Invert, 0.0, -1)],
    [(Op::Equalize, 0.2, -1), (Op::AutoContrast, 0.6, -1)],
    [(Op::Equalize, 0.2, -1), (Op::Equalize, 0.6, -1)],
    [(Op::Color, 0.9, 9), (Op::Equalize, 0.6, -1)],
    [(Op::AutoContrast, 0.8, -1), (Op::Solarize, 0.2, 8)],
    [(Op::Brightness, 0.1, 3), (Op::Color, 0.7, 0)],
    [(Op::Solarize, 0.4, 5), (Op::AutoContrast, 0.9, -1)],
    [(Op::TranslateY, 0.9, 9), (Op::TranslateY, 0.7, 9)],
    [(Op::AutoContrast, 0.9, -1), (Op::Solarize, 0.8, 3)],
    [(Op::Equalize, 0.8, -1), (Op::Invert, 0.1, -1)],
    [(Op::TranslateY, 0.7, 9), (Op::AutoContrast, 0.9, -1)],
];

const SVHN: [[Step; 2]; 25] = [
    [(Op::ShearX, 0.9, 4), (Op::Invert, 0.2, -1)],
    [(Op::ShearY, 0.9, 8), (Op::Invert, 0.7, -1)],
    [(Op::Equalize, 0.6, -1), (Op::Solarize, 0.6, 6)],
    [(Op::Invert, 0.9, -1), (Op::Equalize, 0.6, -1)],
    [(Op::Equalize, 0.6, -1), (Op::Rotate, 0.9, 3)],
    [(Op::ShearX, 0.9, 4), (Op::AutoContrast, 0.8, -1)],
    [(Op::ShearY, 0.9, 8), (Op::Invert, 0.4, -1)],
    [(Op::ShearY, 0.9, 5), (Op::Solarize, 0.2, 6)],
    [(Op::Invert, 0.9, -1), (Op::AutoContrast, 0.8, -1)],
    [(Op::Equalize, 0.6, -1), (Op::Rotate, 0.9, 3)],
    [(Op::ShearX, 0.9, 4), (Op::Solarize, 0.3, 3)],
    [(Op::ShearY, 0.8, 8), (Op::Invert, 0.7, -1)],
    [(Op::Equalize, 0.9, -1), (Op::TranslateY, 0.6, 6)],
    [(Op::Invert, 0.9, -1), (Op::Equalize, 0.6, -1)],
    [(Op::Contrast, 0.3, 3), (Op::Rotate, 0.8, 4)],
    [(Op::Invert, 0.8, -1), (Op::TranslateY, 0.0, 2)],
    [(Op::ShearY, 0.7, 6), (Op::Solarize, 0.4, 8)],
    [(Op::Invert, 0.6, -1), (Op::Rotate, 0.8, 4)],
    [(Op::ShearY, 0.3, 7), (Op::TranslateX, 0.9, 3)],
    [(Op::ShearX, 0.1, 6), (Op::Invert, 0.6, -1)],
    [(Op::Solarize, 0.7, 2), (Op::TranslateY, 0.6, 7)],
    [(Op::ShearY, 0.8, 4), (Op::Invert, 0.8, -1)],
    [(Op::ShearX, 0.7, 9), (Op::TranslateY, 0.8, 3)],
    [(Op::ShearY, 0.8, 5), (Op::AutoContrast, 0.7, -1)],
    [(Op::ShearX, 0.7, 2), (Op::Invert, 0.1, -1)],
];

/// AugMix's ops (`all_ops`), in its `_augmentation_space`'s order.
const AUGMIX_OPS: [Op; 13] = [
    Op::ShearX,
    Op::ShearY,
    Op::TranslateX,
    Op::TranslateY,
    Op::Rotate,
    Op::Posterize,
    Op::Solarize,
    Op::AutoContrast,
    Op::Equalize,
    Op::Brightness,
    Op::Color,
    Op::Contrast,
    Op::Sharpness,
];

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
    /// Applied to each uint8 image of the NCHW batch `x` in turn (on `x`'s
    /// device; the draws on the CPU generator).
    pub fn apply(&self, x: &Tensor) -> Tensor {
        let (b, _, h, w) = x.size4().expect("a batch of images");
        let default = match self.policy {
            Policy::Augmix => BILINEAR,
            _ => NEAREST,
        };
        let frame = (
            h,
            w,
            self.interpolation.map_or(default, Interpolation::mode),
        );
        let images: Vec<Tensor> = (0..b)
            .map(|i| {
                let img = x.get(i);
                match self.policy {
                    Policy::Imagenet => searched(img, &IMAGENET, frame),
                    Policy::Cifar10 => searched(img, &CIFAR10, frame),
                    Policy::Svhn => searched(img, &SVHN, frame),
                    Policy::Ra => rand_augment(img, self.ra_magnitude, frame),
                    Policy::TaWide => trivial_augment(img, frame),
                    Policy::Augmix => aug_mix(img, self.augmix_severity, frame),
                }
            })
            .collect();
        Tensor::stack(&images, 0)
    }
}

/// An image's height and width, and the grid_sample mode of its ops.
type Frame = (i64, i64, i64);

/// A draw of `torch.randint(high, (1,))`.
fn randint(high: i64) -> i64 {
    Tensor::randint(high, [1], (Kind::Int64, Device::Cpu)).int64_value(&[0])
}

/// `AutoAugment.forward`: a sub-policy, two probabilities and two signs
/// drawn, each op applied if its probability says so (negated on a 0).
fn searched(mut img: Tensor, table: &[[Step; 2]], (h, w, mode): Frame) -> Tensor {
    let id = randint(table.len() as i64) as usize;
    let probs = Tensor::rand([2], (Kind::Float, Device::Cpu));
    let signs = Tensor::randint(2, [2], (Kind::Int64, Device::Cpu));
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
        img = apply(&img, op, m, mode);
    }
    img
}

/// `RandAugment.forward`: two ops drawn in turn, each at the bin
/// `magnitude_bin`, a sign drawn for the signed ones (negated on a 1).
fn rand_augment(mut img: Tensor, magnitude_bin: i64, (h, w, mode): Frame) -> Tensor {
    for _ in 0..2 {
        let op = SPACE_OPS[randint(SPACE_OPS.len() as i64) as usize];
        let (mut m, signed) = magnitude(RAND, op, magnitude_bin, h, w).unwrap_or((0.0, false));
        if signed && randint(2) != 0 {
            m = -m;
        }
        img = apply(&img, op, m, mode);
    }
    img
}

/// `TrivialAugmentWide.forward`: one op drawn, then its bin (ops with
/// magnitudes), then its sign (signed ops; negated on a 1).
fn trivial_augment(img: Tensor, (h, w, mode): Frame) -> Tensor {
    let op = SPACE_OPS[randint(SPACE_OPS.len() as i64) as usize];
    let without = matches!(op, Op::Identity | Op::AutoContrast | Op::Equalize);
    let (mut m, signed) = match without {
        true => (0.0, false),
        false => magnitude(WIDE, op, randint(WIDE.bins), h, w).unwrap_or((0.0, false)),
    };
    if signed && randint(2) != 0 {
        m = -m;
    }
    apply(&img, op, m, mode)
}

/// `AugMix.forward` (width 3, depth 1-3, alpha 1, all ops):
/// the blend weights drawn (Beta as a 2-way Dirichlet, then a
/// 3-way one), then each chain's depth, and per op its index, bin and sign
/// (negated on a 1); the image times its weight plus each chain's times
/// its own, in float32, truncated to uint8 as `.to(torch.uint8)` does.
fn aug_mix(img: Tensor, severity: i64, (h, w, mode): Frame) -> Tensor {
    const WIDTH: i64 = 3;
    let dirichlet = |n: i64| {
        Tensor::ones([1, n], (Kind::Float, Device::Cpu))
            .internal_sample_dirichlet()
            .to_device(img.device())
    };
    let beta = dirichlet(2);
    let weights = dirichlet(WIDTH) * beta.select(1, 1).view([1, -1]);
    let mut mix = beta.select(1, 0) * &img;
    for i in 0..WIDTH {
        let depth = Tensor::randint_low(1, 4, [1], (Kind::Int64, Device::Cpu)).int64_value(&[0]);
        let mut aug = img.shallow_clone();
        for _ in 0..depth {
            let op = AUGMIX_OPS[randint(AUGMIX_OPS.len() as i64) as usize];
            let without = matches!(op, Op::AutoContrast | Op::Equalize);
            let (mut m, signed) = match without {
                true => (0.0, false),
                false => magnitude(AUGMIX, op, randint(severity), h, w).unwrap_or((0.0, false)),
            };
            if signed && randint(2) != 0 {
                m = -m;
            }
            aug = apply(&aug, op, m, mode);
        }
        mix += weights.select(1, i) * aug;
    }
    mix.to_kind(Kind::Uint8)
}

/// `_apply_op` on one uint8 CHW image (`mode`: grid_sample's interpolation).
fn apply(img: &Tensor, op: Op, m: f64, mode: i64) -> Tensor {
    let (h, w) = (img.size()[1], img.size()[2]);
    // F.affine with center [0, 0] (the shears) or None (the rest): the
    // centre relative to the image centre, as torchvision's tensor path has it.
    let corner = [-(w as f64) * 0.5, -(h as f64) * 0.5];
    match op {
        Op::ShearX => warp(
            img,
            corner,
            0.0,
            [0.0, 0.0],
            [m.atan().to_degrees(), 0.0],
            mode,
        ),
        Op::ShearY => warp(
            img,
            corner,
            0.0,
            [0.0, 0.0],
            [0.0, m.atan().to_degrees()],
            mode,
        ),
        Op::TranslateX => warp(img, [0.0, 0.0], 0.0, [m.trunc(), 0.0], [0.0, 0.0], mode),
        Op::TranslateY => warp(img, [0.0, 0.0], 0.0, [0.0, m.trunc()], [0.0, 0.0], mode),
        // F.rotate: the inverse matrix of -angle.
        Op::Rotate => warp(img, [0.0, 0.0], -m, [0.0, 0.0], [0.0, 0.0], mode),
        Op::Brightness => blend(img, &img.zeros_like(), 1.0 + m),
        Op::Color => match img.size()[0] {
            1 => img.shallow_clone(),
            _ => blend(img, &grayscale(img), 1.0 + m),
        },
        Op::Contrast => {
            let gray = match img.size()[0] {
                3 => grayscale(img),
                _ => img.shallow_clone(),
            };
            let mean = gray
                .to_kind(Kind::Float)
                .mean_dim(&[-3i64, -2, -1][..], true, None::<Kind>);
            blend(img, &mean, 1.0 + m)
        }
        Op::Sharpness if h > 2 && w > 2 => blend(img, &blurred(img), 1.0 + m),
        Op::Sharpness => img.shallow_clone(),
        // img & -int(2 ** (8 - bits))
        Op::Posterize => img.bitwise_and(-(1i64 << (8 - m as i64))),
        Op::Solarize => img.bitwise_not().where_self(&img.ge(m), img),
        Op::AutoContrast => auto_contrast(img),
        Op::Equalize => equalize(img),
        Op::Invert => img.bitwise_not(),
        Op::Identity => img.shallow_clone(),
    }
}
