//! Batched, device-side preprocessing: random crop with zero padding,
//! horizontal flip, conversion to float and normalization. One gather per
//! batch; no per-image host work and no host<->device copies of images.

use tch::{Device, Kind, Tensor};

/// Crops `x` (`B x C x H x W`, any dtype) after zero-padding it by `pad` on
/// every side, at per-image offsets `oy`, `ox` in `0..=2*pad`, and mirrors
/// the images where `flip` is true: torchvision's `RandomCrop(H, padding=pad)`
/// followed by `RandomHorizontalFlip`, with the random draws made explicit.
pub fn crop_flip(x: &Tensor, oy: &Tensor, ox: &Tensor, flip: &Tensor, pad: i64) -> Tensor {
    let (b, c, h, w) = x.size4().expect("crop_flip expects a 4-d batch");
    let dev = x.device();
    let opts = (Kind::Int64, dev);
    let padded = x.constant_pad_nd([pad, pad, pad, pad]);
    let rows = oy.view([b, 1]) + Tensor::arange(h, opts).view([1, h]);
    let j = Tensor::arange(w, opts).view([1, w]);
    let mirrored = (w - 1) - &j;
    let cols = ox.view([b, 1]) + mirrored.where_self(&flip.view([b, 1]), &j);
    let bi = Tensor::arange(b, opts).view([b, 1, 1, 1]);
    let ci = Tensor::arange(c, opts).view([1, c, 1, 1]);
    padded.index(&[
        Some(bi),
        Some(ci),
        Some(rows.view([b, 1, h, 1])),
        Some(cols.view([b, 1, 1, w])),
    ])
}

/// The random draws for one batch, from libtorch's (seeded) generator on the
/// batch's device.
pub fn random_crop_flip(x: &Tensor, pad: i64) -> Tensor {
    let b = x.size()[0];
    let dev = x.device();
    let oy = Tensor::randint(2 * pad + 1, [b], (Kind::Int64, dev));
    let ox = Tensor::randint(2 * pad + 1, [b], (Kind::Int64, dev));
    let flip = Tensor::rand([b], (Kind::Float, dev)).lt(0.5);
    crop_flip(x, &oy, &ox, &flip, pad)
}

/// `ToTensor()` + `Normalize(mean, std)` as one multiply-add per element.
pub struct Normalizer {
    scale: Tensor,
    shift: Tensor,
}

impl Normalizer {
    pub fn new(mean: [f64; 3], std: [f64; 3], device: Device) -> Self {
        let scale: Vec<f32> = std.iter().map(|s| (1.0 / (255.0 * s)) as f32).collect();
        let shift: Vec<f32> = mean
            .iter()
            .zip(&std)
            .map(|(m, s)| (-m / s) as f32)
            .collect();
        Normalizer {
            scale: Tensor::from_slice(&scale)
                .view([1, 3, 1, 1])
                .to_device(device),
            shift: Tensor::from_slice(&shift)
                .view([1, 3, 1, 1])
                .to_device(device),
        }
    }

    /// uint8 `B x 3 x H x W` -> normalized float32.
    pub fn apply(&self, x: &Tensor) -> Tensor {
        x.to_kind(Kind::Float) * &self.scale + &self.shift
    }
}
