//! The VGG family: torchvision's cfg table, one builder, parameters named as in
//! torchvision's state dict and initialized with torchvision's scheme.
//!
//! The model owns its tensors (no `tch::nn::VarStore`) so that names, init,
//! freezing, dtype/layout changes and the optimizer's state are all explicit.
//! It has no modes: how it is run (precision, the inference form) is
//! decided above it, in `numerics` and `infer`.
//! - `spec`: what fixes the structure (cfgs, heads, layer list, input size);
//! - `cut`: a model cut at a module (an embedding model) and its output;
//! - `layer`: the modules and their tensors;
//! - `flat`: the trained parameters as views of one flat buffer (the fused
//!   optimizer's), and the fused step's half-precision copy of the weights;
//! - `state_dict`: the check of a state dict against torchvision's names
//!   and shapes (loading and reading one are `Vgg`'s own);
//! - `recognize`: which VGG a state dict is, and the model a request leaves
//!   open resolved from it.

mod batch_norm;
mod cut;
mod flat;
mod layer;
mod recognize;
mod spec;
mod state_dict;

pub use batch_norm::{BN_EPS, BN_MOMENTUM, SumAcross, batch_norm, batch_norm_moving};
pub use cut::{Pool, Tail};
pub use flat::ComputeCopy;
pub use layer::{Layer, PAD_CHANNELS, Sequential};
pub use recognize::{Resolved, SpecRequest, recognize};
pub use spec::{
    Arch, Cfg, Head, LayerKind, LayerSpec, MAX_CLASSES, MAX_INPUT, MIN_INPUT, ModelSpec,
    check_classes, check_input, check_run_side, check_side,
};
pub use state_dict::{Values, check_finite, check_state_dict};

use std::collections::BTreeMap;

use anyhow::Result;
use tch::{Device, Kind, Tensor};

/// NCHW shape with NHWC strides (cuDNN and oneDNN follow the strides); other
/// tensors unchanged.
pub fn to_channels_last(t: &Tensor) -> Tensor {
    if t.dim() == 4 {
        t.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
    } else {
        t.shallow_clone()
    }
}

pub fn is_channels_last(t: &Tensor) -> bool {
    let (size, stride) = (t.size(), t.stride());
    size.len() == 4 && stride[1] == 1 && stride[3] == size[1]
}

/// A VGG network: `features`, then the head's pooling, flattening and `classifier`.
pub struct Vgg {
    pub spec: ModelSpec,
    pub features: Sequential,
    pub pool_size: i64,
    pub classifier: Sequential,
    /// The first `frozen_prefix` modules of `features` are frozen: their
    /// parameters get no gradient and their BatchNorm layers stay in eval
    /// mode while the rest trains.
    pub frozen_prefix: usize,
    /// How far the head runs (all of it but in a cut model).
    pub tail: Tail,
    /// A cut model's feature maps pooled to one value per channel
    /// ([`Vgg::pooled`]).
    pub pool: Option<Pool>,
    /// Training in half precision with the fused step: the trained
    /// convolution and linear weights' compute-dtype copy (see
    /// [`Vgg::flatten_trainable`]).
    compute: Option<ComputeCopy>,
}

/// One tensor of the state dict.
pub struct Entry<'a> {
    pub name: String,
    pub tensor: &'a Tensor,
    pub is_param: bool,
}

impl Vgg {
    /// A freshly initialized model, moved to `device`. Parameters require grad.
    pub fn new(spec: ModelSpec, device: Device) -> Vgg {
        let mut model = Self::built(spec, None);
        model.to_device(device);
        model
    }

    /// A model of `spec` on `device` holding the state dict `dict`, checked
    /// as [`Vgg::load_state_dict`] checks it, as [`Vgg::new`] then
    /// `load_state_dict` would give it; nothing is initialized or copied
    /// first (the weights' only copy is `dict`'s, moved to `device`).
    pub fn from_state_dict(
        spec: ModelSpec,
        device: Device,
        source: &str,
        dict: &BTreeMap<String, Tensor>,
        values: Values,
    ) -> Result<Vgg> {
        let mut model = Self::built(spec, Some(device));
        // Already there: marks the parameters as requiring grad, copies nothing.
        model.to_device(device);
        model.load_state_dict(source, dict, values)?;
        Ok(model)
    }

    /// `spec`'s layers, initialized, or `blank` on a device.
    fn built(spec: ModelSpec, blank: Option<Device>) -> Vgg {
        let classifier_specs: Vec<LayerSpec> = spec
            .head_layers()
            .into_iter()
            .filter(|l| l.name.starts_with("classifier"))
            .collect();
        Vgg::of(
            spec,
            Sequential::build(&spec.feature_layers(), blank),
            spec.head.pool_size(),
            Sequential::build(&classifier_specs, blank),
        )
    }

    /// A model of these parts, nothing frozen.
    pub fn of(
        spec: ModelSpec,
        features: Sequential,
        pool_size: i64,
        classifier: Sequential,
    ) -> Vgg {
        Vgg {
            spec,
            features,
            pool_size,
            classifier,
            frozen_prefix: 0,
            tail: Tail::Classifier,
            pool: None,
            compute: None,
        }
    }

    pub fn device(&self) -> Device {
        self.entries()[0].tensor.device()
    }

    /// The head: adaptive pooling, flatten, classifier. `flatten(1, -1)`
    /// keeps the batch dimension symbolic when traced.
    pub fn head_forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let end = |x: Tensor| match self.pool {
            Some(pool) => pool.apply(&x),
            None => x,
        };
        if self.tail == Tail::Features {
            return end(x.shallow_clone());
        }
        let x = x.adaptive_avg_pool2d([self.pool_size, self.pool_size]);
        if self.tail == Tail::Avgpool {
            return end(x);
        }
        let x = x.flatten(1, -1);
        match self.tail {
            Tail::Classifier => self.classifier.forward_t(&x, train),
            _ => x,
        }
    }

    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        if let (true, Some(copy)) = (train, &self.compute) {
            copy.refresh();
        }
        let frozen = self.frozen_prefix.min(self.features.layers.len());
        let f = if train && frozen > 0 {
            let head = self.features.forward_prefix(x, frozen, false);
            self.features.forward_from(&head, frozen, true)
        } else {
            self.features.forward_t(x, train)
        };
        self.head_forward_t(&f, train)
    }

    /// The outputs of the modules at `positions` (indices into
    /// `spec.layers()`: `features.*`, `avgpool`, `flatten`, `classifier*`),
    /// in evaluation mode and in the order asked, each as its module
    /// returns it (torchvision's `create_feature_extractor`); the network
    /// runs only as far as the last of them.
    pub fn forward_to(&self, x: &Tensor, positions: &[usize]) -> Vec<Tensor> {
        let last = positions.iter().copied().max();
        let nf = self.features.layers.len();
        let mut outputs = BTreeMap::new();
        let mut x = x.shallow_clone();
        for p in 0..last.map_or(0, |l| l + 1) {
            x = match p {
                _ if p < nf => self.features.forward_one(&x, p, false),
                _ if p == nf => x.adaptive_avg_pool2d([self.pool_size, self.pool_size]),
                _ if p == nf + 1 => x.flatten(1, -1),
                _ => self.classifier.forward_one(&x, p - nf - 2, false),
            };
            if positions.contains(&p) {
                outputs.insert(p, x.shallow_clone());
            }
        }
        positions
            .iter()
            .map(|p| outputs[p].shallow_clone())
            .collect()
    }

    fn sections(&self) -> [&Sequential; 2] {
        [&self.features, &self.classifier]
    }

    /// Parameters and running statistics, in torchvision's state-dict order
    /// (without `num_batches_tracked`, see [`Vgg::num_batches_tracked`]).
    pub fn entries(&self) -> Vec<Entry<'_>> {
        let mut out = Vec::new();
        for section in self.sections() {
            for (name, layer) in &section.layers {
                for (suffix, tensor, is_param) in layer.tensors() {
                    out.push(Entry {
                        name: format!("{name}.{suffix}"),
                        tensor,
                        is_param,
                    });
                }
            }
        }
        out
    }

    /// Learnable parameters by name, in state-dict order.
    pub fn parameters(&self) -> Vec<(String, &Tensor)> {
        self.entries()
            .into_iter()
            .filter(|e| e.is_param)
            .map(|e| (e.name, e.tensor))
            .collect()
    }

    /// Parameters that currently require a gradient.
    pub fn trainable_parameters(&self) -> Vec<(String, &Tensor)> {
        self.parameters()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect()
    }

    /// The state-dict names of the normalization layers' parameters
    /// (BatchNorm's weight and bias), which `--norm-weight-decay` decays.
    pub fn norm_parameter_names(&self) -> Vec<String> {
        self.features
            .layers
            .iter()
            .filter(|(_, layer)| matches!(layer, Layer::BatchNorm { .. }))
            .flat_map(|(name, _)| [format!("{name}.weight"), format!("{name}.bias")])
            .collect()
    }

    /// `features.{i}.num_batches_tracked` for every BatchNorm layer.
    pub fn num_batches_tracked(&self) -> Vec<(String, i64)> {
        self.features
            .layers
            .iter()
            .filter_map(|(name, layer)| match layer {
                Layer::BatchNorm {
                    num_batches_tracked,
                    ..
                } => Some((
                    format!("{name}.num_batches_tracked"),
                    num_batches_tracked.get(),
                )),
                _ => None,
            })
            .collect()
    }

    /// Adds `delta[i]` to the i-th BatchNorm layer's `num_batches_tracked`
    /// (the order of [`Vgg::num_batches_tracked`]): a replayed CUDA graph
    /// runs the forward pass without the host code that counts.
    pub fn add_batches_tracked(&self, delta: &[i64]) {
        let counters = self.features.layers.iter().filter_map(|(_, l)| match l {
            Layer::BatchNorm {
                num_batches_tracked,
                ..
            } => Some(num_batches_tracked),
            _ => None,
        });
        for (c, d) in counters.zip(delta) {
            c.set(c.get() + d);
        }
    }

    /// Applies `f` to every tensor (parameters and buffers) and stores the result.
    pub fn map_tensors(&mut self, mut f: impl FnMut(&str, &Tensor) -> Tensor) {
        self.drop_compute_copy();
        for section in [&mut self.features, &mut self.classifier] {
            for (name, layer) in &mut section.layers {
                for (suffix, tensor, is_param) in layer.tensors_mut() {
                    let requires_grad = is_param && tensor.requires_grad();
                    let new = tch::no_grad(|| f(&format!("{name}.{suffix}"), tensor));
                    *tensor = new.detach().set_requires_grad(requires_grad);
                }
            }
        }
    }

    /// Moves every tensor to `device`; parameters stay leaves that require grad.
    pub fn to_device(&mut self, device: Device) {
        self.drop_compute_copy();
        let first = self
            .features
            .layers
            .first()
            .map(|(_, l)| l.tensors()[0].1.device());
        let moved = first != Some(device);
        for section in [&mut self.features, &mut self.classifier] {
            for (_, layer) in &mut section.layers {
                for (_, tensor, is_param) in layer.tensors_mut() {
                    let t = if moved {
                        tensor.to_device(device)
                    } else {
                        tensor.shallow_clone()
                    };
                    *tensor = t.detach().set_requires_grad(is_param);
                }
            }
        }
    }

    /// Freezes the first `n` modules of `features` (n counts every module as
    /// torchvision's index does; `usize::MAX` freezes all of `features`).
    pub fn freeze_features(&mut self, n: usize) {
        self.drop_compute_copy();
        self.frozen_prefix = n.min(self.features.layers.len());
        for (_, layer) in self.features.layers.iter_mut().take(n) {
            for (_, tensor, _) in layer.tensors_mut() {
                *tensor = tensor.detach().set_requires_grad(false);
            }
        }
    }

    /// Convolution weights in NHWC strides (cuDNN then runs channels-last).
    pub fn to_channels_last(&mut self) {
        self.map_tensors(|_, t| to_channels_last(t));
    }

    /// Detaches every parameter from autograd (export and tracing need
    /// constants, not leaves that require grad).
    pub fn into_inference(mut self) -> Vgg {
        self.drop_compute_copy();
        for section in [&mut self.features, &mut self.classifier] {
            for (_, layer) in &mut section.layers {
                for (_, tensor, _) in layer.tensors_mut() {
                    *tensor = tensor.detach().set_requires_grad(false);
                }
            }
        }
        self
    }

    /// How far BatchNorm moves its running statistics in training
    /// (torchvision's BatchNorm2d's `momentum`, 0.1 by default).
    pub fn set_bn_momentum(&mut self, m: f64) {
        self.features.bn_momentum = m;
    }

    /// Sets the probability of every Dropout layer of the classifier
    /// (torchvision's `vgg16(dropout=p)`; 0.5 as built).
    pub fn set_dropout(&mut self, p: f64) {
        for (_, layer) in &mut self.classifier.layers {
            if let Layer::Dropout(q) = layer {
                *q = p;
            }
        }
    }

    /// Replaces the last linear layer (`classifier.6`, `classifier.3` or
    /// `classifier`) by a new one with `classes` outputs and torchvision's
    /// init (normal(0, 0.01), bias 0), on the model's device.
    pub fn replace_last_linear(&mut self, classes: i64) {
        self.drop_compute_copy();
        let device = self.device();
        if let Some((_, Layer::Linear { weight, bias })) = self.classifier.layers.last_mut() {
            let fin = weight.size()[1];
            let w = Tensor::randn([classes, fin], (Kind::Float, Device::Cpu)) * 0.01;
            *weight = w.to_device(device).set_requires_grad(true);
            *bias = Tensor::zeros([classes], (Kind::Float, device)).set_requires_grad(true);
        }
        self.spec.classes = classes;
    }

    /// Copies a state dict into the model after checking names and shapes.
    /// `num_batches_tracked` may be present (int64 scalar) or absent.
    pub fn load_state_dict(
        &mut self,
        source: &str,
        dict: &BTreeMap<String, Tensor>,
        values: Values,
    ) -> Result<()> {
        check_state_dict(&self.spec, source, dict)?;
        if values == Values::FiniteOnly {
            check_finite(source, dict)?;
        }
        let device = self.device();
        self.map_tensors(|name, t| dict[name].to_kind(t.kind()).to_device(device).contiguous());
        for (name, layer) in &self.features.layers {
            if let Layer::BatchNorm {
                num_batches_tracked,
                ..
            } = layer
            {
                let key = format!("{name}.num_batches_tracked");
                if let Some(t) = dict.get(&key) {
                    num_batches_tracked.set(t.int64_value(&[]));
                }
            }
        }
        Ok(())
    }

    /// The state dict as torchvision has it: parameters, running statistics
    /// and int64 `num_batches_tracked` scalars, on the CPU, in order.
    pub fn state_dict(&self) -> Vec<(String, Tensor)> {
        let nbt: BTreeMap<String, i64> = self.num_batches_tracked().into_iter().collect();
        let mut out = Vec::new();
        for e in self.entries() {
            let t = e.tensor.detach().to_device(Device::Cpu).contiguous();
            let is_var = e.name.ends_with(".running_var");
            out.push((e.name.clone(), t));
            if is_var {
                let key = e.name.replace(".running_var", ".num_batches_tracked");
                out.push((key.clone(), Tensor::from(nbt[&key])));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `set_dropout` reaches every Dropout layer of the ImageNet head (two,
    /// as torchvision's `vgg11(dropout=p)` sets) and nothing else.
    #[test]
    fn dropout_is_set_on_every_dropout_layer() {
        let spec = ModelSpec {
            arch: Arch::Vgg11,
            bn: false,
            head: Head::Imagenet,
            classes: 2,
        };
        let mut model = Vgg::new(spec, Device::Cpu);
        let dropouts = |m: &Vgg| -> Vec<f64> {
            m.classifier
                .layers
                .iter()
                .filter_map(|(_, l)| match l {
                    Layer::Dropout(p) => Some(*p),
                    _ => None,
                })
                .collect()
        };
        assert_eq!(dropouts(&model), vec![0.5, 0.5]);
        let layers = model.classifier.layers.len();
        model.set_dropout(0.2);
        assert_eq!(dropouts(&model), vec![0.2, 0.2]);
        assert_eq!(model.classifier.layers.len(), layers);
    }

    /// A model cut at every module computes what `forward_to` gives for
    /// it, of the shape `output_shape` says; only the last cut is whole.
    #[test]
    fn a_cut_model_computes_its_modules_output() {
        let _seeded = crate::seeded();
        tch::manual_seed(5);
        let spec = ModelSpec::new(Arch::Vgg11, true, Head::Cifar, 4);
        let model = Vgg::new(spec, Device::Cpu);
        let x = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
        let positions: Vec<usize> = (0..spec.layers().len()).collect();
        let outputs = tch::no_grad(|| model.forward_to(&x, &positions));
        for (p, want) in positions.iter().zip(&outputs) {
            let cut = model.cut(*p);
            let got = tch::no_grad(|| cut.forward_t(&x, false));
            assert!(got.allclose(want, 1e-6, 1e-6, false), "{p}");
            assert_eq!(got.size()[1..], cut.output_shape(32)[..], "{p}");
            assert_eq!(cut.is_whole(), *p == positions.len() - 1, "{p}");
        }
    }
}
