//! An exponential moving average of the weights (`--model-ema`), as
//! torchvision's reference `train.py` keeps it: its
//! `ExponentialMovingAverage`, an `AveragedModel` over parameters and
//! buffers with `avg = decay·avg + (1 − decay)·param`, updated after every
//! `steps`-th optimizer step of an epoch (the first copies), reset during
//! the warm-up epochs, with the decay adjusted for the batch, the steps
//! between updates and the length of the run.

use std::collections::BTreeMap;

use anyhow::{Result, anyhow};
use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::model::{Vgg, is_channels_last, to_channels_last};

/// What `config.json` records of `--model-ema`.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct EmaConfig {
    /// Optimizer steps between updates (`--model-ema-steps`).
    pub steps: usize,
    /// The requested per-step decay (`--model-ema-decay`).
    pub decay: f64,
    /// The decay each update applies, fixed when the run starts:
    /// torchvision's `1 − min(1, (1 − decay)·world·batch·steps/epochs)`.
    pub update_decay: f64,
}

impl EmaConfig {
    pub fn new(steps: usize, decay: f64, world: usize, batch: i64, epochs: usize) -> EmaConfig {
        let adjust = (world as f64) * (batch as f64) * (steps as f64) / epochs as f64;
        let alpha = ((1.0 - decay) * adjust).min(1.0);
        EmaConfig {
            steps,
            decay,
            update_decay: 1.0 - alpha,
        }
    }
}

/// The averaged model and how many updates it has averaged.
pub struct Ema {
    pub model: Vgg,
    pub config: EmaConfig,
    pub n_averaged: i64,
}

/// The prefix of the average's tensors inside a resume point.
pub const PREFIX: &str = "ema.";

impl Ema {
    /// A copy of `model` (same layout) that has averaged nothing yet.
    pub fn new(model: &Vgg, config: EmaConfig) -> Ema {
        Ema {
            model: copy_of(model),
            config,
            n_averaged: 0,
        }
    }

    /// After the optimizer step `step` (0-based) of `epoch`: the update
    /// torchvision makes when `step % steps == 0`, then, during the
    /// warm-up epochs, the count reset (so the next update copies again).
    pub fn after_step(&mut self, model: &Vgg, epoch: usize, step: usize, warmup_epochs: usize) {
        if !step.is_multiple_of(self.config.steps) {
            return;
        }
        self.update(model);
        if epoch < warmup_epochs {
            self.n_averaged = 0;
        }
    }

    /// `AveragedModel.update_parameters` with torchvision's `ema_avg`: the
    /// first update copies; later ones compute `d·avg + (1 − d)·p` in the
    /// tensor's arithmetic (float32; integer counters through float32,
    /// truncated as `copy_` truncates).
    pub fn update(&mut self, model: &Vgg) {
        let d = self.config.update_decay;
        let copy = self.n_averaged == 0;
        tch::no_grad(|| {
            for (a, p) in self.model.entries().iter().zip(model.entries()) {
                let mut avg = a.tensor.shallow_clone();
                if copy {
                    avg.copy_(p.tensor);
                } else {
                    avg.copy_(&(a.tensor.g_mul_scalar(d) + p.tensor.g_mul_scalar(1.0 - d)));
                }
            }
        });
        let counts: Vec<i64> = self
            .model
            .num_batches_tracked()
            .iter()
            .zip(model.num_batches_tracked())
            .map(|((_, a), (_, p))| {
                if copy {
                    p - a
                } else {
                    let mixed = (*a as f32) * (d as f32) + (p as f32) * ((1.0 - d) as f32);
                    mixed as i64 - a
                }
            })
            .collect();
        self.model.add_batches_tracked(&counts);
        self.n_averaged += 1;
    }

    /// The average's tensors for a resume point, under [`PREFIX`].
    pub fn resume_tensors(&self) -> Vec<(String, Tensor)> {
        prefixed(&self.model, PREFIX)
    }

    /// Takes the average's tensors (under [`PREFIX`]) out of a resume
    /// point's and loads them, in `model`'s layout.
    pub fn load(
        &mut self,
        source: &str,
        model: &Vgg,
        tensors: &mut BTreeMap<String, Tensor>,
    ) -> Result<()> {
        let missing =
            "the run averages its weights (--model-ema) but the resume point holds no average";
        load_prefixed(&mut self.model, (source, missing), model, tensors, PREFIX)
    }
}

/// A copy of `model`'s tensors in its layout, as plain tensors (an average
/// is computed, never differentiated): what an `AveragedModel` starts from.
pub fn copy_of(model: &Vgg) -> Vgg {
    let mut copy = Vgg::new(model.spec, model.device());
    let sources: BTreeMap<String, &Tensor> = model
        .entries()
        .into_iter()
        .map(|e| (e.name, e.tensor))
        .collect();
    copy.map_tensors(|name, _| sources[name].detach().copy());
    copy.into_inference()
}

/// An average's state dict under `prefix`, for a resume point.
pub fn prefixed(average: &Vgg, prefix: &str) -> Vec<(String, Tensor)> {
    average
        .state_dict()
        .into_iter()
        .map(|(k, v)| (format!("{prefix}{k}"), v))
        .collect()
}

/// Takes an average's tensors (under `prefix`) out of a resume point's
/// and loads them into `average`, in `model`'s layout; `missing` is the
/// error where the point holds none.
pub fn load_prefixed(
    average: &mut Vgg,
    (source, missing): (&str, &str),
    model: &Vgg,
    tensors: &mut BTreeMap<String, Tensor>,
    prefix: &str,
) -> Result<()> {
    let keys: Vec<String> = tensors
        .keys()
        .filter(|k| k.starts_with(prefix))
        .cloned()
        .collect();
    let dict: BTreeMap<String, Tensor> = keys
        .into_iter()
        .filter_map(|k| {
            let t = tensors.remove(&k)?;
            Some((k[prefix.len()..].to_string(), t))
        })
        .collect();
    if dict.is_empty() {
        return Err(anyhow!("{source}: {missing}"));
    }
    average.load_state_dict(source, &dict, crate::model::Values::Any)?;
    let nhwc: BTreeMap<String, bool> = model
        .entries()
        .into_iter()
        .map(|e| (e.name, is_channels_last(e.tensor)))
        .collect();
    average.map_tensors(|name, t| match nhwc[name] {
        true => to_channels_last(t).detach(),
        false => t.detach(),
    });
    Ok(())
}
