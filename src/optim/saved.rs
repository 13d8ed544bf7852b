//! The optimizer's state as it is saved: its buffers by parameter name
//! (`optimizer.momentum_buffer.<param>`, ...), whatever the mode and the
//! flat buffer's order, and fp16 loss scaling's state.

use std::collections::BTreeMap;

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::{Optimizer, OptimizerKind};

impl Optimizer {
    fn names(&self) -> (&'static str, Option<&'static str>) {
        match self.cfg.kind {
            OptimizerKind::Sgd => ("momentum_buffer", None),
            OptimizerKind::Adam | OptimizerKind::Adamw => ("exp_avg", Some("exp_avg_sq")),
            OptimizerKind::Rmsprop if self.buf2.numel() > 0 => {
                ("square_avg", Some("momentum_buffer"))
            }
            OptimizerKind::Rmsprop => ("square_avg", None),
        }
    }

    /// The state as named tensors (`optimizer.momentum_buffer.<param>`, ...), on the CPU.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let (n1, n2) = self.names();
        let mut out = Vec::new();
        for s in &self.slots {
            out.push((
                format!("optimizer.{n1}.{}", s.name),
                Self::view(&self.buf1, s).to_device(tch::Device::Cpu),
            ));
            if let Some(n2) = n2 {
                out.push((
                    format!("optimizer.{n2}.{}", s.name),
                    Self::view(&self.buf2, s).to_device(tch::Device::Cpu),
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
        let (n1, n2) = self.names();
        for s in &self.slots {
            let mut pairs = vec![(
                format!("optimizer.{n1}.{}", s.name),
                Self::view(&self.buf1, s),
            )];
            if let Some(n2) = n2 {
                pairs.push((
                    format!("optimizer.{n2}.{}", s.name),
                    Self::view(&self.buf2, s),
                ));
            }
            for (key, mut buf) in pairs {
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
