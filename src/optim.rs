//! SGD (PyTorch's semantics: weight decay added to the gradient, momentum
//! buffer, optional Nesterov) and AdamW, with their state in tensors this
//! module owns, so that a checkpoint can save and restore it exactly.

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tch::Tensor;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    Sgd,
    Adamw,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct OptimizerConfig {
    pub kind: OptimizerKind,
    pub momentum: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
    pub betas: (f64, f64),
    pub eps: f64,
}

/// One parameter under optimization and its state.
struct Slot {
    name: String,
    param: Tensor,
    /// SGD: momentum buffer. AdamW: first moment.
    buf1: Tensor,
    /// AdamW: second moment (undefined-size 0 tensor for SGD).
    buf2: Tensor,
}

pub struct Optimizer {
    cfg: OptimizerConfig,
    slots: Vec<Slot>,
    /// Updates taken (AdamW's bias correction).
    pub steps: i64,
}

impl Optimizer {
    /// `params` are the trainable parameters by name (shallow handles that
    /// share storage and gradients with the model's).
    pub fn new(cfg: OptimizerConfig, params: Vec<(String, &Tensor)>) -> Self {
        let slots = params
            .into_iter()
            .map(|(name, p)| Slot {
                name,
                param: p.shallow_clone(),
                buf1: p.zeros_like().detach(),
                buf2: if cfg.kind == OptimizerKind::Adamw {
                    p.zeros_like().detach()
                } else {
                    Tensor::zeros([0], (p.kind(), p.device()))
                },
            })
            .collect();
        Optimizer {
            cfg,
            slots,
            steps: 0,
        }
    }

    pub fn zero_grad(&mut self) {
        for s in &mut self.slots {
            let mut g = s.param.grad();
            if g.defined() {
                let _ = g.detach_().zero_();
            }
        }
    }

    pub fn step(&mut self, lr: f64) {
        self.steps += 1;
        let cfg = self.cfg.clone();
        let t = self.steps as f64;
        tch::no_grad(|| {
            for s in &mut self.slots {
                let g = s.param.grad();
                if !g.defined() {
                    continue;
                }
                match cfg.kind {
                    OptimizerKind::Sgd => {
                        let mut d = if cfg.weight_decay != 0.0 {
                            &g + &s.param * cfg.weight_decay
                        } else {
                            g.shallow_clone()
                        };
                        if cfg.momentum != 0.0 {
                            // A zero buffer makes the first update `buf = d`,
                            // which is PyTorch's first-step rule.
                            let _ = s.buf1.g_mul_scalar_(cfg.momentum).g_add_(&d);
                            d = if cfg.nesterov {
                                &d + &s.buf1 * cfg.momentum
                            } else {
                                s.buf1.shallow_clone()
                            };
                        }
                        let _ = s.param.g_add_(&(d * -lr));
                    }
                    OptimizerKind::Adamw => {
                        let (b1, b2) = cfg.betas;
                        let _ = s.param.g_mul_scalar_(1.0 - lr * cfg.weight_decay);
                        let _ = s.buf1.g_mul_scalar_(b1).g_add_(&(&g * (1.0 - b1)));
                        let _ = s.buf2.g_mul_scalar_(b2).g_add_(&(&g * &g * (1.0 - b2)));
                        let bc1 = 1.0 - b1.powf(t);
                        let bc2 = 1.0 - b2.powf(t);
                        let denom = s.buf2.sqrt() / bc2.sqrt() + cfg.eps;
                        let _ = s.param.g_add_(&(&s.buf1 / denom * (-lr / bc1)));
                    }
                }
            }
        });
    }

    /// The state as named tensors (`momentum_buffer.<param>`, `exp_avg_sq.<param>`).
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let (n1, n2) = match self.cfg.kind {
            OptimizerKind::Sgd => ("momentum_buffer", None),
            OptimizerKind::Adamw => ("exp_avg", Some("exp_avg_sq")),
        };
        let mut out = Vec::new();
        for s in &self.slots {
            out.push((
                format!("optimizer.{n1}.{}", s.name),
                s.buf1.to_device(tch::Device::Cpu),
            ));
            if let Some(n2) = n2 {
                out.push((
                    format!("optimizer.{n2}.{}", s.name),
                    s.buf2.to_device(tch::Device::Cpu),
                ));
            }
        }
        out
    }

    pub fn load_state(
        &mut self,
        source: &str,
        tensors: &BTreeMap<String, Tensor>,
        steps: i64,
    ) -> Result<()> {
        let (n1, n2) = match self.cfg.kind {
            OptimizerKind::Sgd => ("momentum_buffer", None),
            OptimizerKind::Adamw => ("exp_avg", Some("exp_avg_sq")),
        };
        for s in &mut self.slots {
            let mut pairs = vec![(format!("optimizer.{n1}.{}", s.name), &mut s.buf1)];
            if let Some(n2) = n2 {
                pairs.push((format!("optimizer.{n2}.{}", s.name), &mut s.buf2));
            }
            for (key, buf) in pairs {
                let Some(t) = tensors.get(&key) else {
                    bail!("{source}: optimizer state lacks {key}");
                };
                if t.size() != buf.size() {
                    bail!(
                        "{source}: {key} has shape {:?}, expected {:?}",
                        t.size(),
                        buf.size()
                    );
                }
                tch::no_grad(|| buf.copy_(t));
            }
        }
        self.steps = steps;
        Ok(())
    }
}
