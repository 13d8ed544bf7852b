//! The VGG family: torchvision's cfg table, one builder, parameters named as in
//! torchvision's state dict and initialized with torchvision's scheme.
//!
//! The model owns its tensors (no `tch::nn::VarStore`) so that names, init,
//! freezing, dtype/layout changes and the optimizer's state are all explicit.

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// One entry of a cfg: a 3x3 convolution with this many output channels, or a
/// 2x2/stride-2 max pooling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cfg {
    Conv(i64),
    Pool,
}

use Cfg::{Conv as C, Pool as M};

/// torchvision's cfgs "A", "B", "D", "E": convolutions of N channels, 2x2 max pools.
#[rustfmt::skip]
const CFG_A: &[Cfg] = &[
    C(64), M,
    C(128), M,
    C(256), C(256), M,
    C(512), C(512), M,
    C(512), C(512), M,
];
#[rustfmt::skip]
const CFG_B: &[Cfg] = &[
    C(64), C(64), M,
    C(128), C(128), M,
    C(256), C(256), M,
    C(512), C(512), M,
    C(512), C(512), M,
];
#[rustfmt::skip]
const CFG_D: &[Cfg] = &[
    C(64), C(64), M,
    C(128), C(128), M,
    C(256), C(256), C(256), M,
    C(512), C(512), C(512), M,
    C(512), C(512), C(512), M,
];
#[rustfmt::skip]
const CFG_E: &[Cfg] = &[
    C(64), C(64), M,
    C(128), C(128), M,
    C(256), C(256), C(256), C(256), M,
    C(512), C(512), C(512), C(512), M,
    C(512), C(512), C(512), C(512), M,
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Vgg11,
    Vgg13,
    Vgg16,
    Vgg19,
}

impl Arch {
    pub const ALL: [Arch; 4] = [Arch::Vgg11, Arch::Vgg13, Arch::Vgg16, Arch::Vgg19];

    pub fn cfg(self) -> &'static [Cfg] {
        match self {
            Arch::Vgg11 => CFG_A,
            Arch::Vgg13 => CFG_B,
            Arch::Vgg16 => CFG_D,
            Arch::Vgg19 => CFG_E,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Arch::Vgg11 => "vgg11",
            Arch::Vgg13 => "vgg13",
            Arch::Vgg16 => "vgg16",
            Arch::Vgg19 => "vgg19",
        }
    }

    /// Parses `vgg16` or `vgg16_bn`; the flag says whether `_bn` was given.
    pub fn parse_with_bn(s: &str) -> Result<(Arch, bool)> {
        let lower = s.to_ascii_lowercase();
        let (base, bn) = match lower.strip_suffix("_bn") {
            Some(base) => (base, true),
            None => (lower.as_str(), false),
        };
        match Arch::ALL.iter().find(|a| a.name() == base) {
            Some(a) => Ok((*a, bn)),
            None => bail!(
                "unknown architecture '{s}' (expected vgg11, vgg13, vgg16 or vgg19, optionally with _bn)"
            ),
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What follows `features`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Head {
    /// torchvision's: AdaptiveAvgPool2d(7x7), 25088 -> 4096 -> 4096 -> N.
    Imagenet,
    /// The CIFAR recipe's: AdaptiveAvgPool2d(1x1), 512 -> 512 -> N.
    Cifar,
    /// Global average pooling, then Linear(512, N).
    Gap,
}

impl Head {
    pub fn name(self) -> &'static str {
        match self {
            Head::Imagenet => "imagenet",
            Head::Cifar => "cifar",
            Head::Gap => "gap",
        }
    }

    /// Output size of the head's adaptive average pooling.
    pub fn pool_size(self) -> i64 {
        match self {
            Head::Imagenet => 7,
            Head::Cifar | Head::Gap => 1,
        }
    }

    pub fn default_classes(self) -> i64 {
        match self {
            Head::Imagenet => 1000,
            Head::Cifar | Head::Gap => 10,
        }
    }
}

impl FromStr for Head {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "imagenet" => Ok(Head::Imagenet),
            "cifar" => Ok(Head::Cifar),
            "gap" => Ok(Head::Gap),
            _ => bail!("unknown head '{s}' (expected imagenet, cifar or gap)"),
        }
    }
}

/// Everything that fixes a model's structure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelSpec {
    pub arch: Arch,
    pub bn: bool,
    pub head: Head,
    pub classes: i64,
}

/// One module of the network, as torchvision would list it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LayerKind {
    Conv { cin: i64, cout: i64 },
    BatchNorm { channels: i64 },
    Relu,
    MaxPool,
    AdaptiveAvgPool { size: i64 },
    Flatten,
    Dropout { p: f64 },
    Linear { fin: i64, fout: i64 },
}

impl LayerKind {
    /// Learnable parameters (buffers such as running statistics excluded).
    pub fn param_count(&self) -> i64 {
        match *self {
            LayerKind::Conv { cin, cout } => cin * cout * 9 + cout,
            LayerKind::BatchNorm { channels } => 2 * channels,
            LayerKind::Linear { fin, fout } => fin * fout + fout,
            _ => 0,
        }
    }

    /// The name torchvision's `repr` gives the module.
    pub fn describe(&self) -> String {
        match *self {
            LayerKind::Conv { cin, cout } => format!("Conv2d({cin}, {cout}, 3x3, pad 1)"),
            LayerKind::BatchNorm { channels } => format!("BatchNorm2d({channels})"),
            LayerKind::Relu => "ReLU".into(),
            LayerKind::MaxPool => "MaxPool2d(2x2, stride 2)".into(),
            LayerKind::AdaptiveAvgPool { size } => format!("AdaptiveAvgPool2d({size}x{size})"),
            LayerKind::Flatten => "Flatten".into(),
            LayerKind::Dropout { p } => format!("Dropout({p})"),
            LayerKind::Linear { fin, fout } => format!("Linear({fin}, {fout})"),
        }
    }
}

/// A layer's module path (`features.0`, `avgpool`, `classifier.6`) and kind.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerSpec {
    pub name: String,
    pub kind: LayerKind,
}

impl ModelSpec {
    pub fn new(arch: Arch, bn: bool, head: Head, classes: i64) -> Self {
        ModelSpec {
            arch,
            bn,
            head,
            classes,
        }
    }

    /// torchvision's name for this model: `vgg16`, `vgg16_bn`.
    pub fn model_name(&self) -> String {
        format!("{}{}", self.arch.name(), if self.bn { "_bn" } else { "" })
    }

    /// torchvision's `make_layers(cfg, batch_norm)`: the index counts every
    /// module, so the parameter names fall out of the position.
    pub fn feature_layers(&self) -> Vec<LayerSpec> {
        let mut kinds = Vec::new();
        let mut cin = 3;
        for item in self.arch.cfg() {
            match *item {
                Cfg::Pool => kinds.push(LayerKind::MaxPool),
                Cfg::Conv(cout) => {
                    kinds.push(LayerKind::Conv { cin, cout });
                    if self.bn {
                        kinds.push(LayerKind::BatchNorm { channels: cout });
                    }
                    kinds.push(LayerKind::Relu);
                    cin = cout;
                }
            }
        }
        kinds
            .into_iter()
            .enumerate()
            .map(|(i, kind)| LayerSpec {
                name: format!("features.{i}"),
                kind,
            })
            .collect()
    }

    /// The pooling, flattening and classifier that follow `features`.
    pub fn head_layers(&self) -> Vec<LayerSpec> {
        let c = self.classes;
        let size = self.head.pool_size();
        let mut layers = vec![
            LayerSpec {
                name: "avgpool".into(),
                kind: LayerKind::AdaptiveAvgPool { size },
            },
            LayerSpec {
                name: "flatten".into(),
                kind: LayerKind::Flatten,
            },
        ];
        let classifier: Vec<LayerKind> = match self.head {
            Head::Imagenet => vec![
                LayerKind::Linear {
                    fin: 512 * 7 * 7,
                    fout: 4096,
                },
                LayerKind::Relu,
                LayerKind::Dropout { p: 0.5 },
                LayerKind::Linear {
                    fin: 4096,
                    fout: 4096,
                },
                LayerKind::Relu,
                LayerKind::Dropout { p: 0.5 },
                LayerKind::Linear { fin: 4096, fout: c },
            ],
            Head::Cifar => vec![
                LayerKind::Linear {
                    fin: 512,
                    fout: 512,
                },
                LayerKind::Relu,
                LayerKind::Dropout { p: 0.5 },
                LayerKind::Linear { fin: 512, fout: c },
            ],
            Head::Gap => {
                // A single Linear module, so its keys are `classifier.weight`.
                layers.push(LayerSpec {
                    name: "classifier".into(),
                    kind: LayerKind::Linear { fin: 512, fout: c },
                });
                return layers;
            }
        };
        layers.extend(
            classifier
                .into_iter()
                .enumerate()
                .map(|(i, kind)| LayerSpec {
                    name: format!("classifier.{i}"),
                    kind,
                }),
        );
        layers
    }

    pub fn layers(&self) -> Vec<LayerSpec> {
        let mut all = self.feature_layers();
        all.extend(self.head_layers());
        all
    }

    pub fn param_count(&self) -> i64 {
        self.layers().iter().map(|l| l.kind.param_count()).sum()
    }

    /// Names and shapes of the state dict, in torchvision's order.
    pub fn state_dict_shapes(&self) -> Vec<(String, Vec<i64>)> {
        let mut out = Vec::new();
        for l in self.layers() {
            let n = &l.name;
            match l.kind {
                LayerKind::Conv { cin, cout } => {
                    out.push((format!("{n}.weight"), vec![cout, cin, 3, 3]));
                    out.push((format!("{n}.bias"), vec![cout]));
                }
                LayerKind::BatchNorm { channels } => {
                    for p in ["weight", "bias", "running_mean", "running_var"] {
                        out.push((format!("{n}.{p}"), vec![channels]));
                    }
                    out.push((format!("{n}.num_batches_tracked"), vec![]));
                }
                LayerKind::Linear { fin, fout } => {
                    out.push((format!("{n}.weight"), vec![fout, fin]));
                    out.push((format!("{n}.bias"), vec![fout]));
                }
                _ => {}
            }
        }
        out
    }
}

/// The parameters and buffers of one module.
pub enum Layer {
    Conv {
        weight: Tensor,
        bias: Tensor,
    },
    BatchNorm {
        weight: Tensor,
        bias: Tensor,
        running_mean: Tensor,
        running_var: Tensor,
        /// torchvision's `num_batches_tracked`, kept on the host: it is only
        /// ever exported, and a device scalar would cost a kernel per layer.
        num_batches_tracked: Cell<i64>,
    },
    Relu,
    MaxPool,
    Dropout(f64),
    Linear {
        weight: Tensor,
        bias: Tensor,
    },
}

pub const BN_EPS: f64 = 1e-5;
const BN_MOMENTUM: f64 = 0.1;

/// A layer's tensors by torchvision suffix: one match serving `&Layer` and
/// `&mut Layer` (binding modes give `&Tensor` or `&mut Tensor`).
macro_rules! layer_tensors {
    ($layer:expr) => {
        match $layer {
            Layer::Conv { weight, bias } | Layer::Linear { weight, bias } => {
                vec![("weight", weight, true), ("bias", bias, true)]
            }
            Layer::BatchNorm {
                weight,
                bias,
                running_mean,
                running_var,
                ..
            } => vec![
                ("weight", weight, true),
                ("bias", bias, true),
                ("running_mean", running_mean, false),
                ("running_var", running_var, false),
            ],
            _ => vec![],
        }
    };
}

impl Layer {
    /// Another handle on the same tensors (for read-only rewrites such as
    /// BatchNorm folding).
    pub fn shallow(&self) -> Layer {
        match self {
            Layer::Conv { weight, bias } => Layer::Conv {
                weight: weight.shallow_clone(),
                bias: bias.shallow_clone(),
            },
            Layer::Linear { weight, bias } => Layer::Linear {
                weight: weight.shallow_clone(),
                bias: bias.shallow_clone(),
            },
            Layer::BatchNorm {
                weight,
                bias,
                running_mean,
                running_var,
                num_batches_tracked,
            } => Layer::BatchNorm {
                weight: weight.shallow_clone(),
                bias: bias.shallow_clone(),
                running_mean: running_mean.shallow_clone(),
                running_var: running_var.shallow_clone(),
                num_batches_tracked: num_batches_tracked.clone(),
            },
            Layer::Relu => Layer::Relu,
            Layer::MaxPool => Layer::MaxPool,
            Layer::Dropout(p) => Layer::Dropout(*p),
        }
    }

    /// Builds a layer with torchvision's initialization (on the CPU, from
    /// libtorch's global generator).
    fn init(kind: &LayerKind) -> Option<Layer> {
        let opts = (Kind::Float, Device::Cpu);
        Some(match *kind {
            LayerKind::Conv { cin, cout } => {
                // kaiming_normal_(mode="fan_out", nonlinearity="relu")
                let std = (2.0 / (cout * 9) as f64).sqrt();
                Layer::Conv {
                    weight: Tensor::randn([cout, cin, 3, 3], opts) * std,
                    bias: Tensor::zeros([cout], opts),
                }
            }
            LayerKind::BatchNorm { channels } => Layer::BatchNorm {
                weight: Tensor::ones([channels], opts),
                bias: Tensor::zeros([channels], opts),
                running_mean: Tensor::zeros([channels], opts),
                running_var: Tensor::ones([channels], opts),
                num_batches_tracked: Cell::new(0),
            },
            LayerKind::Relu => Layer::Relu,
            LayerKind::MaxPool => Layer::MaxPool,
            LayerKind::Dropout { p } => Layer::Dropout(p),
            LayerKind::Linear { fin, fout } => Layer::Linear {
                // normal_(0, 0.01), bias 0
                weight: Tensor::randn([fout, fin], opts) * 0.01,
                bias: Tensor::zeros([fout], opts),
            },
            LayerKind::AdaptiveAvgPool { .. } | LayerKind::Flatten => return None,
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        match self {
            Layer::Conv { weight, bias } => x.conv2d(weight, Some(bias), [1, 1], [1, 1], [1, 1], 1),
            Layer::BatchNorm {
                weight,
                bias,
                running_mean,
                running_var,
                num_batches_tracked,
            } => {
                if train {
                    num_batches_tracked.set(num_batches_tracked.get() + 1);
                }
                Tensor::batch_norm(
                    x,
                    Some(weight),
                    Some(bias),
                    Some(running_mean),
                    Some(running_var),
                    train,
                    BN_MOMENTUM,
                    BN_EPS,
                    true,
                )
            }
            Layer::Relu => x.relu(),
            Layer::MaxPool => x.max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false),
            Layer::Dropout(p) => x.dropout(*p, train),
            Layer::Linear { weight, bias } => x.linear(weight, Some(bias)),
        }
    }

    /// (suffix, tensor, is a learnable parameter)
    fn tensors(&self) -> Vec<(&'static str, &Tensor, bool)> {
        layer_tensors!(self)
    }

    fn tensors_mut(&mut self) -> Vec<(&'static str, &mut Tensor, bool)> {
        layer_tensors!(self)
    }
}

/// A run of named layers (`features.*` or `classifier.*`).
pub struct Sequential {
    pub layers: Vec<(String, Layer)>,
}

impl Sequential {
    fn build(specs: &[LayerSpec]) -> Self {
        let layers = specs
            .iter()
            .filter_map(|s| Layer::init(&s.kind).map(|l| (s.name.clone(), l)))
            .collect();
        Sequential { layers }
    }

    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let mut x = x.shallow_clone();
        for (_, layer) in &self.layers {
            x = layer.forward(&x, train);
        }
        x
    }

    /// Runs the layers from index `n` on.
    pub fn forward_from(&self, x: &Tensor, n: usize, train: bool) -> Tensor {
        let mut x = x.shallow_clone();
        for (_, layer) in self.layers.iter().skip(n) {
            x = layer.forward(&x, train);
        }
        x
    }

    /// Runs only the first `n` layers (n counts every module, as torchvision's index does).
    pub fn forward_prefix(&self, x: &Tensor, n: usize, train: bool) -> Tensor {
        let mut x = x.shallow_clone();
        for (_, layer) in self.layers.iter().take(n) {
            x = layer.forward(&x, train);
        }
        x
    }
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
    /// eval/predict: the fused inference form of these weights
    /// (`InferencePlan`), which `Preprocess::forward` runs instead when set.
    pub inference: Option<crate::infer::InferencePlan>,
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
        let head = spec.head_layers();
        let classifier_specs: Vec<LayerSpec> = head
            .into_iter()
            .filter(|l| l.name.starts_with("classifier"))
            .collect();
        let mut model = Vgg {
            spec,
            features: Sequential::build(&spec.feature_layers()),
            pool_size: spec.head.pool_size(),
            classifier: Sequential::build(&classifier_specs),
            frozen_prefix: 0,
            inference: None,
        };
        model.to_device(device);
        model
    }

    pub fn device(&self) -> Device {
        self.entries()[0].tensor.device()
    }

    /// The head: adaptive pooling, flatten, classifier. `flatten(1, -1)`
    /// keeps the batch dimension symbolic when traced.
    pub fn head_forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let x = x
            .adaptive_avg_pool2d([self.pool_size, self.pool_size])
            .flatten(1, -1);
        self.classifier.forward_t(&x, train)
    }

    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let frozen = self.frozen_prefix.min(self.features.layers.len());
        let f = if train && frozen > 0 {
            let head = self.features.forward_prefix(x, frozen, false);
            self.features.forward_from(&head, frozen, true)
        } else {
            self.features.forward_t(x, train)
        };
        self.head_forward_t(&f, train)
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
        self.frozen_prefix = n.min(self.features.layers.len());
        for (_, layer) in self.features.layers.iter_mut().take(n) {
            for (_, tensor, _) in layer.tensors_mut() {
                *tensor = tensor.detach().set_requires_grad(false);
            }
        }
    }

    /// Moves the trainable parameters into one flat buffer, each parameter
    /// becoming a view of it (a leaf that requires grad), for the fused
    /// optimizer. With `channels_last`, convolution weights are stored NHWC.
    /// Returns the buffer; the parameters' values are unchanged.
    pub fn flatten_trainable(&mut self, channels_last: bool) -> Tensor {
        let device = self.device();
        let mut total = 0;
        for section in [&self.features, &self.classifier] {
            for (_, layer) in &section.layers {
                for (_, t, is_param) in layer.tensors() {
                    if is_param && t.requires_grad() {
                        total += t.numel() as i64;
                    }
                }
            }
        }
        let flat = Tensor::zeros([total], (Kind::Float, device));
        let mut offset = 0;
        tch::no_grad(|| {
            for section in [&mut self.features, &mut self.classifier] {
                for (_, layer) in &mut section.layers {
                    for (_, t, is_param) in layer.tensors_mut() {
                        if !(is_param && t.requires_grad()) {
                            continue;
                        }
                        let n = t.numel() as i64;
                        let size = t.size();
                        let seg = flat.narrow(0, offset, n);
                        let view = if channels_last && size.len() == 4 {
                            let mut nhwc = seg.view([size[0], size[2], size[3], size[1]]);
                            nhwc.copy_(&t.permute([0, 2, 3, 1]));
                            nhwc.permute([0, 3, 1, 2])
                        } else {
                            let mut v = seg.view(size.as_slice());
                            v.copy_(t);
                            v
                        };
                        *t = view.detach().set_requires_grad(true);
                        offset += n;
                    }
                }
            }
        });
        flat
    }

    /// Convolution weights in NHWC strides (cuDNN then runs channels-last).
    pub fn to_channels_last(&mut self) {
        self.map_tensors(|_, t| crate::amp::to_channels_last(t));
    }

    /// Detaches every parameter from autograd (export and tracing need
    /// constants, not leaves that require grad).
    pub fn into_inference(mut self) -> Vgg {
        for section in [&mut self.features, &mut self.classifier] {
            for (_, layer) in &mut section.layers {
                for (_, tensor, _) in layer.tensors_mut() {
                    *tensor = tensor.detach().set_requires_grad(false);
                }
            }
        }
        self
    }

    /// Replaces the last linear layer (`classifier.6`, `classifier.3` or
    /// `classifier`) by a new one with `classes` outputs and torchvision's
    /// init (normal(0, 0.01), bias 0), on the model's device.
    pub fn replace_last_linear(&mut self, classes: i64) {
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
    pub fn load_state_dict(&mut self, source: &str, dict: &BTreeMap<String, Tensor>) -> Result<()> {
        check_state_dict(&self.spec, source, dict)?;
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

/// Checks a state dict's names and shapes against a model spec; one error
/// lists every problem.
pub fn check_state_dict(
    spec: &ModelSpec,
    source: &str,
    dict: &BTreeMap<String, Tensor>,
) -> Result<()> {
    let expected = spec.state_dict_shapes();
    let expected_names: BTreeSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    let mut missing = Vec::new();
    let mut misshaped = Vec::new();
    for (name, shape) in &expected {
        match dict.get(name) {
            None if name.ends_with(".num_batches_tracked") => {}
            None => missing.push(name.clone()),
            Some(t) if name.ends_with(".num_batches_tracked") => {
                if t.numel() != 1 {
                    misshaped.push(format!("{name} {:?} (expected a scalar)", t.size()));
                }
            }
            Some(t) if &t.size() != shape => {
                misshaped.push(format!("{name} {:?} (expected {:?})", t.size(), shape))
            }
            Some(_) => {}
        }
    }
    let unexpected: Vec<&String> = dict
        .keys()
        .filter(|k| !expected_names.contains(k.as_str()))
        .collect();
    if missing.is_empty() && misshaped.is_empty() && unexpected.is_empty() {
        return Ok(());
    }
    let has_bn_keys = dict.keys().any(|k| k.ends_with(".running_mean"));
    let model = spec.model_name();
    if has_bn_keys != spec.bn && dict.keys().any(|k| k.starts_with("features.")) {
        let (theirs, ours) = if has_bn_keys {
            ("with", "without")
        } else {
            ("without", "with")
        };
        bail!(
            "{source}: weights are for a model {theirs} BatchNorm, but the model is {model} ({ours} BatchNorm); {}",
            if has_bn_keys { "add --bn" } else { "drop --bn" }
        );
    }
    let mut parts = Vec::new();
    let list = |v: Vec<String>| -> String {
        let n = v.len();
        let mut shown: Vec<String> = v.into_iter().take(8).collect();
        if n > 8 {
            shown.push(format!("... ({n} in all)"));
        }
        shown.join(", ")
    };
    if !missing.is_empty() {
        parts.push(format!("missing keys: {}", list(missing)));
    }
    if !unexpected.is_empty() {
        parts.push(format!(
            "unexpected keys: {}",
            list(unexpected.into_iter().cloned().collect())
        ));
    }
    if !misshaped.is_empty() {
        parts.push(format!("wrong shapes: {}", list(misshaped)));
    }
    bail!(
        "{source}: state dict does not match {model} with the {} head and {} classes: {}",
        spec.head.name(),
        spec.classes,
        parts.join("; ")
    )
}

/// A copy of the model with every BatchNorm folded into the convolution before
/// it (inference only): w' = w * g / sqrt(var + eps), b' = (b - mean) * g / sqrt(var + eps) + beta.
pub fn fold_bn(model: &Vgg) -> Vgg {
    let mut layers = Vec::new();
    let mut it = model.features.layers.iter().peekable();
    while let Some((name, layer)) = it.next() {
        if let (
            Layer::Conv { weight, bias },
            Some((
                _,
                Layer::BatchNorm {
                    weight: g,
                    bias: beta,
                    running_mean,
                    running_var,
                    ..
                },
            )),
        ) = (layer, it.peek())
        {
            let scale = tch::no_grad(|| g / (running_var + BN_EPS).sqrt());
            let w = tch::no_grad(|| weight * scale.view([-1, 1, 1, 1]));
            let b = tch::no_grad(|| (bias - running_mean) * &scale + beta);
            layers.push((name.clone(), Layer::Conv { weight: w, bias: b }));
            it.next();
        } else {
            layers.push((name.clone(), layer.shallow()));
        }
    }
    let mut spec = model.spec;
    spec.bn = false;
    Vgg {
        spec,
        features: Sequential { layers },
        pool_size: model.pool_size,
        classifier: Sequential {
            layers: model
                .classifier
                .layers
                .iter()
                .map(|(n, l)| (n.clone(), l.shallow()))
                .collect(),
        },
        frozen_prefix: 0,
        inference: None,
    }
}
