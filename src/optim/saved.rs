//! The optimizer's state as it is saved: its buffers by parameter name
//! (`optimizer.momentum_buffer.<param>`, ...), whatever the mode and the
//! flat buffer's order, and fp16 loss scaling's state.

use std::collections::BTreeMap;

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::{Optimizer, OptimizerKind};

impl Optimizer {
    /// The state's buffers (those in use) with the names torch.optim gives
    /// them.
    fn named_buffers(&self) -> Vec<(&'static str, &Tensor)> {
        let names = match self.cfg.kind {
            OptimizerKind::Sgd => ["momentum_buffer", "", ""],
            OptimizerKind::Adam | OptimizerKind::Adamw => {
                ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"]
            }
            OptimizerKind::Nadam | OptimizerKind::Radam => ["exp_avg", "exp_avg_sq", ""],
            OptimizerKind::Adamax => ["exp_avg", "exp_inf", ""],
            OptimizerKind::Adagrad => ["sum", "", ""],
            OptimizerKind::Adadelta => ["square_avg", "acc_delta", ""],
            OptimizerKind::Rmsprop => ["square_avg", "momentum_buffer", "grad_avg"],
        };
        names
            .into_iter()
            .zip([&self.buf1, &self.buf2, &self.buf3])
            .filter(|(name, b)| !name.is_empty() && (b.numel() > 0 || *name == names[0]))
            .collect()
    }

    /// The state as named tensors (`optimizer.momentum_buffer.<param>`, ...), on the CPU.
    /// NAdam's product of momenta is saved with each parameter, as
    /// torch.optim.NAdam keeps it (`optimizer.mu_product.<param>`, 0-dim).
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let buffers = self.named_buffers();
        let mut out = Vec::new();
        for s in &self.slots {
            for (name, buf) in &buffers {
                out.push((
                    format!("optimizer.{name}.{}", s.name),
                    Self::view(buf, s).to_device(tch::Device::Cpu),
                ));
            }
            if self.cfg.kind == OptimizerKind::Nadam {
                let product = self.mu_product.to_device(tch::Device::Cpu);
                out.push((format!("optimizer.mu_product.{}", s.name), product));
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
        for s in &self.slots {
            for (name, buf) in self.named_buffers() {
                let key = format!("optimizer.{name}.{}", s.name);
                let mut buf = Self::view(buf, s);
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
            if self.cfg.kind == OptimizerKind::Nadam {
                let key = format!("optimizer.mu_product.{}", s.name);
                match tensors.get(&key) {
                    Some(t) if t.numel() == 1 => self.mu_product.copy_(&t.reshape([])),
                    Some(t) => bail!("{source}: {key} has shape {:?}, expected []", t.size()),
                    None => bail!("{source}: optimizer state lacks {key}"),
                }
            }
        }
        let _ = self.step.fill_(steps as f64);
        Ok(())
    }
}

/// fp16 loss scaling as saved in a resume checkpoint, with PyTorch
/// GradScaler's policy: start at 2^16, halve on overflow (and skip that
/// step), double after `growth_interval` clean steps.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    pub scale: f64,
    pub growth_factor: f64,
    pub backoff_factor: f64,
    pub growth_interval: u32,
    /// Clean steps since the last change of scale.
    pub good_steps: u32,
}

impl Default for LossScaler {
    fn default() -> Self {
        LossScaler {
            scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
            good_steps: 0,
        }
    }
}
