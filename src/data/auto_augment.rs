//! torchvision's automatic augmentations on uint8 image tensors, as
//! torchvision's reference `train.py --auto-augment` offers them:
//! AutoAugment with a searched policy (`transforms.AutoAugment(policy)`),
//! RandAugment (`transforms.RandAugment(magnitude=m)`: two ops of 14 per
//! image at one magnitude) and TrivialAugment Wide
//! (`transforms.TrivialAugmentWide()`: one op at a random magnitude). Op for
//! op as torchvision's tensor path computes them
//! (`transforms._functional_tensor`: the affine grid and nearest
//! `grid_sample`, `_blend`, the grayscale weights, the 13-tap sharpness
//! kernel, the equalization LUT), with their draws in torchvision's order on
//! the CPU generator, so that the same generator state gives torchvision's
//! images. Each image of a batch is augmented in turn, as a DataLoader's
//! workers would.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::choice::Choice;

/// `--auto-augment`: `AutoAugmentPolicy` (the sub-policies learned on a
/// dataset), or RandAugment (`ra`) or TrivialAugment Wide (`ta_wide`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    Imagenet,
    Cifar10,
    Svhn,
    Ra,
    #[serde(rename = "ta_wide")]
    TaWide,
}

impl Choice for Policy {
    const ALL: &'static [Self] = &[
        Policy::Imagenet,
        Policy::Cifar10,
        Policy::Svhn,
        Policy::Ra,
        Policy::TaWide,
    ];
    fn name(self) -> &'static str {
        match self {
            Policy::Imagenet => "imagenet",
            Policy::Cifar10 => "cifar10",
            Policy::Svhn => "svhn",
            Policy::Ra => "ra",
            Policy::TaWide => "ta_wide",
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

/// An `_augmentation_space`: `bins` magnitudes per op over AutoAugment's
/// and RandAugment's ranges, or TrivialAugment Wide's (`wide`).
#[derive(Clone, Copy)]
struct Space {
    bins: i64,
    wide: bool,
}

const AUTO: Space = Space {
    bins: 10,
    wide: false,
};
const RAND: Space = Space {
    bins: RA_BINS,
    wide: false,
};
const WIDE: Space = Space {
    bins: 31,
    wide: true,
};

/// The `bin`-th of `space`'s magnitudes for `op` on an `h x w` image
/// (float32 as torchvision's tensors hold them), and whether it takes a
/// random sign; `None` for an op without magnitudes.
fn magnitude(space: Space, op: Op, bin: i64, h: i64, w: i64) -> Option<(f64, bool)> {
    let Space { bins, wide } = space;
    let range = |end: f64| {
        Tensor::linspace(0.0, end, bins, (Kind::Float, Device::Cpu)).double_value(&[bin])
    };
    let either = |narrow: f64, wide_end: f64| if wide { wide_end } else { narrow };
    let translate = |side: i64| either(150.0 / 331.0 * side as f64, 32.0);
    Some(match op {
        Op::ShearX | Op::ShearY => (range(either(0.3, 0.99)), true),
        Op::TranslateX => (range(translate(w)), true),
        Op::TranslateY => (range(translate(h)), true),
        Op::Rotate => (range(either(30.0, 135.0)), true),
        Op::Brightness | Op::Color | Op::Contrast | Op::Sharpness => {
            (range(either(0.9, 0.99)), true)
        }
        // 8 - (arange(bins) / ((bins - 1) / 4)).round().int() (/ 6 wide)
        Op::Posterize => {
            let v = (Tensor::arange(bins, (Kind::Int64, Device::Cpu))
                / ((bins - 1) as f64 / either(4.0, 6.0)))
            .round()
            .to_kind(Kind::Int)
            .int64_value(&[bin]);
            ((8 - v) as f64, false)
        }
        Op::Solarize => (
            Tensor::linspace(255.0, 0.0, bins, (Kind::Float, Device::Cpu)).double_value(&[bin]),
            false,
        ),
        Op::AutoContrast | Op::Equalize | Op::Invert | Op::Identity => return None,
    })
}

/// `--auto-augment` applied to each uint8 image of the NCHW batch `x` in
/// turn (on `x`'s device; the draws on the CPU generator); `ra_magnitude`
/// is RandAugment's.
pub fn auto_augment(x: &Tensor, policy: Policy, ra_magnitude: i64) -> Tensor {
    let (b, _, h, w) = x.size4().expect("a batch of images");
    let images: Vec<Tensor> = (0..b)
        .map(|i| {
            let img = x.get(i);
            match policy {
                Policy::Imagenet => searched(img, &IMAGENET, h, w),
                Policy::Cifar10 => searched(img, &CIFAR10, h, w),
                Policy::Svhn => searched(img, &SVHN, h, w),
                Policy::Ra => rand_augment(img, ra_magnitude, h, w),
                Policy::TaWide => trivial_augment(img, h, w),
            }
        })
        .collect();
    Tensor::stack(&images, 0)
}

/// A draw of `torch.randint(high, (1,))`.
fn randint(high: i64) -> i64 {
    Tensor::randint(high, [1], (Kind::Int64, Device::Cpu)).int64_value(&[0])
}

/// `AutoAugment.forward`: a sub-policy, two probabilities and two signs
/// drawn, each op applied if its probability says so (negated on a 0).
fn searched(mut img: Tensor, table: &[[Step; 2]], h: i64, w: i64) -> Tensor {
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
        img = apply(&img, op, m);
    }
    img
}

/// `RandAugment.forward`: two ops drawn in turn, each at the bin
/// `magnitude_bin`, a sign drawn for the signed ones (negated on a 1).
fn rand_augment(mut img: Tensor, magnitude_bin: i64, h: i64, w: i64) -> Tensor {
    for _ in 0..2 {
        let op = SPACE_OPS[randint(SPACE_OPS.len() as i64) as usize];
        let (mut m, signed) = magnitude(RAND, op, magnitude_bin, h, w).unwrap_or((0.0, false));
        if signed && randint(2) != 0 {
            m = -m;
        }
        img = apply(&img, op, m);
    }
    img
}

/// `TrivialAugmentWide.forward`: one op drawn, then its bin (ops with
/// magnitudes), then its sign (signed ops; negated on a 1).
fn trivial_augment(img: Tensor, h: i64, w: i64) -> Tensor {
    let op = SPACE_OPS[randint(SPACE_OPS.len() as i64) as usize];
    let without = matches!(op, Op::Identity | Op::AutoContrast | Op::Equalize);
    let (mut m, signed) = match without {
        true => (0.0, false),
        false => magnitude(WIDE, op, randint(WIDE.bins), h, w).unwrap_or((0.0, false)),
    };
    if signed && randint(2) != 0 {
        m = -m;
    }
    apply(&img, op, m)
}

/// `_apply_op` on one uint8 CHW image.
fn apply(img: &Tensor, op: Op, m: f64) -> Tensor {
    let (h, w) = (img.size()[1], img.size()[2]);
    // F.affine with center [0, 0] (the shears) or None (the rest): the
    // centre relative to the image centre, as torchvision's tensor path has it.
    let corner = [-(w as f64) * 0.5, -(h as f64) * 0.5];
    match op {
        Op::ShearX => warp(img, corner, 0.0, [0.0, 0.0], [m.atan().to_degrees(), 0.0]),
        Op::ShearY => warp(img, corner, 0.0, [0.0, 0.0], [0.0, m.atan().to_degrees()]),
        Op::TranslateX => warp(img, [0.0, 0.0], 0.0, [m.trunc(), 0.0], [0.0, 0.0]),
        Op::TranslateY => warp(img, [0.0, 0.0], 0.0, [0.0, m.trunc()], [0.0, 0.0]),
        // F.rotate: the inverse matrix of -angle.
        Op::Rotate => warp(img, [0.0, 0.0], -m, [0.0, 0.0], [0.0, 0.0]),
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

/// `_blend`: `(r·a + (1 − r)·b).clamp(0, 255)`, truncated to uint8.
fn blend(a: &Tensor, b: &Tensor, ratio: f64) -> Tensor {
    (a.g_mul_scalar(ratio) + b.g_mul_scalar(1.0 - ratio))
        .clamp(0.0, 255.0)
        .to_kind(Kind::Uint8)
}

/// `rgb_to_grayscale`: `0.2989 r + 0.587 g + 0.114 b`, truncated, 1×H×W.
fn grayscale(img: &Tensor) -> Tensor {
    let c = img.unbind(0);
    (c[0].g_mul_scalar(0.2989) + c[1].g_mul_scalar(0.587) + c[2].g_mul_scalar(0.114))
        .to_kind(Kind::Uint8)
        .unsqueeze(0)
}

/// `_blurred_degenerate_image`: the 3×3 kernel (1s around a 5, / 13) per
/// channel inside a one-pixel border that stays as it was.
fn blurred(img: &Tensor) -> Tensor {
    let c = img.size()[0];
    let mut kernel = Tensor::ones([3, 3], (Kind::Float, img.device()));
    let _ = kernel.get(1).get(1).fill_(5.0);
    kernel = &kernel / kernel.sum(None::<Kind>);
    let kernel = kernel.expand([c, 1, 3, 3], false);
    let inner = img
        .unsqueeze(0)
        .to_kind(Kind::Float)
        .conv2d(&kernel, None::<Tensor>, [1, 1], [0, 0], [1, 1], c)
        .round()
        .to_kind(Kind::Uint8)
        .squeeze_dim(0);
    let out = img.copy();
    let (h, w) = (img.size()[1], img.size()[2]);
    out.narrow(1, 1, h - 2).narrow(2, 1, w - 2).copy_(&inner);
    out
}

/// `autocontrast`: each channel stretched to 0..255 (a flat one left).
fn auto_contrast(img: &Tensor) -> Tensor {
    let lo = img.amin(&[-2i64, -1][..], true).to_kind(Kind::Float);
    let hi = img.amax(&[-2i64, -1][..], true).to_kind(Kind::Float);
    // `bound / (hi - lo)` is torch's __rtruediv__: reciprocal, then times.
    let scale = (&hi - &lo).reciprocal() * 255.0;
    let flat = scale.isfinite().logical_not();
    let lo = lo.masked_fill(&flat, 0.0);
    let scale = scale.masked_fill(&flat, 1.0);
    ((img - lo) * scale).clamp(0.0, 255.0).to_kind(Kind::Uint8)
}

/// `equalize`: each channel through the LUT of its cumulative histogram
/// (integer arithmetic, on the host).
fn equalize(img: &Tensor) -> Tensor {
    let channels: Vec<Tensor> = img
        .unbind(0)
        .iter()
        .map(|chan| {
            let hist: Vec<i64> = Vec::try_from(
                chan.reshape([-1])
                    .bincount(None::<Tensor>, 256)
                    .to_device(Device::Cpu),
            )
            .unwrap_or_default();
            let nonzero: Vec<i64> = hist.iter().copied().filter(|&v| v != 0).collect();
            let step = nonzero[..nonzero.len().saturating_sub(1)]
                .iter()
                .sum::<i64>()
                / 255;
            if step == 0 {
                return chan.shallow_clone();
            }
            let mut lut = vec![0i64; 256];
            let mut cum = 0;
            for (i, v) in hist.iter().enumerate().take(255) {
                cum += v;
                lut[i + 1] = ((cum + step / 2) / step).clamp(0, 255);
            }
            let lut = Tensor::from_slice(&lut).to_device(chan.device());
            lut.index_select(0, &chan.reshape([-1]).to_kind(Kind::Int64))
                .view_as(chan)
                .to_kind(Kind::Uint8)
        })
        .collect();
    Tensor::stack(&channels, 0)
}

/// `F.affine`/`F.rotate` on a tensor with nearest interpolation and no
/// fill: `_get_inverse_affine_matrix`, `_gen_affine_grid` and
/// `grid_sample` (zeros outside), rounded back to uint8.
fn warp(
    img: &Tensor,
    center: [f64; 2],
    angle: f64,
    translate: [f64; 2],
    shear: [f64; 2],
) -> Tensor {
    let (h, w) = (img.size()[1], img.size()[2]);
    let matrix = inverse_affine(center, angle, translate, shear);
    let dev = img.device();
    let theta = Tensor::from_slice(&matrix.map(|v| v as f32))
        .to_device(dev)
        .view([1, 2, 3]);
    let opts = (Kind::Float, dev);
    let base = Tensor::empty([1, h, w, 3], opts);
    let d = 0.5;
    let xs = Tensor::linspace(-(w as f64) * 0.5 + d, w as f64 * 0.5 + d - 1.0, w, opts);
    let ys =
        Tensor::linspace(-(h as f64) * 0.5 + d, h as f64 * 0.5 + d - 1.0, h, opts).unsqueeze(-1);
    base.select(3, 0).copy_(&xs);
    base.select(3, 1).copy_(&ys);
    let _ = base.select(3, 2).fill_(1.0);
    let half = Tensor::from_slice(&[0.5 * w as f64, 0.5 * h as f64])
        .to_kind(Kind::Float)
        .to_device(dev);
    let rescaled = theta.transpose(1, 2) / half;
    let grid = base.view([1, h * w, 3]).bmm(&rescaled).view([1, h, w, 2]);
    // mode 0 = bilinear, 1 = nearest; padding 0 = zeros.
    img.unsqueeze(0)
        .to_kind(Kind::Float)
        .grid_sampler(&grid, 1, 0, false)
        .round()
        .to_kind(Kind::Uint8)
        .squeeze_dim(0)
}

/// torchvision's `_get_inverse_affine_matrix` (scale 1, inverted), in
/// degrees as it takes them.
fn inverse_affine(center: [f64; 2], angle: f64, translate: [f64; 2], shear: [f64; 2]) -> [f64; 6] {
    let rot = angle.to_radians();
    let (sx, sy) = (shear[0].to_radians(), shear[1].to_radians());
    let [cx, cy] = center;
    let [tx, ty] = translate;
    let a = (rot - sy).cos() / sy.cos();
    let b = -(rot - sy).cos() * sx.tan() / sy.cos() - rot.sin();
    let c = (rot - sy).sin() / sy.cos();
    let d = -(rot - sy).sin() * sx.tan() / sy.cos() + rot.cos();
    let mut m = [d, -b, 0.0, -c, a, 0.0];
    m[2] += m[0] * (-cx - tx) + m[1] * (-cy - ty);
    m[5] += m[3] * (-cx - tx) + m[4] * (-cy - ty);
    m[2] += cx;
    m[5] += cy;
    m
}
