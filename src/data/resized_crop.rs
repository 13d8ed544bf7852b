//! torchvision's `RandomResizedCrop.get_params`: the random numbers each
//! image needs (`CropDraws`, or `ImageDraws` for one image), and the boxes
//! they make in images of given sizes, for a batch on its device
//! (`crop_boxes`) or for one image on the host (`crop_box`, what a
//! streaming worker uses), with the same arithmetic.

use tch::{Device, Kind, Tensor};

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
/// `device` in this order: per image 10 area fractions (uniform in
/// 0.08..1), 10 aspect ratios (log-uniform in 3/4..4/3), then one uniform
/// for the top offset and one for the left. The boxes follow from them and
/// each image's size ([`crop_boxes`], or [`crop_box`] for one image).
pub struct CropDraws {
    pub area: Tensor,
    pub ratio: Tensor,
    pub top: Tensor,
    pub left: Tensor,
}

impl CropDraws {
    pub fn draw(b: i64, device: Device) -> Self {
        let opts = (Kind::Float, device);
        let n = CROP_ATTEMPTS as i64;
        let area = Tensor::rand([b, n], opts) * 0.92 + 0.08;
        let (lo, hi) = ((3.0f64 / 4.0).ln(), (4.0f64 / 3.0).ln());
        let ratio = (Tensor::rand([b, n], opts) * (hi - lo) + lo).exp();
        CropDraws {
            area,
            ratio,
            top: Tensor::rand([b], opts),
            left: Tensor::rand([b], opts),
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
}

/// The draws of a training batch of `b` images on the CPU generator, as
/// `augment::random_canvas_crop_flip` makes them on a CPU batch: the crop draws,
/// then one uniform per image for the flip (below 0.5 mirrors).
pub fn draw_resized_crops(b: i64) -> Vec<ImageDraws> {
    let d = CropDraws::draw(b, Device::Cpu);
    let flip = Tensor::rand([b], (Kind::Float, Device::Cpu)).lt(0.5);
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
        })
        .collect()
}

/// torchvision's `RandomResizedCrop.get_params(img, scale=(0.08, 1),
/// ratio=(3/4, 4/3))` for images of `height[i]` x `width[i]` pixels (float
/// tensors `[B]`), drawn on their device for the whole batch at once.
pub fn random_resized_boxes(height: &Tensor, width: &Tensor) -> CropBoxes {
    crop_boxes(
        &CropDraws::draw(height.size()[0], height.device()),
        height,
        width,
    )
}

/// The boxes of [`CropDraws`] in images of `height[i]` x `width[i]`: per
/// image, the first of the 10 candidates (area fraction times the image's
/// area, aspect ratio; sides rounded half to even like Python's `round`)
/// that fits, at its drawn integer offset; if none fits, the centre crop
/// with the ratio clamped. Only exactly rounded operations, so
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
    // whole image with its aspect ratio clamped to 3/4-4/3 (in f64, as
    // Python computes it).
    let (hd, wd) = (
        hf.view([b]).to_kind(Kind::Double),
        wf.view([b]).to_kind(Kind::Double),
    );
    let in_ratio = &wd / &hd;
    let fw = (&hd * (4.0 / 3.0))
        .round()
        .where_self(&in_ratio.gt(4.0 / 3.0), &wd);
    let fh = (&wd / (3.0 / 4.0))
        .round()
        .where_self(&in_ratio.lt(3.0 / 4.0), &hd);
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
            let in_ratio = wd / hd;
            let w = match in_ratio > 4.0 / 3.0 {
                true => (hd * (4.0 / 3.0)).round_ties_even(),
                false => wd,
            } as f32;
            let h = match in_ratio < 3.0 / 4.0 {
                true => (wd / (3.0 / 4.0)).round_ties_even(),
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
    /// no candidate fits and the fallback decides), and beyond 4:3.
    #[test]
    fn one_image_boxes_are_the_batch_boxes() {
        let _seeded = crate::seeded();
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
        let draws = draw_resized_crops(b);
        tch::manual_seed(7);
        let d = CropDraws::draw(b, Device::Cpu);
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
                // No candidate fits: the centred 4:3 crop, 37 x round(49.33).
                assert_eq!(one, [0, 475, 37, 49]);
            }
        }
    }
}
