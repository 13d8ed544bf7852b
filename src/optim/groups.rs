//! torchvision's parameter groups by weight decay (`--norm-weight-decay`,
//! `--bias-weight-decay`): which decay each parameter takes, and the fused
//! update's one kernel call per group over runs of the flat buffers.

use anyhow::Result;
use tch::Tensor;

use super::rules::apply_update;
use super::{Optimizer, OptimizerConfig, OptimizerKind, Slot};
use crate::shim;

impl OptimizerConfig {
    /// The weight decay of the parameter `name` (a state-dict name; `norm`:
    /// a normalization layer's), grouped as torchvision's reference
    /// `set_weight_decay` groups them: a bias takes `bias_weight_decay`
    /// where given, a norm layer's parameter `norm_weight_decay` where
    /// given, every other `weight_decay`.
    pub fn decay_of(&self, name: &str, norm: bool) -> f64 {
        let bias = name == "bias" || name.ends_with(".bias");
        match (self.bias_weight_decay, self.norm_weight_decay) {
            (Some(decay), _) if bias => decay,
            (_, Some(decay)) if norm => decay,
            _ => self.weight_decay,
        }
    }
}

/// The parameters that share one weight decay, as runs of the flat buffers
/// (`(offset, length)` in elements): one call of the fused kernel, as
/// PyTorch makes one per parameter group.
pub(super) struct DecayGroup {
    decay: f64,
    runs: Vec<(i64, i64)>,
}

/// The slots (taken in the flat buffers' `order`) grouped by weight decay,
/// neighbours in the buffers joined into one run.
pub(super) fn decay_groups(slots: &[Slot], order: &[usize]) -> Vec<DecayGroup> {
    let mut groups: Vec<DecayGroup> = Vec::new();
    for s in order.iter().map(|&i| &slots[i]) {
        let k = match groups.iter().position(|g| g.decay == s.decay) {
            Some(k) => k,
            None => {
                groups.push(DecayGroup {
                    decay: s.decay,
                    runs: Vec::new(),
                });
                groups.len() - 1
            }
        };
        match groups[k].runs.last_mut() {
            Some((start, len)) if *start + *len == s.offset => *len += s.numel,
            _ => groups[k].runs.push((s.offset, s.numel)),
        }
    }
    groups
}

impl Optimizer {
    /// Gives each parameter the weight decay `decay` returns for its name
    /// (by default every one has the configuration's `weight_decay`).
    pub fn decay_by(&mut self, decay: impl Fn(&str) -> f64) {
        for s in &mut self.slots {
            s.decay = decay(&s.name);
        }
        self.groups = decay_groups(&self.slots, &self.buffer_order);
    }

    /// The fused kernel's update of one weight-decay group: its runs of
    /// the flat parameters, gradient `g` and state.
    pub(super) fn update_group(
        &self,
        group: &DecayGroup,
        flat: &Tensor,
        g: &Tensor,
        found_inf: Option<&Tensor>,
    ) -> Result<()> {
        let runs = |t: &Tensor| -> Vec<Tensor> {
            group
                .runs
                .iter()
                .map(|&(at, n)| t.narrow(0, at, n))
                .collect()
        };
        let (params, grads) = (runs(flat), runs(g));
        let cfg = &self.cfg;
        tch::no_grad(|| match cfg.kind {
            OptimizerKind::Sgd => {
                let momentum = match cfg.momentum != 0.0 {
                    true => runs(&self.buf1),
                    false => Vec::new(),
                };
                shim::fused_sgd(
                    &shim::Group {
                        params: &params,
                        grads: &grads,
                        state: [&momentum, &[], &[]],
                    },
                    &self.lr,
                    &shim::SgdHyper {
                        weight_decay: group.decay,
                        momentum: cfg.momentum,
                        nesterov: cfg.nesterov,
                    },
                    found_inf,
                )
            }
            // No fused kernel: `update_flat`.
            OptimizerKind::Rmsprop
            | OptimizerKind::Nadam
            | OptimizerKind::Radam
            | OptimizerKind::Adamax
            | OptimizerKind::Adagrad
            | OptimizerKind::Adadelta => Ok(()),
            OptimizerKind::Adam | OptimizerKind::Adamw => shim::fused_adam(
                &shim::Group {
                    params: &params,
                    grads: &grads,
                    state: [
                        &runs(&self.buf1),
                        &runs(&self.buf2),
                        // AMSGrad's (empty without).
                        &match self.buf3.numel() {
                            0 => Vec::new(),
                            _ => runs(&self.buf3),
                        },
                    ],
                },
                &self.step,
                &self.lr,
                &shim::AdamHyper {
                    beta1: cfg.betas.0,
                    beta2: cfg.betas.1,
                    weight_decay: group.decay,
                    eps: cfg.eps,
                    decoupled: cfg.kind == OptimizerKind::Adamw,
                },
                found_inf,
            ),
        })
    }

    /// RMSprop, NAdam or RAdam over the flat buffers, which libtorch has
    /// no fused kernel for: each weight-decay group's L2 term added to its
    /// runs of the gradient `g` (in place: the update consumes it), or its
    /// decoupled decay applied to its runs of the parameters, then the
    /// per-parameter arithmetic (`apply_update`) once over the whole
    /// buffers. A step with non-finite gradients (fp16's
    /// `found_inf` set) puts parameters and state back as they were, on the
    /// device.
    pub(super) fn update_flat(&self, flat: &Tensor, g: Tensor, found_inf: Option<&Tensor>) {
        tch::no_grad(|| {
            let mut now = [&self.buf1, &self.buf2, &self.buf3].map(Tensor::shallow_clone);
            let before =
                found_inf.map(|_| [flat.copy(), now[0].copy(), now[1].copy(), now[2].copy()]);
            for group in self.groups.iter().filter(|gr| gr.decay != 0.0) {
                for &(at, n) in &group.runs {
                    let mut p = flat.narrow(0, at, n);
                    let _ = match self.cfg.decoupled_weight_decay {
                        true => p.g_mul_(&(&self.lr * -group.decay + 1.0)),
                        false => g.narrow(0, at, n).g_add_(&(p * group.decay)),
                    };
                }
            }
            let cfg = OptimizerConfig {
                weight_decay: 0.0,
                ..self.cfg.clone()
            };
            let mut p = flat.shallow_clone();
            apply_update(&cfg, &self.counters(), &mut p, &g, &mut now);
            if let (Some(found), Some(before)) = (found_inf, before) {
                let clean = found.eq(0.0);
                let [b1, b2, b3] = now;
                for (mut now, was) in [p, b1, b2, b3].into_iter().zip(before) {
                    let kept = now.where_self(&clean, &was);
                    now.copy_(&kept);
                }
            }
        })
    }
}
