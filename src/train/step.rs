//! The forward half of a training step, written once for the eager and the
//! captured (CUDA graph) step: logits in the run's numerics, the loss and
//! the number of correct predictions, all left on the device.

use tch::{Kind, Reduction, Tensor};

use crate::model::Vgg;
use crate::numerics::Numerics;

pub struct Forward {
    /// Mean cross-entropy of the batch (with label smoothing).
    pub loss: Tensor,
    /// Correct top-1 predictions (int64 scalar).
    pub correct: Tensor,
}

/// Training-mode forward pass of `model` on the fp32 batch `x` with labels
/// `y`: class indices, or (mixed batches) one probability row per image,
/// whose largest entry counts as the class for accuracy.
pub fn forward_loss(
    model: &Vgg,
    numerics: &Numerics,
    x: &Tensor,
    y: &Tensor,
    label_smoothing: f64,
) -> Forward {
    let logits = numerics.forward(model, x, true);
    let loss = logits.cross_entropy_loss::<Tensor>(y, None, Reduction::Mean, -100, label_smoothing);
    let target = match y.dim() {
        2 => y.argmax(-1, false),
        _ => y.shallow_clone(),
    };
    let correct = logits.argmax(-1, false).eq_tensor(&target).sum(Kind::Int64);
    Forward { loss, correct }
}
