//! Datasets as uint8 tensors, loaded once (or, for image folders too
//! large for memory, streamed from their files: `stream`), and the batched
//! augmentation that runs on the training device. Nothing here knows about
//! the model: `augment` turns uint8 batches into the model's fp32 input.

pub mod aircraft;
pub mod archive;
pub mod augment;
pub mod auto_augment;
mod auto_augment_tables;
pub mod caltech101;
pub mod caltech256;
pub mod cars;
pub mod cifar;
pub mod country211;
pub mod digits;
pub mod download;
pub mod dtd;
pub mod emnist;
pub mod eurosat;
pub mod fer2013;
pub mod flowers;
pub mod folder;
mod folder_cache;
pub mod folder_scan;
pub mod food101;
pub mod gtsrb;
pub mod image;
pub mod imagenet;
pub mod imagenette;
pub mod mix;
pub mod mnist;
pub mod pack;
pub mod pets;
pub mod places365;
pub mod prepared;
pub mod resize;
pub mod resized_crop;
pub mod stl10;
pub mod stream;
pub mod sun397;
pub mod svhn;
pub mod uint8_ops;
pub mod usps;

use anyhow::{Result, bail};
use tch::{Device, Tensor};

use augment::Transform;
use stream::{InOrder, Streamed};

/// Whether the dataset named `name` (a run's `dataset`, a [`Dataset`]'s
/// name) is read as an image folder is (`folder`, `imagenet`, and the
/// listed photographs of Imagenette, Oxford-IIIT Pet, Oxford 102 Flowers,
/// Food-101, DTD, FGVC-Aircraft, Stanford Cars, GTSRB, EuroSAT, Caltech-101
/// and -256, SUN397, Country211, Places365): images of any size, resized as
/// they are read, unlike CIFAR's, MNIST's and the digits' fixed sides.
pub fn is_image_folder(name: &str) -> bool {
    imagenette::named(name).is_some()
        || places365::named(name).is_some()
        || aircraft::named(name).is_some()
        || matches!(
            name,
            "folder"
                | "imagenet"
                | pets::NAME
                | flowers::NAME
                | food101::NAME
                | dtd::NAME
                | gtsrb::NAME
                | eurosat::NAME
                | caltech256::NAME
                | cars::NAME
                | sun397::NAME
                | country211::NAME
                | caltech101::NAME
        )
}

/// Whether the dataset `name` has no splits (EuroSAT, Caltech-101 and -256,
/// SUN397): as a
/// folder without `--val-dir`, it validates on the part `--val-split`
/// holds out, and has no test split that `--val-on val` could keep unseen.
pub fn is_unsplit(name: &str) -> bool {
    matches!(
        name,
        eurosat::NAME | caltech101::NAME | caltech256::NAME | sun397::NAME
    )
}

/// Whether vggctl downloads the dataset `name` when its files are missing
/// (what `--data-url` and `--data-md5` apply to): every dataset but image
/// folders, ImageNet, the built-in digits, Stanford Cars and FER2013 (whose
/// files are put in place by hand).
pub fn is_downloaded(name: &str) -> bool {
    !matches!(
        name,
        "folder" | "imagenet" | "digits" | cars::NAME | fer2013::NAME
    )
}

/// What `--data-url` and `--data-md5` apply to (see [`is_downloaded`]), as
/// the warning that they are ignored says it.
pub const DOWNLOADED_ONLY: &str = "applies to the datasets vggctl downloads only (not --dataset folder, imagenet, digits, stanford-cars or fer2013)";

/// Whether the dataset `name` is trained by torchvision's ImageNet recipe
/// (random resized crops at 224, the ImageNet head): ImageNet's
/// photographs (`imagenet`, Imagenette's sizes) and Places365's.
pub fn trains_by_imagenet_recipe(name: &str) -> bool {
    name == "imagenet" || imagenette::named(name).is_some() || places365::named(name).is_some()
}

/// Whether the dataset `name` has a val split of its own besides its
/// training and test splits (Oxford 102 Flowers', DTD's, FGVC-Aircraft's
/// at each level, Country211's),
/// which
/// `--val-on val` validates on; the others hold out part of their training
/// split for it.
pub fn has_own_val(name: &str) -> bool {
    aircraft::named(name).is_some() || matches!(name, flowers::NAME | dtd::NAME | country211::NAME)
}

/// The probability with which training mirrors the images of the dataset
/// named `name` unless `--hflip` says otherwise: torchvision's 0.5, or 0
/// where a mirrored image is of no class or of another (digits: the
/// built-in ones, MNIST's, USPS's, SVHN's house numbers; GTSRB's signs, where
/// "Keep right" mirrored is "Keep left").
pub fn default_hflip(name: &str) -> f64 {
    let unmirrored = matches!(name, "digits" | "svhn" | usps::NAME | gtsrb::NAME)
        || mnist::named(name).is_some_and(|m| !m.mirrors_keep_class);
    match unmirrored {
        true => 0.0,
        false => augment::HFLIP,
    }
}

/// Whether the dataset `name`'s images are gray (the built-in digits,
/// MNIST's family's, USPS's, FER2013's faces): a model trained on them
/// reads any image as gray ([`image::to_luma`]).
pub fn is_gray(name: &str) -> bool {
    matches!(name, "digits" | usps::NAME | fer2013::NAME) || mnist::named(name).is_some()
}

/// The side of the dataset `name`'s images as it keeps them, at which its
/// models read an image whole: STL-10's 96; EuroSAT's 64; FER2013's 48; CIFAR's,
/// MNIST's, USPS's, SVHN's and the digits' 32 (and the CIFAR-style side of folder
/// training).
pub fn native_side(name: &str) -> i64 {
    match name {
        "stl10" => stl10::SIDE,
        eurosat::NAME => eurosat::SIDE,
        fer2013::NAME => fer2013::SIDE,
        _ => cifar::SIDE,
    }
}

/// Counts of each byte value in each colour channel of a set of images.
pub type Histograms = [[u64; 256]; 3];

/// The histograms of gray images' bytes `pixels` (one per channel, the
/// three equal: gray images are read as RGB).
pub fn gray_histograms(pixels: &[u8]) -> Histograms {
    let mut counts = [0u64; 256];
    pixels.iter().for_each(|&v| counts[v as usize] += 1);
    [counts; 3]
}

/// Each channel's mean and standard deviation of `value / 255` over the
/// pixels `counts` counts (the population's): the normalization of a
/// dataset without customary constants, from its training images
/// (STL-10's, KMNIST's).
pub fn mean_std(counts: &Histograms) -> Result<([f64; 3], [f64; 3])> {
    let (mut mean, mut std) = ([0.0; 3], [0.0; 3]);
    for (c, h) in counts.iter().enumerate() {
        let n: u64 = h.iter().sum();
        if n == 0 {
            bail!("no training images to normalize by");
        }
        let at = |v: usize| v as f64 / 255.0;
        let m = (0..256).map(|v| at(v) * h[v] as f64).sum::<f64>() / n as f64;
        let var = (0..256)
            .map(|v| (at(v) - m).powi(2) * h[v] as f64)
            .sum::<f64>()
            / n as f64;
        if var <= 0.0 {
            bail!(
                "every training pixel of channel {c} has the same value: nothing to normalize by"
            );
        }
        (mean[c], std[c]) = (m, var.sqrt());
    }
    Ok((mean, std))
}

/// One split, or a batch of one: images `N x 3 x H x W` uint8 and labels
/// `N` int64, loaded on the CPU and moved to the device in one copy.
pub struct Split {
    pub images: Tensor,
    pub labels: Tensor,
    /// Image folders: where each image lies in its canvas (see
    /// `augment::canvas_width`); None where images fill their tensor.
    pub layout: Option<Tensor>,
}

impl Split {
    /// A split of no images of `side` x `side` (evaluation's training
    /// split, which it does not read).
    pub fn empty(side: i64) -> Split {
        let cpu = Device::Cpu;
        Split {
            images: Tensor::zeros([0, 3, side, side], (tch::Kind::Uint8, cpu)),
            labels: Tensor::zeros([0], (tch::Kind::Int64, cpu)),
            layout: None,
        }
    }

    pub fn len(&self) -> i64 {
        self.labels.size()[0]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The same examples on `device` (asynchronously from pinned memory).
    pub fn to_device(&self, device: Device) -> Split {
        Split {
            images: self
                .images
                .to_device_(device, self.images.kind(), true, false),
            labels: self.labels.to_device(device),
            layout: self.layout.as_ref().map(|l| l.to_device(device)),
        }
    }

    /// Examples `start..start + len` (views, no copy).
    pub fn narrow(&self, start: i64, len: i64) -> Split {
        Split {
            images: self.images.narrow(0, start, len),
            labels: self.labels.narrow(0, start, len),
            layout: self.layout.as_ref().map(|l| l.narrow(0, start, len)),
        }
    }

    /// The examples at `idx` (int64, on the split's device).
    pub fn select(&self, idx: &Tensor) -> Split {
        Split {
            images: self.images.index_select(0, idx),
            labels: self.labels.index_select(0, idx),
            layout: self.layout.as_ref().map(|l| l.index_select(0, idx)),
        }
    }

    /// A copy with its own storage (a CUDA graph's static input).
    pub fn copy(&self) -> Split {
        Split {
            images: self.images.copy(),
            labels: self.labels.copy(),
            layout: self.layout.as_ref().map(Tensor::copy),
        }
    }

    /// Writes `from` into this split's tensors, which keep their storage.
    pub fn fill(&mut self, from: &Split) {
        self.images.copy_(&from.images);
        if let (Some(l), Some(f)) = (&mut self.layout, &from.layout) {
            l.copy_(f);
        }
        self.labels.copy_(&from.labels);
    }

    /// The first `n` examples (`--limit-train`, `--limit-test`).
    pub fn limit(self, n: Option<i64>) -> Split {
        match n {
            Some(n) if n < self.len() => self.narrow(0, n),
            _ => self,
        }
    }
}

/// A split held in memory, or read from its files as it is used.
pub enum Images {
    Resident(Split),
    Streamed(Streamed),
}

impl Images {
    pub fn len(&self) -> i64 {
        match self {
            Images::Resident(s) => s.len(),
            Images::Streamed(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The split, when it is held in memory.
    pub fn as_resident(&self) -> Option<&Split> {
        match self {
            Images::Resident(s) => Some(s),
            Images::Streamed(_) => None,
        }
    }

    pub fn is_streamed(&self) -> bool {
        matches!(self, Images::Streamed(_))
    }

    /// The first `n` examples (`--limit-train`, `--limit-test`).
    pub fn limit(self, n: Option<i64>) -> Images {
        match self {
            Images::Resident(s) => Images::Resident(s.limit(n)),
            Images::Streamed(s) => Images::Streamed(s.limit(n)),
        }
    }

    /// The examples at `idx`, in that order.
    pub fn select(&self, idx: &[i64]) -> Images {
        match self {
            Images::Resident(s) => {
                let at = Tensor::from_slice(idx).to_device(s.labels.device());
                Images::Resident(s.select(&at))
            }
            Images::Streamed(s) => Images::Streamed(Streamed {
                items: std::sync::Arc::new(
                    idx.iter().map(|&i| s.items[i as usize].clone()).collect(),
                ),
                ..s.clone()
            }),
        }
    }

    /// The same split for `device`: resident images move there; streamed
    /// ones are copied through pinned memory when it is a GPU.
    pub fn to_device(&self, device: Device) -> Images {
        match self {
            Images::Resident(s) => Images::Resident(s.to_device(device)),
            Images::Streamed(s) => Images::Streamed(Streamed {
                pin: device.is_cuda(),
                ..s.clone()
            }),
        }
    }

    /// Examples `first..first + n` in batches of `batch`, in order, on
    /// `device` (streamed images through `transform`).
    pub fn in_order(
        &self,
        first: i64,
        n: i64,
        batch: i64,
        transform: Transform,
        device: Device,
    ) -> Result<Batches<'_>> {
        Ok(match self {
            Images::Resident(s) => Batches::Resident {
                split: s,
                next: first,
                end: first + n,
                batch,
                last: Vec::new(),
            },
            Images::Streamed(s) => Batches::Streamed {
                stream: InOrder::new(s, first, n, batch, transform)?,
                device,
            },
        })
    }
}

/// The batches of [`Images::in_order`].
pub enum Batches<'a> {
    Resident {
        split: &'a Split,
        next: i64,
        end: i64,
        batch: i64,
        last: Vec<i64>,
    },
    Streamed {
        stream: InOrder,
        device: Device,
    },
}

impl Batches<'_> {
    /// The next batch (streamed: without the images that could not be
    /// read), or None after the last.
    pub fn next_batch(&mut self) -> Result<Option<Split>> {
        match self {
            Batches::Resident {
                split,
                next,
                end,
                batch,
                last,
            } => {
                if next >= end {
                    return Ok(None);
                }
                let len = (*batch).min(*end - *next);
                let b = split.narrow(*next, len);
                *last = (*next..*next + len).collect();
                *next += len;
                Ok(Some(b))
            }
            Batches::Streamed { stream, device } => {
                Ok(stream.next_batch()?.map(|b| b.to_device(*device)))
            }
        }
    }

    /// The indices in the split of the last batch's images.
    pub fn indices(&self) -> &[i64] {
        match self {
            Batches::Resident { last, .. } => last,
            Batches::Streamed { stream, .. } => &stream.last,
        }
    }

    /// The messages of the images skipped so far.
    pub fn skipped(&self) -> &[String] {
        match self {
            Batches::Resident { .. } => &[],
            Batches::Streamed { stream, .. } => &stream.skipped,
        }
    }
}

pub struct Dataset {
    /// `cifar10`
    pub name: String,
    pub train: Images,
    pub test: Images,
    pub classes: Vec<String>,
    /// Per-channel normalization of [0, 1] pixels.
    pub mean: [f64; 3],
    pub std: [f64; 3],
    /// Where it was read from, for messages.
    pub source: String,
    /// ImageNet's layout: each class's WordNet id (its folder), by which
    /// its index among ImageNet's 1,000 classes is known.
    pub wnids: Option<Vec<String>>,
    /// What names each test image held in memory: its file (image
    /// folders), or its index in scikit-learn's `load_digits()`; None where
    /// its index in the test split does (CIFAR-10, as torchvision's
    /// `CIFAR10(train=False)` indexes it). A streamed split's items name
    /// theirs.
    pub test_names: Option<Vec<String>>,
}

impl Dataset {
    /// The dataset validated on a part of its training split
    /// (`--val-on val` where it has no val split of its own): the fraction
    /// `val_split` of it drawn by `seed`, as a folder's `--val-split` part
    /// is drawn, the rest trained on. Held-out image `i` is named by its
    /// index in the training split (`train 1234`).
    pub fn hold_out(self, val_split: f64, seed: u64) -> Result<Dataset> {
        let n = self.train.len() as usize;
        let Some(k) = folder::held_out_count(n, val_split) else {
            bail!(
                "{}: {n} training image(s) cannot be split into training and validation",
                self.source
            );
        };
        let order: Vec<i64> = (folder::shuffled(n, seed).into_iter())
            .map(|i| i as i64)
            .collect();
        let names = order[..k].iter().map(|i| format!("train {i}")).collect();
        Ok(Dataset {
            test: self.train.select(&order[..k]),
            train: self.train.select(&order[k..]),
            test_names: Some(names),
            ..self
        })
    }

    /// Test image `i` as a person finds it: its file (a prepared
    /// dataset's `FILE:ENTRY`), or its index (see `test_names`).
    pub fn test_image(&self, i: i64) -> String {
        let name = match (&self.test, &self.test_names) {
            (Images::Streamed(s), _) => s
                .items
                .get(i as usize)
                .map(|t| t.path.display().to_string()),
            (Images::Resident(_), Some(names)) => names.get(i as usize).cloned(),
            (Images::Resident(_), None) => None,
        };
        name.unwrap_or_else(|| i.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    fn split(n: i64) -> Split {
        Split {
            images: Tensor::arange(n * 3 * 2 * 2, (Kind::Uint8, Device::Cpu)).view([n, 3, 2, 2]),
            labels: Tensor::arange(n, (Kind::Int64, Device::Cpu)),
            layout: Some(Tensor::arange(n * 3, (Kind::Int64, Device::Cpu)).view([n, 3])),
        }
    }

    fn labels(s: &Split) -> Vec<i64> {
        Vec::try_from(&s.labels).unwrap()
    }

    /// narrow, select and limit keep images, labels and layout rows
    /// together; fill writes into a copy's own storage.
    #[test]
    fn batches_keep_images_labels_and_layout_together() {
        let s = split(5);
        let b = s.narrow(1, 3);
        assert_eq!(labels(&b), [1, 2, 3]);
        let picked = s.select(&Tensor::from_slice(&[4i64, 0]));
        assert_eq!(labels(&picked), [4, 0]);
        assert!(picked.images.get(0).equal(&s.images.get(4)));
        assert!(
            picked
                .layout
                .as_ref()
                .unwrap()
                .get(1)
                .equal(&s.layout.as_ref().unwrap().get(0))
        );
        let mut io = b.copy();
        io.fill(&s.narrow(2, 3));
        assert_eq!(labels(&io), [2, 3, 4]);
        assert_eq!(labels(&b), [1, 2, 3], "the copy has its own storage");
        assert!(io.images.equal(&s.images.narrow(0, 2, 3)));
        assert_eq!(labels(&s.to_device(Device::Cpu)), [0, 1, 2, 3, 4]);
        assert_eq!(split(5).limit(Some(2)).len(), 2);
        assert_eq!(split(5).limit(Some(9)).len(), 5);
    }

    /// A held-out part is the seeded draw's first images, named by their
    /// index in the training split; the rest are trained on; none is lost.
    #[test]
    fn a_held_out_part_is_drawn_from_the_training_split() {
        let d = Dataset {
            name: "digits".into(),
            train: Images::Resident(split(10)),
            test: Images::Resident(split(2)),
            classes: Vec::new(),
            mean: [0.0; 3],
            std: [1.0; 3],
            source: "x".into(),
            wnids: None,
            test_names: None,
        };
        let h = d.hold_out(0.3, 7).unwrap();
        let order = folder::shuffled(10, 7);
        let (train, test) = (
            h.train.as_resident().unwrap(),
            h.test.as_resident().unwrap(),
        );
        let want = |ids: &[usize]| ids.iter().map(|&i| i as i64).collect::<Vec<_>>();
        assert_eq!(labels(test), want(&order[..3]));
        assert_eq!(labels(train), want(&order[3..]));
        assert_eq!(h.test_image(1), format!("train {}", order[1]));
        assert!(
            test.layout
                .as_ref()
                .unwrap()
                .get(0)
                .equal(&split(10).layout.unwrap().get(order[0] as i64))
        );
    }
}
