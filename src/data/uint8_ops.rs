//! torchvision's `transforms._functional_tensor` image ops on uint8 CHW
//! tensors, as its tensor path computes them (the automatic augmentations'
//! building blocks): `_blend`, the grayscale weights, the 13-tap sharpness
//! kernel, autocontrast, the equalization LUT, and the affine warp (its
//! grid and `grid_sample`).

use tch::{Device, Kind, Tensor};

/// `_blend`: `(r·a + (1 − r)·b).clamp(0, 255)`, truncated to uint8.
pub fn blend(a: &Tensor, b: &Tensor, ratio: f64) -> Tensor {
    (a.g_mul_scalar(ratio) + b.g_mul_scalar(1.0 - ratio))
        .clamp(0.0, 255.0)
        .to_kind(Kind::Uint8)
}

/// `rgb_to_grayscale`: `0.2989 r + 0.587 g + 0.114 b`, truncated, 1×H×W.
pub fn grayscale(img: &Tensor) -> Tensor {
    let c = img.unbind(0);
    (c[0].g_mul_scalar(0.2989) + c[1].g_mul_scalar(0.587) + c[2].g_mul_scalar(0.114))
        .to_kind(Kind::Uint8)
        .unsqueeze(0)
}

/// `_blurred_degenerate_image`: the 3×3 kernel (1s around a 5, / 13) per
/// channel inside a one-pixel border that stays as it was.
pub fn blurred(img: &Tensor) -> Tensor {
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

/// `equalize`: each channel through the LUT of its cumulative histogram
/// (integer arithmetic, on the host).
pub fn equalize(img: &Tensor) -> Tensor {
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
pub fn warp(
    img: &Tensor,
    center: [f64; 2],
    angle: f64,
    translate: [f64; 2],
    shear: [f64; 2],
    mode: i64,
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
    // padding 0 = zeros; rounded back to uint8 (`_cast_squeeze_out`).
    img.unsqueeze(0)
        .to_kind(Kind::Float)
        .grid_sampler(&grid, mode, 0, false)
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
