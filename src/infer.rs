//! The inference form of a model (eval and predict on CUDA): what PyTorch's
//! `torch.jit.freeze` + `optimize_for_inference` do for a VGG, without
//! TorchScript.
//! - BatchNorm folded into the convolution before it (`model::fold_bn`);
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

use crate::model::{Layer, Vgg, fold_bn};

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
                        crate::amp::to_channels_last(&t)
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
                x = crate::amp::to_channels_last(&x);
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
}
