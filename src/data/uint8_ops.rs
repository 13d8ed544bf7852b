//! torchvision's `transforms._functional_tensor` image ops on uint8 NCHW
//! batches, as its tensor path computes them on one image (the automatic
//! augmentations' building blocks): `_blend`, the grayscale weights, the
//! 13-tap sharpness kernel, autocontrast, the equalization LUT, and the
//! affine warp (its grid and `grid_sample`). Each image of a batch takes
//! its own magnitude; what an image gets does not depend on the others
//! (the same arithmetic, element for element, as on that image alone).

use tch::{Device, Kind, Tensor};

/// Per-image float32 factors `[n, 1, 1, 1]` on `dev`, one row per list.
pub fn per_image<const K: usize>(rows: [Vec<f32>; K], dev: Device) -> [Tensor; K] {
    let n = rows[0].len() as i64;
    let all = Tensor::from_slice(&rows.concat())
        .to_device(dev)
        .view([K as i64, n, 1, 1, 1]);
    std::array::from_fn(|k| all.get(k as i64))
}

/// `_blend` with image i's `ratios[i]`: `(r·a + (1 − r)·b).clamp(0, 255)`,
/// truncated to uint8 (r and 1 − r rounded to float32, as torch rounds a
/// Python float it multiplies a uint8 tensor by).
pub fn blend(a: &Tensor, b: &Tensor, ratios: &[f64]) -> Tensor {
    let [r, s] = per_image(
        [
            ratios.iter().map(|&r| r as f32).collect(),
            ratios.iter().map(|&r| (1.0 - r) as f32).collect(),
        ],
        a.device(),
    );
    (a * r + b * s).clamp(0.0, 255.0).to_kind(Kind::Uint8)
}

/// `rgb_to_grayscale`: `0.2989 r + 0.587 g + 0.114 b`, truncated, N×1×H×W.
pub fn grayscale(img: &Tensor) -> Tensor {
    let c = img.unbind(1);
    (c[0].g_mul_scalar(0.2989) + c[1].g_mul_scalar(0.587) + c[2].g_mul_scalar(0.114))
        .to_kind(Kind::Uint8)
        .unsqueeze(1)
}

/// `_blurred_degenerate_image`: the 3×3 kernel (1s around a 5, / 13) per
/// channel inside a one-pixel border that stays as it was. (A blurred value
/// is a whole number / 13, never halfway between two integers, so its
/// rounding does not depend on the convolution's order of summation.)
pub fn blurred(img: &Tensor) -> Tensor {
    let (_, c, h, w) = img.size4().expect("a batch of images");
    let mut kernel = Tensor::ones([3, 3], (Kind::Float, img.device()));
    let _ = kernel.get(1).get(1).fill_(5.0);
    kernel = &kernel / kernel.sum(None::<Kind>);
    let kernel = kernel.expand([c, 1, 3, 3], false);
    let inner = img
        .to_kind(Kind::Float)
        .conv2d(&kernel, None::<Tensor>, [1, 1], [0, 0], [1, 1], c)
        .round()
        .to_kind(Kind::Uint8);
    let out = img.copy();
    out.narrow(2, 1, h - 2).narrow(3, 1, w - 2).copy_(&inner);
    out
}

/// `autocontrast`: each channel stretched to 0..255 (a flat one left).
pub fn auto_contrast(img: &Tensor) -> Tensor {
    let lo = img.amin(&[-2i64, -1][..], true).to_kind(Kind::Float);
    let hi = img.amax(&[-2i64, -1][..], true).to_kind(Kind::Float);
    // `bound / (hi - lo)` is torch's __rtruediv__: reciprocal, then times.
    let scale = (&hi - &lo).reciprocal() * 255.0;
    let flat = scale.isfinite().logical_not();
    let lo = lo.masked_fill(&flat, 0.0);
    let scale = scale.masked_fill(&flat, 1.0);
    ((img - lo) * scale).clamp(0.0, 255.0).to_kind(Kind::Uint8)
}

/// `equalize`: each channel of each image through the LUT of its
/// cumulative histogram (integer arithmetic, on the host; one histogram
/// pass and one copy each way for the batch).
pub fn equalize(img: &Tensor) -> Tensor {
    let (n, c, h, w) = img.size4().expect("a batch of images");
    let dev = img.device();
    let at = img.reshape([n * c, h * w]).to_kind(Kind::Int64)
        + Tensor::arange(n * c, (Kind::Int64, dev)).unsqueeze(1) * 256;
    let at = at.reshape([-1]);
    let hist = at
        .bincount(None::<Tensor>, n * c * 256)
        .to_device(Device::Cpu);
    let hist = Vec::<i64>::try_from(hist).unwrap_or_default();
    let lut: Vec<i64> = hist.chunks_exact(256).flat_map(channel_lut).collect();
    if lut.len() as i64 != n * c * 256 {
        return img.shallow_clone();
    }
    Tensor::from_slice(&lut)
        .to_device(dev)
        .index_select(0, &at)
        .view_as(img)
        .to_kind(Kind::Uint8)
}

/// `_scale_channel`'s LUT for one channel's histogram (the identity where
/// its step is 0: the channel is left as it was).
fn channel_lut(hist: &[i64]) -> [i64; 256] {
    let mut lut: [i64; 256] = std::array::from_fn(|i| i as i64);
    let nonzero: Vec<i64> = hist.iter().copied().filter(|&v| v != 0).collect();
    let step = nonzero[..nonzero.len().saturating_sub(1)]
        .iter()
        .sum::<i64>()
        / 255;
    if step == 0 {
        return lut;
    }
    lut[0] = 0;
    let mut cum = 0;
    for (i, v) in hist.iter().enumerate().take(255) {
        cum += v;
        lut[i + 1] = ((cum + step / 2) / step).clamp(0, 255);
    }
    lut
}

/// `F.affine`/`F.rotate` on each image with no fill, image i by the
/// inverse matrix `matrices[i]` (from [`inverse_affine`]):
/// `_gen_affine_grid` and `grid_sample` (`mode`; zeros outside), rounded
/// back to uint8.
pub fn warp(img: &Tensor, matrices: &[[f64; 6]], mode: i64) -> Tensor {
    let (n, _, h, w) = img.size4().expect("a batch of images");
    let dev = img.device();
    let flat: Vec<f32> = matrices.iter().flatten().map(|&v| v as f32).collect();
    let theta = Tensor::from_slice(&flat).to_device(dev).view([n, 2, 3]);
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
    let grid = base
        .view([1, h * w, 3])
        .expand([n, h * w, 3], false)
        .bmm(&rescaled)
        .view([n, h, w, 2]);
    // padding 0 = zeros; rounded back to uint8 (`_cast_squeeze_out`).
    img.to_kind(Kind::Float)
        .grid_sampler(&grid, mode, 0, false)
        .round()
        .to_kind(Kind::Uint8)
}

/// torchvision's `_get_inverse_affine_matrix` (scale 1, inverted), in
/// degrees as it takes them.
pub fn inverse_affine(
    center: [f64; 2],
    angle: f64,
    translate: [f64; 2],
    shear: [f64; 2],
) -> [f64; 6] {
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
