//! Batched, device-side preprocessing: random crop with zero padding,
//! horizontal flip, conversion to float and normalization. One gather per
//! batch; no per-image host work and no host<->device copies of images.

use tch::{Device, Kind, Tensor};

use super::Split;
use super::auto_augment::AutoAugment;
use super::image::centre_offset;
use super::resize::Filter;
use super::resized_crop::{CropBoxes, CropRange, random_resized_boxes};

/// torchvision's `RandomHorizontalFlip` probability: training's `--hflip`
/// unless the dataset's images change class when mirrored.
pub const HFLIP: f64 = 0.5;

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
/// batch's device; an image is mirrored with probability `hflip` (its
/// uniform draw below it, as `RandomHorizontalFlip(p)`: the draws are the
/// same whatever `hflip` is).
pub fn random_crop_flip(x: &Tensor, pad: i64, hflip: f64) -> Tensor {
    let b = x.size()[0];
    let dev = x.device();
    let oy = Tensor::randint(2 * pad + 1, [b], (Kind::Int64, dev));
    let ox = Tensor::randint(2 * pad + 1, [b], (Kind::Int64, dev));
    let flip = Tensor::rand([b], (Kind::Float, dev)).lt(hflip);
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

    pub fn device(&self) -> Device {
        self.scale.device()
    }

    /// uint8 `B x 3 x H x W` -> normalized float32.
    pub fn apply(&self, x: &Tensor) -> Tensor {
        x.to_kind(Kind::Float) * &self.scale + &self.shift
    }
}

/// Per image, the `[B, size, side]` matrix that resizes the crop
/// `start..start + len` of an axis of `side` pixels to `size` pixels as
/// `interpolate(mode="bilinear" or "bicubic", antialias=True)` does: output
/// pixel `i` centred at `start + (i + 0.5)·len/size` takes a filter of the
/// crop's pixels (a triangle, or Keys' cubic with a = -0.5 as wide again),
/// stretched by the scale when shrinking (not when enlarging, which is
/// plain interpolation), its weights normalized to sum to 1.
fn resize_weights(start: &Tensor, len: &Tensor, side: i64, size: i64, filter: Filter) -> Tensor {
    let b = start.size()[0];
    let dev = start.device();
    let opts = (Kind::Float, dev);
    let (start, len) = (start.view([b, 1, 1]), len.view([b, 1, 1]));
    let scale = &len / size as f64;
    let centre = &start + (Tensor::arange(size, opts).view([1, size, 1]) + 0.5) * &scale;
    let pixel = Tensor::arange(side, opts).view([1, 1, side]);
    let width = scale.clamp_min(1.0);
    let d = (&pixel + 0.5 - centre).abs() / width;
    let w = match filter {
        Filter::Bilinear => (-d + 1.0).clamp_min(0.0),
        Filter::Bicubic => {
            let near = (&d * 1.5 - 2.5) * &d * &d + 1.0;
            let far = ((&d * -0.5 + 2.5) * &d - 4.0) * &d + 2.0;
            near.where_self(&d.lt(1.0), &far.where_self(&d.lt(2.0), &d.zeros_like()))
        }
    };
    let in_crop = pixel
        .ge_tensor(&start)
        .logical_and(&pixel.lt_tensor(&(&start + &len)));
    let w = w * in_crop;
    &w / w.sum_dim_intlist(2, true, Kind::Float)
}

/// `rows` (`[B, size, H]`) @ `x` (`B x C x H x W`) @ `cols`ᵀ (`[B, size, W]`).
fn resize_matmul(x: &Tensor, rows: &Tensor, cols: &Tensor) -> Tensor {
    rows.unsqueeze(1)
        .matmul(&x.to_kind(Kind::Float))
        .matmul(&cols.transpose(1, 2).unsqueeze(1))
}

/// The weight matrices `w` (`[B, size, side]`) reversed along the output
/// axis where `flip` is true: the resized crop comes out mirrored.
fn flip_where(w: Tensor, flip: &Tensor) -> Tensor {
    let b = w.size()[0];
    w.flip([1]).where_self(&flip.view([b, 1, 1]), &w)
}

/// Crops each image of `x` (`B x C x H x W`, any dtype) to its box, resizes
/// the crop to `size` x `size` with antialiased interpolation by `filter`
/// and mirrors it where `flip` is true: `F.resized_crop(img, ...,
/// antialias=True)` (+ `F.hflip`) on float tensors, as two batched matrix
/// products. The same code as for canvases, each image filling its own.
pub fn resized_crop_flip(
    x: &Tensor,
    boxes: &CropBoxes,
    flip: &Tensor,
    (size, filter): (i64, Filter),
) -> Tensor {
    canvas_crop_flip(x, &whole_images(x), boxes, flip, (size, filter))
}

/// The canvas layout of a batch whose images fill it: from column 0, all
/// of its width visible, none transposed.
fn whole_images(x: &Tensor) -> Tensor {
    let (b, _, _, w) = x.size4().expect("a 4-d batch");
    Tensor::from_slice(&[0, w, 0, w])
        .to_device(x.device())
        .view([1, LAYOUT])
        .repeat([b, 1])
}

/// The columns of a canvas' layout row (see [`canvas_width`]).
pub const LAYOUT: i64 = 4;

/// Image-folder datasets keep each image whole, at a fixed batch shape, in
/// a canvas of `side x canvas_width(side)` (3:2): resized so its shorter
/// side is `side` (torchvision's `Resize`), portrait images transposed so
/// that side runs down, and placed so that the eval transform's centre
/// square fills the canvas' middle `side` columns. A longer side beyond 3:2
/// is cut to the canvas around that square. Per image, `layout` (int64
/// `[N, 4]`) holds the first canvas column of the image, its visible width,
/// whether it is transposed (1) or not (0), and the resized image's longer
/// side (its visible width unless it was cut). Random resized crops draw
/// their boxes in the whole (visible) image, as torchvision does; the
/// evaluation's centre crop is placed by the longer side.
pub fn canvas_width(side: i64) -> i64 {
    side * 3 / 2
}

/// The part of an image resized to `(height, width)` (its shorter side the
/// canvas side) that its canvas keeps, along its longer side: all of it,
/// or where it is longer than the canvas the canvas' window of it (start,
/// length).
pub fn canvas_keeps((h, w): (i64, i64)) -> (i64, i64) {
    let (side, long) = (h.min(w), h.max(w));
    let width = canvas_width(side);
    match long <= width {
        true => (0, long),
        // Around the eval transform's square.
        false => (
            centre_offset(long, side) - centre_offset(width, side),
            width,
        ),
    }
}

/// Lays a resized uint8 image into its canvas; returns the canvas and its
/// layout row. `kept` is the image resized to `(height, width)` (its
/// shorter side the canvas side), or of it only what [`canvas_keeps`].
pub fn pack_canvas(kept: &Tensor, (h, w): (i64, i64)) -> (Tensor, [i64; 4]) {
    let c = kept.size()[0];
    let transposed = h > w;
    let img = if transposed {
        kept.transpose(1, 2)
    } else {
        kept.shallow_clone()
    };
    let (side, long) = (h.min(w), h.max(w));
    let width = canvas_width(side);
    let (start, len) = canvas_keeps((h, w));
    let img = match img.size()[2] == len {
        true => img,
        false => img.narrow(2, start, len),
    };
    let mut canvas = Tensor::zeros([c, side, width], (kept.kind(), kept.device()));
    let (first, visible) = if long <= width {
        // Fits (first >= 0 and first + long <= width for every side and
        // long): the eval transform's square in the canvas' middle.
        let first = centre_offset(width, side) - centre_offset(long, side);
        canvas.narrow(2, first, long).copy_(&img);
        (first, long)
    } else {
        canvas.copy_(&img);
        (0, width)
    };
    (canvas, [first, visible, transposed as i64, long])
}

/// The eval transform's centre square (`side x side`, uint8) of each canvas
/// of a batch, in the image's own orientation.
fn canvas_centre(x: &Tensor, layout: &Tensor) -> Tensor {
    let (b, _, side, width) = x.size4().expect("canvas_centre expects a 4-d batch");
    let square = x.narrow(3, centre_offset(width, side), side);
    let transposed = layout.select(1, 2).gt(0).view([b, 1, 1, 1]);
    square.transpose(2, 3).where_self(&transposed, &square)
}

/// torchvision's `CenterCrop(crop)` of each resized image of a batch of
/// canvases (`crop` at most their side), in the image's own orientation.
/// Along the longer side the crop starts at `round((long - crop) / 2)`,
/// rounded half to even, which a centre crop of the centre square would
/// round twice (a column off where `side - crop` is odd): so each image's
/// start is found from its longer side, and its columns gathered.
pub fn canvas_centre_crop(x: &Tensor, layout: &Tensor, crop: i64) -> Tensor {
    let (b, c, side, width) = x.size4().expect("canvas_centre_crop expects a 4-d batch");
    let long = layout.select(1, 3);
    // torch's round is half to even, as `centre_offset` is.
    let half = |n: Tensor| (n.to_kind(Kind::Double) / 2.0).round().to_kind(Kind::Int64);
    // The canvas column of the image's column 0 (negative where it was cut).
    let origin = half(&long - side).neg() + centre_offset(width, side);
    let start = origin + half(&long - crop);
    let columns = start.view([b, 1, 1, 1]) + Tensor::arange(crop, (Kind::Int64, x.device()));
    let rows = x.narrow(2, centre_offset(side, crop), crop);
    let square = rows.gather(3, &columns.expand([b, c, crop, crop], false), false);
    let transposed = layout.select(1, 2).gt(0).view([b, 1, 1, 1]);
    square.transpose(2, 3).where_self(&transposed, &square)
}

/// The images of a batch as squares: canvases' centre squares (CIFAR-style
/// training on an image folder), other batches as they are.
fn squares(x: &Tensor, layout: Option<&Tensor>) -> Tensor {
    match layout {
        Some(l) => canvas_centre(x, l),
        None => x.shallow_clone(),
    }
}

/// `resized_crop_flip` for canvases: `boxes` are in each image's own pixels
/// and orientation (top-left of the visible image at 0, 0).
pub fn canvas_crop_flip(
    x: &Tensor,
    layout: &Tensor,
    boxes: &CropBoxes,
    flip: &Tensor,
    (size, filter): (i64, Filter),
) -> Tensor {
    let (b, _, side, width) = x.size4().expect("canvas_crop_flip expects a 4-d batch");
    let first = layout.select(1, 0).to_kind(Kind::Float);
    let t = layout.select(1, 2).gt(0);
    // A transposed image's rows run across the canvas, its columns down.
    let row_start = boxes.left.where_self(&t, &boxes.top);
    let row_len = boxes.width.where_self(&t, &boxes.height);
    let col_start = boxes.top.where_self(&t, &boxes.left) + first;
    let col_len = boxes.height.where_self(&t, &boxes.width);
    let rows = resize_weights(&row_start, &row_len, side, size, filter);
    let cols = resize_weights(&col_start, &col_len, width, size, filter);
    let rows = flip_where(rows, &flip.logical_and(&t));
    let cols = flip_where(cols, &flip.logical_and(&t.logical_not()));
    let out = resize_matmul(x, &rows, &cols);
    out.transpose(2, 3).where_self(&t.view([b, 1, 1, 1]), &out)
}

/// `RandomResizedCrop(size, scale, ratio, interpolation)` (`range`: scale
/// and ratio) + `RandomHorizontalFlip(hflip)` of canvases: boxes drawn in each
/// whole (visible) image. Bicubic crops of
/// uint8 images are clamped to 0-255, as torchvision's are (its cubic
/// overshoots at edges).
pub fn random_canvas_crop_flip(
    x: &Tensor,
    layout: &Tensor,
    (size, filter): (i64, Filter),
    range: CropRange,
    hflip: f64,
) -> Tensor {
    let (b, _, side, _) = x
        .size4()
        .expect("random_canvas_crop_flip expects a 4-d batch");
    let opts = (Kind::Float, x.device());
    let visible = layout.select(1, 1).to_kind(Kind::Float);
    let t = layout.select(1, 2).gt(0);
    let side = Tensor::full([b], side as f64, opts);
    let boxes = random_resized_boxes(
        &visible.where_self(&t, &side),
        &side.where_self(&t, &visible),
        range,
    );
    let flip = Tensor::rand([b], opts).lt(hflip);
    let out = canvas_crop_flip(x, layout, &boxes, &flip, (size, filter));
    match (filter, x.kind()) {
        (Filter::Bicubic, Kind::Uint8) => out.clamp(0.0, 255.0),
        _ => out,
    }
}

/// The central `size` x `size` window (torchvision's `CenterCrop`).
pub fn center_crop(x: &Tensor, size: i64) -> Tensor {
    let (_, _, h, w) = x.size4().expect("center_crop expects a 4-d batch");
    x.narrow(2, centre_offset(h, size), size)
        .narrow(3, centre_offset(w, size), size)
}

/// What a worker makes of one image (uint8, `3 x S x S`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transform {
    /// `Resize(side)` + `CenterCrop(side)`: the square an in-memory canvas
    /// keeps in its middle (CIFAR-style training on a folder).
    Square,
    /// `Resize(side)` + `CenterCrop(size)`: `predict`'s eval transform.
    Eval { size: i64 },
    /// `RandomResizedCrop(size)` + `RandomHorizontalFlip` with the job's draws.
    Random { size: i64 },
    /// `Resize((size, size))`: the whole image squeezed, as a CIFAR-10 or
    /// digits model's own images are (evaluating one on an image folder);
    /// `gray`: made gray first, as PIL's `convert("L")` (an MNIST or
    /// digits model's).
    Squeeze { size: i64, gray: bool },
}

/// How a dataset's uint8 batches become the model's input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Augment {
    /// CIFAR: random crop with zero padding + flip; evaluation as is. Then
    /// bilinear resizing when the model's input differs from the images.
    CropFlip { padding: i64 },
    /// ImageNet: RandomResizedCrop + flip; evaluation takes the centre crop
    /// of the (already resized) images: of a canvas' centre square, or of
    /// the whole image.
    ResizedCrop,
}

/// How a dataset's uint8 batches become the model's fp32 NCHW input:
/// augmentation (training), the eval crop, resizing and normalization. It
/// only prepares inputs; running the model (layout, precision) is
/// `numerics`' and `infer`'s.
pub struct Preprocess {
    pub augment: Augment,
    /// The model's input side: evaluation's centre crop (and CIFAR-style
    /// training's).
    pub input: i64,
    /// RandomResizedCrop's side for training images (`ResizedCrop`);
    /// `input` unless `--train-crop-size` says otherwise.
    pub train_side: i64,
    pub norm: Normalizer,
    /// Training batches get the evaluation transform (`--no-augment`).
    pub plain_training: bool,
    /// Training batches get AutoAugment, RandAugment, TrivialAugment or
    /// AugMix after the crop and flip (or, with `plain_training`, after the
    /// evaluation crop), before normalization.
    pub auto_augment: Option<AutoAugment>,
    /// Streamed evaluation reads each image whole, squeezed to this side
    /// (a CIFAR-10 or digits model on an image folder), instead of its
    /// centre square.
    pub eval_squeeze: Option<i64>,
    /// Those images are made gray first (a model of gray images).
    pub eval_gray: bool,
    /// RandomResizedCrop's interpolation on the device (in-memory
    /// folders; streamed crops are the loader's, with the split's filter).
    pub filter: Filter,
    /// RandomResizedCrop's scale and ratio (`--scale`, `--ratio`).
    pub crop: CropRange,
    /// The probability that a training image is mirrored (`--hflip`).
    pub hflip: f64,
}

impl Preprocess {
    pub fn new(augment: Augment, input: i64, norm: Normalizer) -> Self {
        Preprocess {
            augment,
            input,
            train_side: input,
            norm,
            plain_training: false,
            auto_augment: None,
            eval_squeeze: None,
            eval_gray: false,
            filter: Filter::Bilinear,
            crop: CropRange::default(),
            hflip: HFLIP,
        }
    }

    /// `--auto-augment` on a training batch (rounded to uint8 first where
    /// resizing made it float, as PIL's crops are whole pixels).
    fn auto(&self, x: Tensor) -> Tensor {
        let Some(augment) = &self.auto_augment else {
            return x;
        };
        let x = match x.kind() {
            Kind::Uint8 => x,
            _ => x.round().clamp(0.0, 255.0).to_kind(Kind::Uint8),
        };
        augment.apply(&x)
    }

    fn resize(&self, x: Tensor) -> Tensor {
        if x.size()[3] == self.input && x.size()[2] == self.input {
            x
        } else {
            x.upsample_bilinear2d([self.input, self.input], false, None, None)
        }
    }

    /// `layout`: where the images lie in their canvases (image folders), or
    /// None for images that fill the batch (CIFAR, predict's crops).
    pub fn train(&self, x: &Tensor, layout: Option<&Tensor>) -> Tensor {
        if self.plain_training {
            return self.evaluation(x, layout, true);
        }
        match (self.augment, layout) {
            (Augment::CropFlip { padding }, _) => {
                let x = squares(x, layout);
                let x = self.auto(random_crop_flip(&x, padding, self.hflip));
                self.resize(self.norm.apply(&x))
            }
            (Augment::ResizedCrop, layout) => {
                let whole;
                let layout = match layout {
                    Some(l) => l,
                    None => {
                        whole = whole_images(x);
                        &whole
                    }
                };
                let x = self.auto(random_canvas_crop_flip(
                    x,
                    layout,
                    (self.train_side, self.filter),
                    self.crop,
                    self.hflip,
                ));
                self.norm.apply(&x)
            }
        }
    }

    pub fn eval(&self, x: &Tensor, layout: Option<&Tensor>) -> Tensor {
        self.evaluation(x, layout, false)
    }

    /// The evaluation transform; with `training`, `--auto-augment` before
    /// normalization (`--no-augment` leaves out only the crops and flips).
    fn evaluation(&self, x: &Tensor, layout: Option<&Tensor>, training: bool) -> Tensor {
        let auto = |x: Tensor| match training {
            true => self.auto(x),
            false => x,
        };
        match (self.augment, layout) {
            (Augment::CropFlip { .. }, _) => {
                self.resize(self.norm.apply(&auto(squares(x, layout))))
            }
            (Augment::ResizedCrop, Some(l)) => {
                self.norm.apply(&auto(canvas_centre_crop(x, l, self.input)))
            }
            (Augment::ResizedCrop, None) => self.norm.apply(&auto(center_crop(x, self.input))),
        }
    }

    /// Where the model's inputs are made.
    pub fn device(&self) -> Device {
        self.norm.device()
    }

    /// What a streaming worker makes of each image for this preprocessing:
    /// the random crop itself (training with `ResizedCrop`), else what an
    /// in-memory batch would hold before [`Preprocess::batch`].
    pub fn stream_transform(&self, train: bool) -> Transform {
        match self.augment {
            Augment::CropFlip { .. } if !train && let Some(size) = self.eval_squeeze => {
                Transform::Squeeze {
                    size,
                    gray: self.eval_gray,
                }
            }
            Augment::CropFlip { .. } => Transform::Square,
            Augment::ResizedCrop if train && !self.plain_training => Transform::Random {
                size: self.train_side,
            },
            Augment::ResizedCrop => Transform::Eval { size: self.input },
        }
    }

    /// The model's input for a streamed batch made by `transform`.
    pub fn streamed(&self, x: &Tensor, train: bool, transform: Transform) -> Tensor {
        match (transform, train) {
            // Cropped and flipped by the worker.
            (Transform::Random { .. }, _) => self.norm.apply(&self.auto(x.shallow_clone())),
            (_, true) => self.train(x, None),
            (_, false) => self.eval(x, None),
        }
    }

    /// The model's input for a batch of a split: training augmentation
    /// when `train`, else the evaluation transform.
    pub fn batch(&self, batch: &Split, train: bool) -> Tensor {
        let layout = batch.layout.as_ref();
        if train {
            self.train(&batch.images, layout)
        } else {
            self.eval(&batch.images, layout)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--train-crop-size`: RandomResizedCrop training batches (in memory
    /// and streamed) come out at the training side, evaluation batches at
    /// the input side; CIFAR-style training stays at the input side.
    #[test]
    fn training_crops_take_their_own_side() {
        let norm = || Normalizer::new([0.5; 3], [0.25; 3], Device::Cpu);
        let x = Tensor::randint(256, [2, 3, 80, 100], (Kind::Uint8, Device::Cpu));
        let mut pre = Preprocess::new(Augment::ResizedCrop, 64, norm());
        pre.train_side = 48;
        assert_eq!(pre.train(&x, None).size(), [2, 3, 48, 48]);
        assert_eq!(pre.eval(&x, None).size(), [2, 3, 64, 64]);
        assert_eq!(pre.stream_transform(true), Transform::Random { size: 48 });
        assert_eq!(pre.stream_transform(false), Transform::Eval { size: 64 });
        // --no-augment trains on the evaluation transform.
        pre.plain_training = true;
        assert_eq!(pre.train(&x, None).size(), [2, 3, 64, 64]);
        assert_eq!(pre.stream_transform(true), Transform::Eval { size: 64 });

        let square = Tensor::randint(256, [2, 3, 36, 36], (Kind::Uint8, Device::Cpu));
        let pre = Preprocess::new(Augment::CropFlip { padding: 4 }, 40, norm());
        assert_eq!(pre.train(&square, None).size(), [2, 3, 40, 40]);
    }
}
