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

/// Crop boxes in pixels, one per image of a batch (float tensors of shape
/// `[B]` holding whole numbers).
pub struct CropBoxes {
    pub top: Tensor,
    pub left: Tensor,
    pub height: Tensor,
    pub width: Tensor,
}

/// Draws of `RandomResizedCrop.get_params` per image.
const CROP_ATTEMPTS: i64 = 10;

/// torchvision's `RandomResizedCrop.get_params(img, scale=(0.08, 1),
/// ratio=(3/4, 4/3))` for `b` images of `height` x `width` pixels, drawn on
/// `dev` for the whole batch at once: per image, up to 10 candidate boxes
/// (area fraction uniform, aspect ratio log-uniform, sides rounded half to
/// even like Python's `round`); the first that fits is taken at a uniform
/// integer offset; if none fits, the centre crop with the ratio clamped.
pub fn random_resized_boxes(b: i64, height: i64, width: i64, dev: Device) -> CropBoxes {
    let opts = (Kind::Float, dev);
    let (hf, wf) = (height as f64, width as f64);
    let area = (Tensor::rand([b, CROP_ATTEMPTS], opts) * 0.92 + 0.08) * (hf * wf);
    let (lo, hi) = ((3.0f64 / 4.0).ln(), (4.0f64 / 3.0).ln());
    let ratio = (Tensor::rand([b, CROP_ATTEMPTS], opts) * (hi - lo) + lo).exp();
    let w = (&area * &ratio).sqrt().round();
    let h = (&area / &ratio).sqrt().round();
    let fits = w
        .gt(0.0)
        .logical_and(&w.le(wf))
        .logical_and(&h.gt(0.0))
        .logical_and(&h.le(hf));
    // The first candidate that fits (argmax returns the first maximum).
    let first = fits.to_kind(Kind::Int).argmax(1, true);
    let any = fits.any_dim(1, false);
    // No candidate fits: torchvision's fallback, the centre crop of the
    // whole image with its aspect ratio clamped to 3/4-4/3.
    let in_ratio = wf / hf;
    let (fw, fh) = if in_ratio < 3.0 / 4.0 {
        (wf, (wf / (3.0 / 4.0)).round_ties_even())
    } else if in_ratio > 4.0 / 3.0 {
        ((hf * (4.0 / 3.0)).round_ties_even(), hf)
    } else {
        (wf, hf)
    };
    let pick = |t: &Tensor, fallback: f64| {
        t.gather(1, &first, false)
            .squeeze_dim(1)
            .where_self(&any, &Tensor::full([b], fallback, opts))
    };
    let (w, h) = (pick(&w, fw), pick(&h, fh));
    // A drawn box sits at a uniform integer offset, the fallback in the middle.
    let offset = |side: f64, len: &Tensor| {
        let room = -len + side;
        let drawn = (Tensor::rand([b], opts) * (&room + 1.0))
            .floor()
            .minimum(&room);
        drawn.where_self(&any, &(room / 2.0).floor())
    };
    CropBoxes {
        top: offset(hf, &h),
        left: offset(wf, &w),
        height: h,
        width: w,
    }
}

/// Per image, the `[B, size, side]` matrix that resizes the crop
/// `start..start + len` of an axis of `side` pixels to `size` pixels as
/// `interpolate(mode="bilinear", antialias=True)` does: output pixel `i`
/// centred at `start + (i + 0.5)·len/size` takes a triangle filter of the
/// crop's pixels, as wide as the scale when shrinking (1 when enlarging,
/// which is plain bilinear), its weights normalized to sum to 1.
fn resize_weights(start: &Tensor, len: &Tensor, side: i64, size: i64) -> Tensor {
    let b = start.size()[0];
    let dev = start.device();
    let opts = (Kind::Float, dev);
    let (start, len) = (start.view([b, 1, 1]), len.view([b, 1, 1]));
    let scale = &len / size as f64;
    let centre = &start + (Tensor::arange(size, opts).view([1, size, 1]) + 0.5) * &scale;
    let pixel = Tensor::arange(side, opts).view([1, 1, side]);
    let width = scale.clamp_min(1.0);
    let w = (-((&pixel + 0.5 - centre).abs() / width) + 1.0).clamp_min(0.0);
    let in_crop = pixel
        .ge_tensor(&start)
        .logical_and(&pixel.lt_tensor(&(&start + &len)));
    let w = w * in_crop;
    &w / w.sum_dim_intlist(2, true, Kind::Float)
}

/// Crops each image of `x` (`B x C x H x W`, any dtype) to its box, resizes
/// the crop to `size` x `size` with antialiased bilinear interpolation and
/// mirrors it where `flip` is true: `F.resized_crop(img, ..., antialias=True)`
/// (+ `F.hflip`) on float tensors, as two batched matrix products.
pub fn resized_crop_flip(x: &Tensor, boxes: &CropBoxes, flip: &Tensor, size: i64) -> Tensor {
    let (b, _, h, w) = x.size4().expect("resized_crop_flip expects a 4-d batch");
    let rows = resize_weights(&boxes.top, &boxes.height, h, size);
    let cols = resize_weights(&boxes.left, &boxes.width, w, size);
    let cols = cols.flip([1]).where_self(&flip.view([b, 1, 1]), &cols);
    // [B, 1, size, H] @ [B, C, H, W] @ [B, 1, W, size]
    rows.unsqueeze(1)
        .matmul(&x.to_kind(Kind::Float))
        .matmul(&cols.transpose(1, 2).unsqueeze(1))
}

/// torchvision's `RandomResizedCrop(size)` (antialiased) followed by
/// `RandomHorizontalFlip`, batched, with boxes and flips drawn on the device.
pub fn random_resized_crop_flip(x: &Tensor, size: i64) -> Tensor {
    let (b, _, h, w) = x
        .size4()
        .expect("random_resized_crop_flip expects a 4-d batch");
    let dev = x.device();
    let boxes = random_resized_boxes(b, h, w, dev);
    let flip = Tensor::rand([b], (Kind::Float, dev)).lt(0.5);
    resized_crop_flip(x, &boxes, &flip, size)
}

/// The central `size` x `size` window (torchvision's `CenterCrop`).
pub fn center_crop(x: &Tensor, size: i64) -> Tensor {
    let (_, _, h, w) = x.size4().expect("center_crop expects a 4-d batch");
    let top = ((h - size) as f64 / 2.0).round_ties_even() as i64;
    let left = ((w - size) as f64 / 2.0).round_ties_even() as i64;
    x.narrow(2, top, size).narrow(3, left, size)
}

/// How a dataset's uint8 batches become the model's input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Augment {
    /// CIFAR: random crop with zero padding + flip; evaluation as is. Then
    /// bilinear resizing when the model's input differs from the images.
    CropFlip { padding: i64 },
    /// ImageNet: RandomResizedCrop + flip; evaluation takes the centre crop
    /// of the (already resized) cached images.
    ResizedCrop,
}

/// How a uint8 batch becomes logits: preprocessing, then the model in the
/// run's memory layout and precision.
pub struct Preprocess {
    pub augment: Augment,
    pub input: i64,
    pub norm: Normalizer,
    /// Feed the model NHWC-strided batches.
    pub channels_last: bool,
    /// Run the forward pass under CUDA autocast to this dtype.
    pub autocast: Option<crate::shim::AutocastDtype>,
}

impl Preprocess {
    /// fp32, contiguous: what evaluation on the CPU and the tests use.
    pub fn plain(augment: Augment, input: i64, norm: Normalizer) -> Self {
        Preprocess {
            augment,
            input,
            norm,
            channels_last: false,
            autocast: None,
        }
    }

    fn resize(&self, x: Tensor) -> Tensor {
        if x.size()[3] == self.input && x.size()[2] == self.input {
            x
        } else {
            x.upsample_bilinear2d([self.input, self.input], false, None, None)
        }
    }

    pub fn train(&self, x: &Tensor) -> Tensor {
        match self.augment {
            Augment::CropFlip { padding } => {
                self.resize(self.norm.apply(&random_crop_flip(x, padding)))
            }
            Augment::ResizedCrop => self.norm.apply(&random_resized_crop_flip(x, self.input)),
        }
    }

    pub fn eval(&self, x: &Tensor) -> Tensor {
        match self.augment {
            Augment::CropFlip { .. } => self.resize(self.norm.apply(x)),
            Augment::ResizedCrop => self.norm.apply(&center_crop(x, self.input)),
        }
    }

    /// The model's input for a uint8 batch: training augmentation when
    /// `train`, in the run's memory layout.
    pub fn model_input(&self, x: &Tensor, train: bool) -> Tensor {
        let x = if train { self.train(x) } else { self.eval(x) };
        if self.channels_last {
            crate::amp::to_channels_last(&x)
        } else {
            x
        }
    }

    /// Float32 logits of the model in the run's precision.
    pub fn forward(&self, model: &crate::model::Vgg, x: &Tensor, train: bool) -> Tensor {
        let out = if let Some(dtype) = self.autocast {
            // Autocast's dtype is per thread; amp::resolve has checked that
            // setting it works, so a failure here cannot happen.
            let _ = crate::shim::set_autocast_dtype(dtype);
            tch::autocast(true, || model.forward_t(x, train))
        } else {
            model.forward_t(x, train)
        };
        out.to_kind(Kind::Float)
    }

    /// Logits for a uint8 batch.
    pub fn logits(&self, model: &crate::model::Vgg, x: &Tensor, train: bool) -> Tensor {
        self.forward(model, &self.model_input(x, train), train)
    }
}
