//! The trained parameters as views of one flat fp32 buffer (what the fused
//! optimizer updates in one kernel) and, for training in half precision
//! with the fused step, the compute-dtype copy of the convolution and
//! linear weights, cast from that buffer once per step.

use tch::{Kind, Tensor};

use super::{Layer, Sequential, Vgg};

/// The trained convolution and linear weights and biases in the compute
/// dtype (issue #18, lever 5). Under autocast every forward pass casts
/// each weight (a kernel per tensor) and every backward pass casts each
/// weight's gradient back (another). Here one kernel casts them all from
/// their fp32 masters, which the flat buffer keeps in one segment, at the
/// start of each training forward pass; the layers compute with views of
/// the copy (their `Sequential::stand_ins`) and autograd differentiates
/// those views, whose gradients the optimizer gathers in the compute dtype
/// and casts once. The numbers are autocast's, bit for bit: the same
/// weights rounded the same way, the same gradients rounded the same way.
pub struct ComputeCopy {
    master: Tensor,
    copy: Tensor,
}

impl ComputeCopy {
    /// Casts the masters into the copy: one kernel.
    pub(super) fn refresh(&self) {
        tch::no_grad(|| self.copy.shallow_clone().copy_(&self.master));
    }
}

/// A view of `seg` in the shape `size`, its elements in NHWC order for a
/// 4-d tensor with `channels_last` (cuDNN then runs channels-last).
fn view_in(seg: &Tensor, size: &[i64], channels_last: bool) -> Tensor {
    if channels_last && size.len() == 4 {
        seg.view([size[0], size[2], size[3], size[1]])
            .permute([0, 3, 1, 2])
    } else {
        seg.view(size)
    }
}

/// The layer's learnable tensors, if all of them are trained.
fn trained(layer: &Layer) -> bool {
    let params: Vec<bool> = layer
        .tensors()
        .iter()
        .filter(|(_, _, is_param)| *is_param)
        .map(|(_, t, _)| t.requires_grad())
        .collect();
    !params.is_empty() && params.iter().all(|&r| r)
}

/// Whether a compute copy holds the layer's weights.
fn copied(layer: &Layer) -> bool {
    matches!(layer, Layer::Conv { .. } | Layer::Linear { .. }) && trained(layer)
}

impl Vgg {
    /// Moves the trainable parameters into one flat fp32 buffer, each
    /// parameter becoming a view of it (a leaf that requires grad), for the
    /// fused optimizer; returns the buffer (the parameters' values are
    /// unchanged). With `channels_last`, convolution weights are stored
    /// NHWC. With a `compute` dtype, the trained convolution and linear
    /// layers come first in the buffer and get their [`ComputeCopy`].
    pub fn flatten_trainable(&mut self, channels_last: bool, compute: Option<Kind>) -> Tensor {
        self.drop_compute_copy();
        let device = self.device();
        let first = |l: &Layer| compute.is_some() && copied(l);
        let (mut total, mut ahead) = (0, 0);
        for (_, layer) in self.features.layers.iter().chain(&self.classifier.layers) {
            for (_, t, is_param) in layer.tensors() {
                if is_param && t.requires_grad() {
                    total += t.numel() as i64;
                    ahead += if first(layer) { t.numel() as i64 } else { 0 };
                }
            }
        }
        let flat = Tensor::zeros([total], (Kind::Float, device));
        // The next free offset of the copied group and of the rest.
        let mut next = [0, ahead];
        tch::no_grad(|| {
            for section in [&mut self.features, &mut self.classifier] {
                for (_, layer) in &mut section.layers {
                    let group = usize::from(!first(layer));
                    for (_, t, is_param) in layer.tensors_mut() {
                        if !(is_param && t.requires_grad()) {
                            continue;
                        }
                        let n = t.numel() as i64;
                        let mut view =
                            view_in(&flat.narrow(0, next[group], n), &t.size(), channels_last);
                        view.copy_(t);
                        *t = view.detach().set_requires_grad(true);
                        next[group] += n;
                    }
                }
            }
        });
        if let Some(kind) = compute.filter(|_| ahead > 0) {
            self.copy_for_compute(flat.narrow(0, 0, ahead), kind, channels_last);
        }
        flat
    }

    /// Builds the compute copy of `master` (the copied layers' segment of
    /// the flat buffer, in layer order) and the layers' stand-ins.
    fn copy_for_compute(&mut self, master: Tensor, kind: Kind, channels_last: bool) {
        let copy = Tensor::zeros([master.numel() as i64], (kind, master.device()));
        let mut offset = 0;
        for section in [&mut self.features, &mut self.classifier] {
            let Sequential {
                layers, stand_ins, ..
            } = section;
            for (i, (_, layer)) in layers.iter().enumerate() {
                if !copied(layer) {
                    continue;
                }
                let mut twin = layer.shallow();
                for (_, t, _) in twin.tensors_mut() {
                    let n = t.numel() as i64;
                    *t = view_in(&copy.narrow(0, offset, n), &t.size(), channels_last)
                        .detach()
                        .set_requires_grad(true);
                    offset += n;
                }
                stand_ins.insert(i, twin);
            }
        }
        let c = ComputeCopy { master, copy };
        c.refresh();
        self.compute = Some(c);
    }

    /// The compute copy's views by parameter name (what autograd
    /// differentiates in place of those parameters), if there is a copy.
    pub fn compute_views(&self) -> Vec<(String, Tensor)> {
        let mut views = Vec::new();
        for section in [&self.features, &self.classifier] {
            for (i, stand_in) in &section.stand_ins {
                let name = &section.layers[*i].0;
                for (suffix, t, _) in stand_in.tensors() {
                    views.push((format!("{name}.{suffix}"), t.shallow_clone()));
                }
            }
        }
        views
    }

    /// Forgets the compute copy (the parameters are being replaced).
    pub(super) fn drop_compute_copy(&mut self) {
        self.compute = None;
        self.features.stand_ins.clear();
        self.classifier.stand_ins.clear();
    }
}
