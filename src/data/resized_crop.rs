//! torchvision's `RandomResizedCrop.get_params`: the random numbers each
//! image needs (`CropDraws`, or `ImageDraws` for one image), and the boxes
//! they make in images of given sizes, for a batch on its device
//! (`crop_boxes`) or for one image on the host (`crop_box`, what a
//! streaming worker uses), with the same arithmetic; its `scale` and
//! `ratio` ranges (`CropRange`).

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// RandomResizedCrop's ranges: of the candidate boxes' area, as a fraction
/// of the image's (`scale`), and of their aspect ratio, width over height,
/// drawn log-uniformly (`ratio`); torchvision's defaults (0.08, 1) and
/// (3/4, 4/3), timm's `--scale` and `--ratio`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct CropRange {
    pub scale: (f64, f64),
    pub ratio: (f64, f64),
}

impl Default for CropRange {
    fn default() -> Self {
        CropRange {
            scale: (0.08, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
        }
    }
}

impl CropRange {
    pub fn is_default(&self) -> bool {
        *self == CropRange::default()
    }

    /// Why these ranges make no boxes (`flag` names each as the command
    /// line or config.json does): a scale in (0, 1], a positive finite
    /// ratio, each low to high.
    pub fn problem(&self, flag: impl Fn(&str) -> String) -> Option<String> {
        let (s, r) = (self.scale, self.ratio);
        if !(s.0 > 0.0 && s.0 <= s.1 && s.1 <= 1.0) {
            return Some(format!(
                "{} {},{} must be LOW,HIGH area fractions with 0 < LOW <= HIGH <= 1",
                flag("scale"),
                crate::num::Num(s.0),
                crate::num::Num(s.1)
            ));
        }
        (!(r.0 > 0.0 && r.0 <= r.1 && r.1.is_finite())).then(|| {
            format!(
                "{} {},{} must be LOW,HIGH aspect ratios (width / height) with 0 < LOW <= HIGH",
                flag("ratio"),
                crate::num::Num(r.0),
                crate::num::Num(r.1)
            )
        })
    }
}

/// Crop boxes in pixels, one per image of a batch (float tensors of shape
/// `[B]` holding whole numbers).
pub struct CropBoxes {
    pub top: Tensor,
    pub left: Tensor,
    pub height: Tensor,
    pub width: Tensor,
}

/// Draws of `RandomResizedCrop.get_params` per image.
const CROP_ATTEMPTS: usize = 10;

/// The random numbers `RandomResizedCrop` needs for a batch, drawn on
/// `device` in this order: per image 10 area fractions (uniform in the
/// range's scale, 0.08..1 by default), 10 aspect ratios (log-uniform in its
/// ratio, 3/4..4/3), then one uniform for the top offset and one for the
/// left. The boxes follow from them and each image's size ([`crop_boxes`],
/// or [`crop_box`] for one image); the ratio's bounds decide the fallback.
pub struct CropDraws {
    pub area: Tensor,
    pub ratio: Tensor,
    pub top: Tensor,
    pub left: Tensor,
    pub ratio_bounds: (f64, f64),
}

impl CropDraws {
    pub fn draw(b: i64, device: Device, range: CropRange) -> Self {
        let opts = (Kind::Float, device);
        let n = CROP_ATTEMPTS as i64;
        let (s0, s1) = range.scale;
        let area = Tensor::rand([b, n], opts) * (s1 - s0) + s0;
        let (lo, hi) = (range.ratio.0.ln(), range.ratio.1.ln());
        let ratio = (Tensor::rand([b, n], opts) * (hi - lo) + lo).exp();
        CropDraws {
            area,
            ratio,
            top: Tensor::rand([b], opts),
            left: Tensor::rand([b], opts),
            ratio_bounds: range.ratio,
        }
    }
}

/// One image's `RandomResizedCrop` draws and its flip, as numbers (what a
/// streaming worker gets with the image's path).
#[derive(Clone, Debug, PartialEq)]
pub struct ImageDraws {
    pub area: [f32; CROP_ATTEMPTS],
    pub ratio: [f32; CROP_ATTEMPTS],
    pub top: f32,
    pub left: f32,
    pub flip: bool,
    /// The range's aspect ratios, which decide the fallback.
    pub ratio_bounds: (f64, f64),
}

/// The draws of a training batch of `b` images on the CPU generator, as
/// `augment::random_canvas_crop_flip` makes them on a CPU batch: the crop draws,
/// then one uniform per image for the flip (below `hflip` mirrors).
pub fn draw_resized_crops(b: i64, range: CropRange, hflip: f64) -> Vec<ImageDraws> {
    let d = CropDraws::draw(b, Device::Cpu, range);
    let flip = Tensor::rand([b], (Kind::Float, Device::Cpu)).lt(hflip);
    let floats = |t: &Tensor| Vec::<f32>::try_from(t.reshape([-1])).expect("float draws");
    let (area, ratio, top, left) = (
        floats(&d.area),
        floats(&d.ratio),
        floats(&d.top),
        floats(&d.left),
    );
    let flip = Vec::<bool>::try_from(&flip).expect("flip draws");
    let row = |v: &[f32], i: usize| -> [f32; CROP_ATTEMPTS] {
        v[i * CROP_ATTEMPTS..(i + 1) * CROP_ATTEMPTS]
            .try_into()
            .expect("10 draws per image")
    };
    (0..b as usize)
        .map(|i| ImageDraws {
            area: row(&area, i),
            ratio: row(&ratio, i),
            top: top[i],
            left: left[i],
            flip: flip[i],
            ratio_bounds: range.ratio,
        })
        .collect()
}

/// torchvision's `RandomResizedCrop.get_params(img, scale, ratio)` (the
/// range's) for images of `height[i]` x `width[i]` pixels (float tensors
/// `[B]`), drawn on their device for the whole batch at once.
pub fn random_resized_boxes(height: &Tensor, width: &Tensor, range: CropRange) -> CropBoxes {
    let d = CropDraws::draw(height.size()[0], height.device(), range);
    crop_boxes(&d, height, width)
}

/// The boxes of [`CropDraws`] in images of `height[i]` x `width[i]`: per
/// image, the first of the 10 candidates (area fraction times the image's
/// area, aspect ratio; sides rounded half to even like Python's `round`)
/// that fits, at its drawn integer offset; if none fits, the centre crop
/// with the ratio clamped to the range's. Only exactly rounded operations, so
/// [`crop_box`] finds the same boxes one image at a time.
pub fn crop_boxes(d: &CropDraws, height: &Tensor, width: &Tensor) -> CropBoxes {
    let b = height.size()[0];
    let (hf, wf) = (
        height.to_kind(Kind::Float).view([b, 1]),
        width.to_kind(Kind::Float).view([b, 1]),
    );
    let area = &d.area * (&hf * &wf);
    let w = (&area * &d.ratio).sqrt().round();
    let h = (&area / &d.ratio).sqrt().round();
    let fits = w
        .gt(0.0)
        .logical_and(&w.le_tensor(&wf))
        .logical_and(&h.gt(0.0))
        .logical_and(&h.le_tensor(&hf));
    // The first candidate that fits (argmax returns the first maximum).
    let first = fits.to_kind(Kind::Int).argmax(1, true);
    let any = fits.any_dim(1, false);
    // No candidate fits: torchvision's fallback, the centre crop of the
    // whole image with its aspect ratio clamped to the range's (3/4-4/3 by
    // default; in f64, as Python computes it).
    let (hd, wd) = (
        hf.view([b]).to_kind(Kind::Double),
        wf.view([b]).to_kind(Kind::Double),
    );
    let (lo, hi) = d.ratio_bounds;
    let in_ratio = &wd / &hd;
    let fw = (&hd * hi).round().where_self(&in_ratio.gt(hi), &wd);
    let fh = (&wd / lo).round().where_self(&in_ratio.lt(lo), &hd);
    let pick = |t: &Tensor, fallback: Tensor| {
        t.gather(1, &first, false)
            .squeeze_dim(1)
            .where_self(&any, &fallback.to_kind(Kind::Float))
    };
    let (w, h) = (pick(&w, fw), pick(&h, fh));
    // A drawn box sits at a uniform integer offset, the fallback in the middle.
    let offset = |u: &Tensor, side: &Tensor, len: &Tensor| {
        let room = side.view([b]) - len;
        let drawn = (u * (&room + 1.0)).floor().minimum(&room);
        drawn.where_self(&any, &(room / 2.0).floor())
    };
    CropBoxes {
        top: offset(&d.top, &hf, &h),
        left: offset(&d.left, &wf, &w),
        height: h,
        width: w,
    }
}

/// [`crop_boxes`] for one image of `height` x `width` pixels: `[top, left,
/// height, width]`.
pub fn crop_box(d: &ImageDraws, height: i64, width: i64) -> [i64; 4] {
    let (hf, wf) = (height as f32, width as f32);
    let whole = hf * wf;
    let fitting = (0..CROP_ATTEMPTS).find_map(|k| {
        let area = d.area[k] * whole;
        let w = (area * d.ratio[k]).sqrt().round_ties_even();
        let h = (area / d.ratio[k]).sqrt().round_ties_even();
        (w > 0.0 && w <= wf && h > 0.0 && h <= hf).then_some((h, w))
    });
    let offset = |u: f32, room: f32| (u * (room + 1.0)).floor().min(room);
    let (top, left, h, w) = match fitting {
        Some((h, w)) => (offset(d.top, hf - h), offset(d.left, wf - w), h, w),
        None => {
            let (hd, wd) = (height as f64, width as f64);
            let (lo, hi) = d.ratio_bounds;
            let in_ratio = wd / hd;
            let w = match in_ratio > hi {
                true => (hd * hi).round_ties_even(),
                false => wd,
            } as f32;
            let h = match in_ratio < lo {
                true => (wd / lo).round_ties_even(),
                false => hd,
            } as f32;
            (((hf - h) / 2.0).floor(), ((wf - w) / 2.0).floor(), h, w)
        }
    };
    [top as i64, left as i64, h as i64, w as i64]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One image at a time (a streaming worker), the boxes are the batch's
    /// exactly, for every kind of image: square, wide, tall, tiny (where
    /// no candidate fits and the fallback decides), and beyond 4:3; with
    /// torchvision's ranges and with others (where the fallback clamps to
    /// the other ratios).
    #[test]
    fn one_image_boxes_are_the_batch_boxes() {
        let _seeded = crate::seeded();
        let other = CropRange {
            scale: (0.5, 0.9),
            ratio: (0.5, 2.0),
        };
        for range in [CropRange::default(), other] {
            boxes_of_one_and_of_the_batch(range);
        }
    }

    fn boxes_of_one_and_of_the_batch(range: CropRange) {
        let sizes: [(i64, i64); 8] = [
            (256, 256),
            (256, 384),
            (384, 256),
            (375, 500),
            (1, 1),
            (2, 9),
            (300, 40),
            (37, 1000),
        ];
        tch::manual_seed(7);
        let b = 4000;
        let draws = draw_resized_crops(b, range, 0.5);
        tch::manual_seed(7);
        let d = CropDraws::draw(b, Device::Cpu, range);
        let dims = |k: usize| -> Tensor {
            let v: Vec<f32> = (0..b as usize)
                .map(|i| [sizes[i % 8].0, sizes[i % 8].1][k] as f32)
                .collect();
            Tensor::from_slice(&v)
        };
        let boxes = crop_boxes(&d, &dims(0), &dims(1));
        let col = |t: &Tensor| Vec::<f32>::try_from(t).unwrap();
        let (top, left, h, w) = (
            col(&boxes.top),
            col(&boxes.left),
            col(&boxes.height),
            col(&boxes.width),
        );
        for (i, d) in draws.iter().enumerate() {
            let (sh, sw) = sizes[i % 8];
            let one = crop_box(d, sh, sw);
            let batch = [top[i], left[i], h[i], w[i]].map(|v| v as i64);
            assert_eq!(one, batch, "image {i} of {sh}x{sw}");
            assert!(one[0] + one[2] <= sh && one[1] + one[3] <= sw && one[2] > 0 && one[3] > 0);
            if (sh, sw) == (37, 1000) {
                // No candidate fits: the centred crop at the highest ratio,
                // 37 x round(49.33) (4:3) or 37 x 74 (2:1).
                let w = match range.is_default() {
                    true => 49,
                    false => 74,
                };
                assert_eq!(one, [0, (1000 - w) / 2, 37, w]);
            }
        }
    }
}
