//! The modules a VGG is made of (convolution, BatchNorm, ReLU, pooling,
//! dropout, linear), each owning its tensors under torchvision's suffixes,
//! built with torchvision's initialization, and runs of them (`Sequential`).

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;

use tch::{Device, Kind, Tensor};

use super::batch_norm::{BN_EPS, BN_MOMENTUM, SumAcross, batch_norm_moving, sync_batch_norm};
use super::spec::{LayerKind, LayerSpec};
use crate::shim::step::{ConvOptions, FusedBn, conv3x3};

/// How [`Layer::init`] fills a tensor.
#[derive(Clone, Copy)]
enum Fill {
    Normal(f64),
    Constant(f64),
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
    /// libtorch's global generator), or, `blank` on a device, with
    /// uninitialized tensors there, for a state dict to replace every one.
    pub(super) fn init(kind: &LayerKind, blank: Option<Device>) -> Option<Layer> {
        let opts = (Kind::Float, blank.unwrap_or(Device::Cpu));
        // A tensor of `shape`: normal with this std, or this constant.
        let make = |shape: &[i64], fill: Fill| match (blank, fill) {
            (Some(_), _) => Tensor::empty(shape, opts),
            (None, Fill::Normal(std)) => Tensor::randn(shape, opts) * std,
            (None, Fill::Constant(v)) => Tensor::full(shape, v, opts),
        };
        Some(match *kind {
            LayerKind::Conv { cin, cout } => Layer::Conv {
                // kaiming_normal_(mode="fan_out", nonlinearity="relu")
                weight: make(
                    &[cout, cin, 3, 3],
                    Fill::Normal((2.0 / (cout * 9) as f64).sqrt()),
                ),
                bias: make(&[cout], Fill::Constant(0.0)),
            },
            LayerKind::BatchNorm { channels } => Layer::BatchNorm {
                weight: make(&[channels], Fill::Constant(1.0)),
                bias: make(&[channels], Fill::Constant(0.0)),
                running_mean: make(&[channels], Fill::Constant(0.0)),
                running_var: make(&[channels], Fill::Constant(1.0)),
                num_batches_tracked: Cell::new(0),
            },
            LayerKind::Relu => Layer::Relu,
            LayerKind::MaxPool => Layer::MaxPool,
            LayerKind::Dropout { p } => Layer::Dropout(p),
            LayerKind::Linear { fin, fout } => Layer::Linear {
                // normal_(0, 0.01), bias 0
                weight: make(&[fout, fin], Fill::Normal(0.01)),
                bias: make(&[fout], Fill::Constant(0.0)),
            },
            LayerKind::AdaptiveAvgPool { .. } | LayerKind::Flatten => return None,
        })
    }

    /// The layer on `x`; `conv_bias` false runs a convolution without its
    /// bias (see [`Sequential::bias_free`]); in training, BatchNorm moves
    /// its running statistics by `momentum` (over the ranks with `sync`).
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        train: bool,
        (sync, momentum): (Option<&SumAcross>, f64),
        conv_bias: bool,
    ) -> Tensor {
        match self {
            Layer::Conv { weight, bias } => {
                let bias = conv_bias.then_some(bias);
                x.conv2d(weight, bias, [1, 1], [1, 1], [1, 1], 1)
            }
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
                let stats = [running_mean, running_var];
                if let (true, Some(sum)) = (train, sync) {
                    return sync_batch_norm(x, [weight, bias], stats, sum, momentum);
                }
                batch_norm_moving(x, [weight, bias], stats, train, momentum)
            }
            Layer::Relu => x.relu(),
            Layer::MaxPool => x.max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false),
            Layer::Dropout(p) => x.dropout(*p, train),
            Layer::Linear { weight, bias } => x.linear(weight, Some(bias)),
        }
    }

    /// (suffix, tensor, is a learnable parameter)
    pub(super) fn tensors(&self) -> Vec<(&'static str, &Tensor, bool)> {
        layer_tensors!(self)
    }

    pub(super) fn tensors_mut(&mut self) -> Vec<(&'static str, &mut Tensor, bool)> {
        layer_tensors!(self)
    }
}

/// The channels the first convolution's input is padded to by
/// [`Sequential::pad_input`].
pub const PAD_CHANNELS: i64 = 8;

/// A run of named layers (`features.*` or `classifier.*`).
pub struct Sequential {
    pub layers: Vec<(String, Layer)>,
    /// Set for SyncBatchNorm: BatchNorm's training statistics are taken
    /// across the ranks.
    pub sync: Option<SumAcross>,
    /// In training mode, a convolution followed by BatchNorm runs without
    /// its bias: BatchNorm subtracts the batch mean, so the bias cancels in
    /// its output and its gradient is zero. Set only while those biases
    /// are zero (they then stay zero, and the running statistics are the
    /// same), see [`Sequential::conv_biases_before_bn_are_zero`].
    pub bias_free: bool,
    /// In training mode, a convolution followed by ReLU runs as one
    /// operation (`shim::step::conv3x3`: cuDNN's conv+bias+ReLU on CUDA,
    /// with its own backward); the plain ops if it fails.
    pub conv_relu: bool,
    /// With `conv_relu`, that operation's backward computes the ReLU's
    /// gradient and the bias's in one kernel of vggctl's own (fp16
    /// channels-last batches; elsewhere the plain ops).
    pub relu_bias_grad: bool,
    /// In training mode, every convolution runs as the shim's operation
    /// (`shim::step::conv3x3`), whose backward computes the weight's (and
    /// bias's) gradient on a second CUDA stream beside the input's.
    pub two_streams: bool,
    /// In training mode, BatchNorm followed by ReLU (and no max-pool that
    /// `bn_relu_pool` fuses) runs as this one operation (`FusedBn::Cudnn`:
    /// cuDNN's BatchNorm with its activation, one pass each way; or
    /// `FusedBn::Own`: vggctl's kernels; not with SyncBatchNorm); the plain
    /// ops if it fails.
    pub bn_relu: Option<FusedBn>,
    /// In training mode, BatchNorm followed by ReLU and a max-pool runs as
    /// one operation (`FusedBn::OwnPool`: kernels of the shim's
    /// own, fp16 channels-last, 1-byte pool indices; not with
    /// SyncBatchNorm); the plain ops if it fails.
    pub bn_relu_pool: bool,
    /// In training mode, how far each BatchNorm moves its running
    /// statistics toward the batch's (BatchNorm2d's `momentum`).
    pub bn_momentum: f64,
    /// In training mode, the first convolution's input channels (3) and its
    /// weight's are zero-padded to [`PAD_CHANNELS`], in this dtype:
    /// cuDNN's tensor-core kernels want channels in multiples of 8. The
    /// padded channels add zeros, so the output is the same, and the
    /// weight's gradient is the padded gradient's first channels.
    pub pad_input: Option<Kind>,
    /// In training mode, layers computing with other tensors than their
    /// own, by index: the compute copy's views of their weights (see
    /// `Vgg::flatten_trainable`).
    pub stand_ins: BTreeMap<usize, Layer>,
    /// Set when a fused operation failed (after the start-up check passed):
    /// from then on the plain ops run without trying it again.
    fusion_failed: Cell<bool>,
    /// That failure, until someone takes it to report it.
    fusion_failure: RefCell<Option<String>>,
}

impl Sequential {
    /// The layers of `specs`, initialized as torchvision does, or `blank`
    /// (see [`Layer::init`]).
    pub(super) fn build(specs: &[LayerSpec], blank: Option<Device>) -> Self {
        Self::new(
            specs
                .iter()
                .filter_map(|s| Layer::init(&s.kind, blank).map(|l| (s.name.clone(), l)))
                .collect(),
        )
    }

    /// The layers, run plainly.
    pub fn new(layers: Vec<(String, Layer)>) -> Self {
        Sequential {
            layers,
            sync: None,
            bias_free: false,
            conv_relu: false,
            relu_bias_grad: false,
            two_streams: false,
            bn_relu: None,
            bn_relu_pool: false,
            bn_momentum: BN_MOMENTUM,
            pad_input: None,
            stand_ins: BTreeMap::new(),
            fusion_failed: Cell::new(false),
            fusion_failure: RefCell::new(None),
        }
    }

    /// Runs the layers `range` (indices count every module, as
    /// torchvision's do).
    fn run(&self, x: &Tensor, range: std::ops::Range<usize>, train: bool) -> Tensor {
        let mut x = x.shallow_clone();
        let mut i = range.start;
        while i < range.end {
            let mut layer = match (train, self.stand_ins.get(&i)) {
                (true, Some(stand_in)) => stand_in,
                _ => &self.layers[i].1,
            };
            let padded = self.padded(i, layer, &x, train);
            if let Some((conv, input)) = &padded {
                (layer, x) = (conv, input.shallow_clone());
            }
            if let Some((y, ran)) = self.with_relu(i, layer, &x, &range, train) {
                x = y;
                i += ran;
                continue;
            }
            let bias = !(self.bias_free && train && self.bn_follows(i));
            x = match self.on_two_streams(layer, &x, train, bias) {
                Some(y) => y,
                None => layer.forward(&x, train, (self.sync.as_ref(), self.bn_momentum), bias),
            };
            i += 1;
        }
        x
    }

    /// Layer `i` (`layer`, or its stand-in) as a convolution on
    /// [`PAD_CHANNELS`] input channels and `x` zero-padded to match, where
    /// `pad_input` asks for that and the layer is the first convolution.
    fn padded(&self, i: usize, layer: &Layer, x: &Tensor, train: bool) -> Option<(Layer, Tensor)> {
        let kind = self.pad_input.filter(|_| train && i == 0)?;
        let Layer::Conv { weight, bias } = layer else {
            return None;
        };
        let extra = PAD_CHANNELS - weight.size()[1];
        if extra <= 0 {
            return None;
        }
        // Zeros after the channels; constant_pad_nd keeps the layout.
        let pad = [0, 0, 0, 0, 0, extra];
        let conv = Layer::Conv {
            weight: weight.to_kind(kind).constant_pad_nd(pad),
            bias: bias.shallow_clone(),
        };
        Some((conv, x.to_kind(kind).constant_pad_nd(pad)))
    }

    /// Layer `i` (`layer`, or its stand-in) and the ReLU after it (and for
    /// BatchNorm, the max-pool after that where `bn_relu_pool` asks), all in
    /// `range`, run on `x` as one operation, where the fused step does that
    /// and the operation runs: its output and how many layers it ran. None
    /// leaves them to the plain ops.
    fn with_relu(
        &self,
        i: usize,
        layer: &Layer,
        x: &Tensor,
        range: &std::ops::Range<usize>,
        train: bool,
    ) -> Option<(Tensor, usize)> {
        let followed_by =
            |k: usize, what: fn(&Layer) -> bool| i + k < range.end && what(&self.layers[i + k].1);
        if !(train && followed_by(1, |l| matches!(l, Layer::Relu))) || self.fusion_failed.get() {
            return None;
        }
        let pool = self.bn_relu_pool && followed_by(2, |l| matches!(l, Layer::MaxPool));
        let bn_op = if pool {
            Some(FusedBn::OwnPool)
        } else {
            self.bn_relu
        };
        let (fused, ran) = match layer {
            Layer::Conv { weight, bias } if self.conv_relu => {
                let opts = ConvOptions {
                    relu: true,
                    two_streams: self.two_streams,
                    fused_grad: self.relu_bias_grad,
                };
                (conv3x3(x, weight, Some(bias), opts), 2)
            }
            Layer::BatchNorm {
                weight,
                bias,
                running_mean,
                running_var,
                num_batches_tracked,
            } if self.sync.is_none() => {
                let stats = [running_mean, running_var];
                let y = bn_op?.run(x, [weight, bias], stats, self.bn_momentum, BN_EPS);
                if y.is_ok() {
                    num_batches_tracked.set(num_batches_tracked.get() + 1);
                }
                (y, if pool { 3 } else { 2 })
            }
            _ => return None,
        };
        self.latched(fused).map(|y| (y, ran))
    }

    /// A convolution `layer` (with its bias if `bias`) on `x` as the shim's
    /// operation with its gradients on two streams, where `two_streams`
    /// asks for it; None leaves it to the plain op.
    fn on_two_streams(&self, layer: &Layer, x: &Tensor, train: bool, bias: bool) -> Option<Tensor> {
        let Layer::Conv { weight, bias: b } = layer else {
            return None;
        };
        if !(train && self.two_streams) || self.fusion_failed.get() {
            return None;
        }
        let b = bias.then_some(b);
        let opts = ConvOptions {
            two_streams: true,
            ..ConvOptions::default()
        };
        self.latched(conv3x3(x, weight, b, opts))
    }

    /// A fused operation's result; a failure is latched (the plain ops run
    /// from then on) and kept for `take_fusion_failure`.
    fn latched(&self, fused: anyhow::Result<Tensor>) -> Option<Tensor> {
        fused
            .inspect_err(|e| {
                self.fusion_failed.set(true);
                *self.fusion_failure.borrow_mut() = Some(format!("{e:#}"));
            })
            .ok()
    }

    /// Why a fused operation failed, once: the layers then run the plain
    /// ops (for the trainer to warn; the model does not print).
    pub fn take_fusion_failure(&self) -> Option<String> {
        self.fusion_failure.borrow_mut().take()
    }

    /// Whether layer `i` is a convolution whose output goes to BatchNorm.
    fn bn_follows(&self, i: usize) -> bool {
        matches!(self.layers[i].1, Layer::Conv { .. })
            && matches!(self.layers.get(i + 1), Some((_, Layer::BatchNorm { .. })))
    }

    /// Whether every convolution from layer `from` on that is followed by
    /// BatchNorm has an all-zero bias (torchvision initializes them so;
    /// pretrained weights are not).
    pub fn conv_biases_before_bn_are_zero(&self, from: usize) -> bool {
        (from..self.layers.len())
            .filter(|&i| self.bn_follows(i))
            .all(|i| match &self.layers[i].1 {
                Layer::Conv { bias, .. } => bias.abs().max().double_value(&[]) == 0.0,
                _ => true,
            })
    }

    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        self.run(x, 0..self.layers.len(), train)
    }

    /// Runs the layers from index `n` on.
    pub fn forward_from(&self, x: &Tensor, n: usize, train: bool) -> Tensor {
        self.run(x, n.min(self.layers.len())..self.layers.len(), train)
    }

    /// Runs only the first `n` layers (n counts every module, as torchvision's index does).
    pub fn forward_prefix(&self, x: &Tensor, n: usize, train: bool) -> Tensor {
        self.run(x, 0..n.min(self.layers.len()), train)
    }

    /// Runs layer `i` alone.
    pub fn forward_one(&self, x: &Tensor, i: usize, train: bool) -> Tensor {
        self.run(x, i..i + 1, train)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The padded first convolution: its weight and input gain zero
    /// channels up to `PAD_CHANNELS`, in the asked dtype and the input's
    /// layout; later layers, evaluation and wide inputs are left alone.
    #[test]
    fn the_first_convolution_is_padded_with_zero_channels() {
        let _seeded = crate::seeded();
        tch::manual_seed(2);
        let opts = (Kind::Float, Device::Cpu);
        let conv = Layer::Conv {
            weight: Tensor::randn([4, 3, 3, 3], opts),
            bias: Tensor::randn([4], opts),
        };
        let mut seq = Sequential::new(vec![("0".into(), conv), ("1".into(), Layer::Relu)]);
        seq.pad_input = Some(Kind::BFloat16);
        let x = super::super::to_channels_last(&Tensor::randn([2, 3, 5, 5], opts));
        let Some((Layer::Conv { weight, .. }, px)) = seq.padded(0, &seq.layers[0].1, &x, true)
        else {
            panic!("not padded");
        };
        let Layer::Conv { weight: w, .. } = &seq.layers[0].1 else {
            unreachable!()
        };
        assert_eq!(weight.size(), [4, PAD_CHANNELS, 3, 3]);
        assert_eq!(px.size(), [2, PAD_CHANNELS, 5, 5]);
        assert_eq!((weight.kind(), px.kind()), (Kind::BFloat16, Kind::BFloat16));
        assert!(super::super::is_channels_last(&px));
        assert!(weight.narrow(1, 0, 3).equal(&w.to_kind(Kind::BFloat16)));
        assert!(px.narrow(1, 0, 3).equal(&x.to_kind(Kind::BFloat16)));
        assert_eq!(
            weight
                .narrow(1, 3, 5)
                .abs()
                .sum(Kind::Float)
                .double_value(&[]),
            0.0
        );
        assert_eq!(
            px.narrow(1, 3, 5).abs().sum(Kind::Float).double_value(&[]),
            0.0
        );
        assert!(
            seq.padded(0, &seq.layers[0].1, &x, false).is_none(),
            "evaluation"
        );
        assert!(
            seq.padded(1, &seq.layers[1].1, &x, true).is_none(),
            "not a convolution"
        );
        let wide = Tensor::randn([2, PAD_CHANNELS, 5, 5], opts);
        let conv = Layer::Conv {
            weight: Tensor::randn([4, PAD_CHANNELS, 3, 3], opts),
            bias: Tensor::randn([4], opts),
        };
        assert!(
            seq.padded(0, &conv, &wide, true).is_none(),
            "already 8 channels"
        );
    }
}
