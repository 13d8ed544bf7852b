//! How eval and predict run a model, and its inference form (eval and
//! predict on CUDA): what PyTorch's `torch.jit.freeze` +
//! `optimize_for_inference` do for a VGG, without TorchScript.
//! - BatchNorm folded into the convolution before it ([`fold_bn`], which
//!   export's `--fold-bn` uses too);
//! - each convolution fused with its bias and the ReLU after it (cuDNN's
//!   conv+bias+ReLU, `cudnn_convolution_relu`), each linear layer with its
//!   bias and ReLU (cuBLASLt's epilogue, `_addmm_activation`): the eager
//!   model writes every activation, then reads and writes it again for the
//!   bias and once more for the ReLU;
//! - weights stored once in the compute dtype and layout, where autocast
//!   would cast them again for every batch.
//!
//! Dropout is the identity in evaluation and is left out. Where a fused
//! kernel is unavailable (the CPU, a cuDNN without the fusion engine) the
//! same weights run through the plain ops, decided once at the first batch.

use std::cell::Cell;

use tch::{Device, Kind, Tensor};

use crate::model::{BN_EPS, Layer, Sequential, Vgg, to_channels_last};
use crate::numerics::Numerics;

/// What evaluation runs: float32 logits of a preprocessed fp32 NCHW batch.
pub trait Logits {
    fn logits(&self, x: &Tensor) -> Tensor;
}

/// A model in evaluation mode as trained, layer by layer, in a run's
/// numerics (training's evaluation, `--layerwise`, the CPU).
pub struct Layerwise<'a> {
    pub model: &'a Vgg,
    pub numerics: &'a Numerics,
}

impl Logits for Layerwise<'_> {
    fn logits(&self, x: &Tensor) -> Tensor {
        self.numerics.forward(self.model, x, false)
    }
}

/// What eval and predict hold: the model as trained, or its inference form
/// (which owns the only copy of the weights it needs, so it cannot go
/// stale).
pub enum Inference {
    Layerwise { model: Box<Vgg>, numerics: Numerics },
    Plan(InferencePlan),
}

impl Inference {
    /// The inference form on CUDA unless `layerwise`; elsewhere the model
    /// itself, in `numerics`' layout.
    pub fn new(mut model: Vgg, numerics: Numerics, layerwise: bool) -> Inference {
        if numerics.device.is_cuda() && !layerwise {
            let kind = numerics.compute_kind();
            return Inference::Plan(InferencePlan::new(&model, kind, numerics.channels_last));
        }
        if numerics.channels_last {
            model.to_channels_last();
        }
        Inference::Layerwise {
            model: Box::new(model),
            numerics,
        }
    }

    /// What ran, for `ran_as`: the inference form and whether its fused
    /// kernels ran (known after the first batch), else nothing.
    pub fn form(&self) -> Option<&'static str> {
        match self {
            Inference::Layerwise { .. } => None,
            Inference::Plan(plan) => match plan.fused() {
                Some(true) => Some("inference form, fused conv+ReLU"),
                Some(false) => Some("inference form, plain ops"),
                None => None,
            },
        }
    }
}

impl Logits for Inference {
    fn logits(&self, x: &Tensor) -> Tensor {
        match self {
            Inference::Layerwise { model, numerics } => numerics.forward(model, x, false),
            Inference::Plan(plan) => plan.forward(x),
        }
    }
}

enum Op {
    /// 3x3 convolution, stride 1, padding 1; `relu` when a ReLU follows.
    Conv {
        w: Tensor,
        b: Tensor,
        relu: bool,
    },
    Linear {
        w: Tensor,
        b: Tensor,
        relu: bool,
    },
    Relu,
    MaxPool,
}

pub struct InferencePlan {
    features: Vec<Op>,
    pool_size: i64,
    classifier: Vec<Op>,
    kind: Kind,
    channels_last: bool,
    /// Fused kernels: unknown until the first batch, then whether they ran.
    fused: Cell<Option<bool>>,
}

impl InferencePlan {
    /// `kind`: the compute dtype (Float, Half or BFloat16).
    pub fn new(model: &Vgg, kind: Kind, channels_last: bool) -> Self {
        let folded = fold_bn(model);
        let ops = |layers: &[(String, Layer)]| {
            let mut ops: Vec<Op> = Vec::new();
            for (_, layer) in layers {
                let cast = |t: &Tensor| {
                    let t = t.detach().to_kind(kind);
                    if channels_last {
                        to_channels_last(&t)
                    } else {
                        t.contiguous()
                    }
                };
                match layer {
                    Layer::Conv { weight, bias } => ops.push(Op::Conv {
                        w: cast(weight),
                        b: cast(bias),
                        relu: false,
                    }),
                    Layer::Linear { weight, bias } => ops.push(Op::Linear {
                        w: cast(weight),
                        b: cast(bias),
                        relu: false,
                    }),
                    Layer::Relu => match ops.last_mut() {
                        Some(Op::Conv { relu, .. } | Op::Linear { relu, .. }) if !*relu => {
                            *relu = true
                        }
                        _ => ops.push(Op::Relu),
                    },
                    Layer::MaxPool => ops.push(Op::MaxPool),
                    Layer::Dropout(_) => {}
                    // fold_bn leaves none: every VGG BatchNorm follows a convolution.
                    Layer::BatchNorm { .. } => unreachable!("BatchNorm after folding"),
                }
            }
            ops
        };
        InferencePlan {
            features: ops(&folded.features.layers),
            pool_size: model.pool_size,
            classifier: ops(&folded.classifier.layers),
            kind,
            channels_last,
            fused: Cell::new(None),
        }
    }

    /// Whether the fused kernels run (None before the first batch).
    pub fn fused(&self) -> Option<bool> {
        self.fused.get()
    }

    /// Float32 logits of an fp32 batch (NCHW or NHWC strides).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        tch::no_grad(|| {
            let mut x = x.to_kind(self.kind);
            if self.channels_last {
                x = to_channels_last(&x);
            }
            let fuse = x.device() != Device::Cpu && self.fused.get() != Some(false);
            let out = if fuse {
                match self.run(&x, true) {
                    Ok(out) => {
                        self.fused.set(Some(true));
                        out
                    }
                    Err(_) => {
                        self.fused.set(Some(false));
                        self.run(&x, false).expect("plain ops")
                    }
                }
            } else {
                if x.device() == Device::Cpu {
                    self.fused.set(Some(false));
                }
                self.run(&x, false).expect("plain ops")
            };
            out.to_kind(Kind::Float)
        })
    }

    fn run(&self, x: &Tensor, fused: bool) -> Result<Tensor, tch::TchError> {
        let mut x = x.shallow_clone();
        for op in &self.features {
            x = apply(op, &x, fused)?;
        }
        x = x
            .adaptive_avg_pool2d([self.pool_size, self.pool_size])
            .flatten(1, -1);
        for op in &self.classifier {
            x = apply(op, &x, fused)?;
        }
        Ok(x)
    }
}

fn apply(op: &Op, x: &Tensor, fused: bool) -> Result<Tensor, tch::TchError> {
    Ok(match op {
        Op::Conv { w, b, relu: true } if fused => {
            x.f_cudnn_convolution_relu(w, Some(b), [1, 1], [1, 1], [1, 1], 1)?
        }
        Op::Conv { w, b, relu } => {
            let mut y = x.f_conv2d(w, Some(b), [1, 1], [1, 1], [1, 1], 1)?;
            if *relu { y.relu_() } else { y }
        }
        Op::Linear { w, b, relu: true } if fused => {
            b.f_internal_addmm_activation(x, &w.tr(), false)?
        }
        Op::Linear { w, b, relu } => {
            let mut y = x.f_linear(w, Some(b))?;
            if *relu { y.relu_() } else { y }
        }
        Op::Relu => x.relu(),
        Op::MaxPool => x.f_max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false)?,
    })
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
    let classifier = model
        .classifier
        .layers
        .iter()
        .map(|(n, l)| (n.clone(), l.shallow()))
        .collect();
    let mut folded = Vgg::of(
        spec,
        Sequential::new(layers),
        model.pool_size,
        Sequential::new(classifier),
    );
    folded.tail = model.tail;
    folded.pool = model.pool;
    folded
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Arch, Head, ModelSpec};

    /// The plan (folded BatchNorm, ReLU merged into the layer before it,
    /// dropout left out) computes the eval-mode model: fp32 on the CPU
    /// within 1e-5 of the largest logit, for BN and plain models, NCHW and
    /// NHWC; BatchNorm statistics are made non-trivial first.
    #[test]
    fn plan_computes_the_eval_mode_model() {
        let _seeded = crate::seeded();
        tch::manual_seed(3);
        for bn in [false, true] {
            let mut model = Vgg::new(
                ModelSpec::new(Arch::Vgg11, bn, Head::Cifar, 10),
                Device::Cpu,
            );
            for (_, layer) in &mut model.features.layers {
                if let Layer::BatchNorm {
                    weight,
                    bias,
                    running_mean,
                    running_var,
                    ..
                } = layer
                {
                    tch::no_grad(|| {
                        let n = weight.size()[0];
                        weight.copy_(&(Tensor::rand([n], (Kind::Float, Device::Cpu)) + 0.5));
                        bias.copy_(&(Tensor::randn([n], (Kind::Float, Device::Cpu)) * 0.1));
                        running_mean.copy_(&(Tensor::randn([n], (Kind::Float, Device::Cpu)) * 0.1));
                        running_var.copy_(&(Tensor::rand([n], (Kind::Float, Device::Cpu)) + 0.5));
                    });
                }
            }
            let x = Tensor::randn([4, 3, 32, 32], (Kind::Float, Device::Cpu));
            let want = tch::no_grad(|| model.forward_t(&x, false));
            let scale = want.abs().max().double_value(&[]);
            for channels_last in [false, true] {
                let plan = InferencePlan::new(&model, Kind::Float, channels_last);
                // 8 convolutions with their ReLUs and 5 pools; the CIFAR head's 2
                // linear layers, the first with its ReLU, dropout left out.
                assert_eq!((plan.features.len(), plan.classifier.len()), (13, 2));
                let got = plan.forward(&x);
                let err = (&got - &want).abs().max().double_value(&[]) / scale;
                assert!(err < 1e-5, "bn {bn}, channels_last {channels_last}: {err}");
                assert_eq!(plan.fused(), Some(false), "the CPU runs the plain ops");
            }
        }
    }

    /// eval and predict on the CPU run the model as trained (in the
    /// decided layout), and say nothing of an inference form.
    #[test]
    fn the_cpu_runs_the_model_layerwise() {
        let _seeded = crate::seeded();
        tch::manual_seed(5);
        let spec = ModelSpec::new(Arch::Vgg11, true, Head::Cifar, 10);
        let model = Vgg::new(spec, Device::Cpu);
        let x = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
        let want = tch::no_grad(|| model.forward_t(&x, false));
        let numerics = Numerics {
            channels_last: true,
            ..Numerics::plain_cpu()
        };
        let net = Inference::new(model, numerics, false);
        assert!(matches!(net, Inference::Layerwise { .. }));
        let got = tch::no_grad(|| net.logits(&x));
        assert!((&got - &want).abs().max().double_value(&[]) < 1e-4);
        assert_eq!(net.form(), None);
    }
}
