//! Datasets as uint8 tensors, loaded once, and the batched augmentation that
//! runs on the training device.

pub mod augment;
pub mod cifar;
pub mod download;
pub mod folder;
pub mod image;

use tch::Tensor;

/// One split: images `N x 3 x H x W` uint8 and labels `N` int64, on the CPU
/// until the trainer moves them to its device in one copy.
pub struct Split {
    pub images: Tensor,
    pub labels: Tensor,
    /// Image folders: where each image lies in its canvas (see
    /// `augment::canvas_width`); None where images fill their tensor.
    pub layout: Option<Tensor>,
}

impl Split {
    pub fn len(&self) -> i64 {
        self.labels.size()[0]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The first `n` examples (`--limit-train`, `--limit-test`).
    pub fn limit(self, n: Option<i64>) -> Split {
        match n {
            Some(n) if n < self.len() => Split {
                images: self.images.narrow(0, 0, n),
                labels: self.labels.narrow(0, 0, n),
                layout: self.layout.map(|l| l.narrow(0, 0, n)),
            },
            _ => self,
        }
    }
}

pub struct Dataset {
    /// `cifar10`
    pub name: String,
    pub train: Split,
    pub test: Split,
    pub classes: Vec<String>,
    /// Per-channel normalization of [0, 1] pixels.
    pub mean: [f64; 3],
    pub std: [f64; 3],
    /// Where it was read from, for messages.
    pub source: String,
}
