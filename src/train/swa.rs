//! Stochastic weight averaging (`--swa-start`), as `torch.optim.swa_utils`
//! does it in PyTorch's documented loop: from an epoch on, the weights at
//! the end of each epoch join an equal-weight average (`AveragedModel`,
//! whose buffers follow the model's), the learning rate anneals from the
//! schedule's to `--swa-lr` (`SWALR`), and when the run ends the average's
//! BatchNorm statistics are computed afresh over the training images
//! (`update_bn`); it is then evaluated and saved as `swa.safetensors`.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};

use anyhow::Result;
use tch::Tensor;

use super::Trainer;
use super::ema::{copy_of, load_prefixed, prefixed};
use super::state::EmaMetrics;
use crate::model::{Layer, Sequential, Vgg, batch_norm_moving};

/// A weight file's tensors and metadata.
pub(super) type WeightsFile = (Vec<(String, Tensor)>, HashMap<String, String>);

/// The prefix of the average's tensors inside a resume point.
pub const PREFIX: &str = "swa.";

/// The average and how many epochs' weights it holds.
pub struct Swa {
    pub model: Vgg,
    pub n_averaged: i64,
}

impl Swa {
    /// A copy of `model` (same layout) that has averaged nothing yet.
    pub fn new(model: &Vgg) -> Swa {
        Swa {
            model: copy_of(model),
            n_averaged: 0,
        }
    }

    /// `AveragedModel.update_parameters` (`use_buffers=False`): the first
    /// update copies the parameters, later ones compute
    /// `avg + (p − avg)/(n + 1)` (torch's `swa_avg_fn`; on CUDA torch takes
    /// the equal `lerp`); the buffers are the model's.
    pub fn update(&mut self, model: &Vgg) {
        let n = self.n_averaged;
        tch::no_grad(|| {
            for (a, p) in self.model.entries().iter().zip(model.entries()) {
                let mut avg = a.tensor.shallow_clone();
                if n == 0 || !a.is_param {
                    avg.copy_(p.tensor);
                } else {
                    let _ = avg.g_add_(&((p.tensor - a.tensor) / (n + 1) as f64));
                }
            }
        });
        let counts: Vec<i64> = self
            .model
            .num_batches_tracked()
            .iter()
            .zip(model.num_batches_tracked())
            .map(|((_, a), (_, p))| p - a)
            .collect();
        self.model.add_batches_tracked(&counts);
        self.n_averaged += 1;
    }

    /// The average's tensors for a resume point, under [`PREFIX`] (none
    /// before the first average: it is then the model's copy).
    pub fn resume_tensors(&self) -> Vec<(String, Tensor)> {
        match self.n_averaged {
            0 => Vec::new(),
            _ => prefixed(&self.model, PREFIX),
        }
    }

    /// The average of a resume point that has averaged `n_averaged`
    /// epochs, taken out of its tensors, in `model`'s layout.
    pub fn load(
        &mut self,
        source: &str,
        model: &Vgg,
        tensors: &mut BTreeMap<String, Tensor>,
        n_averaged: i64,
    ) -> Result<()> {
        self.n_averaged = n_averaged;
        if n_averaged == 0 {
            return Ok(());
        }
        let missing =
            "the run averages its weights (--swa-start) but the resume point holds no average";
        load_prefixed(&mut self.model, (source, missing), model, tensors, PREFIX)
    }
}

impl Trainer<'_> {
    /// After the evaluation of `epoch` (0-based): the epoch's weights join
    /// the average where it has started; when the run `ends` there, the
    /// average's BatchNorm statistics are recomputed and it is evaluated
    /// (its figures returned).
    pub(super) fn swa_after_epoch(
        &mut self,
        epoch: usize,
        ends: bool,
    ) -> Result<Option<EmaMetrics>> {
        let Some(config) = self.state.config.swa else {
            return Ok(None);
        };
        let Some(mut swa) = self.swa.take() else {
            return Ok(None);
        };
        if config.averages(epoch) {
            swa.update(&self.model);
        }
        let result = (ends && swa.n_averaged > 0).then(|| {
            self.update_bn(&swa.model)?;
            self.validate(&swa.model, None)
        });
        self.swa = Some(swa);
        let figures = result.transpose()?.map(|r| EmaMetrics {
            loss: r.loss,
            top1: r.top1,
            top5: r.top5,
        });
        Ok(figures)
    }

    /// `torch.optim.swa_utils.update_bn` on `average`: its BatchNorm
    /// statistics reset, then each layer's running mean and variance the
    /// plain mean of their values over the training images' batches
    /// (`momentum=None`), as evaluation preprocesses the images (no
    /// augmentation), in their order, in batches of `--batch-size`. Over
    /// ranks, each takes its share of those batches and the means are
    /// combined by their counts: the same batches as one process. Layers
    /// `finetune` keeps frozen keep theirs (they never trained: the head
    /// learnt on the features they give).
    fn update_bn(&self, average: &Vgg) -> Result<()> {
        let (layers, from) = (&average.features, self.model.frozen_prefix);
        if trained_bn(layers, from).next().is_none() {
            return Ok(());
        }
        reset_running_stats(layers, from);
        let b = self.state.config.batch_size;
        let n = self.train.len();
        let (first, count) = self.world.range_of((n + b - 1) / b);
        let end = ((first + count) * b).min(n);
        let dev = self.model.device();
        let transform = self.pre.stream_transform(false);
        let mut batches = self
            .train
            .in_order(first * b, end - first * b, b, transform, dev)?;
        let mut seen = 0i64;
        tch::no_grad(|| -> Result<()> {
            while let Some(batch) = batches.next_batch()? {
                if !batch.is_empty() {
                    let x = self.numerics.input(&self.pre.batch(&batch, false));
                    cumulative_bn_pass(layers, &x, from);
                    seen += 1;
                }
            }
            Ok(())
        })?;
        if self.world.size > 1 {
            let mut total = [seen as f64];
            self.world.sum_f64(&mut total)?;
            let total = total[0].max(1.0);
            for (mean, var, count) in trained_bn(layers, from) {
                for t in [mean, var] {
                    let mut t = t.shallow_clone();
                    let _ = t.g_mul_scalar_(seen as f64);
                    self.world.sum(&t)?;
                    let _ = t.g_div_scalar_(total);
                }
                count.set(total as i64);
            }
        }
        Ok(())
    }
}

impl Trainer<'_> {
    /// The average for `swa.safetensors` with its file's metadata, where
    /// the last epoch recorded evaluated it (the run's end).
    pub(super) fn swa_weights(&self) -> Option<WeightsFile> {
        let figures = self.state.history.last()?.swa.as_ref()?;
        let swa = self.swa.as_ref()?;
        let meta = self
            .state
            .meta(self.state.history.len(), Some(figures.top1));
        Some((swa.model.state_dict(), meta.to_metadata()))
    }

    /// `swa.safetensors`, once the run has ended with an average.
    pub(super) fn swa_file(&self) -> Option<std::path::PathBuf> {
        self.state.history.last()?.swa.as_ref()?;
        self.swa.as_ref().map(|_| self.run_dir.swa())
    }
}

/// A BatchNorm layer's running mean, variance and counter.
type BnStats<'a> = (&'a Tensor, &'a Tensor, &'a Cell<i64>);

/// The running statistics of the BatchNorm layers from index `from` on.
fn trained_bn(layers: &Sequential, from: usize) -> impl Iterator<Item = BnStats<'_>> {
    layers
        .layers
        .iter()
        .skip(from)
        .filter_map(|(_, layer)| match layer {
            Layer::BatchNorm {
                running_mean,
                running_var,
                num_batches_tracked,
                ..
            } => Some((running_mean, running_var, num_batches_tracked)),
            _ => None,
        })
}

/// BatchNorm's `reset_running_stats` from layer `from` on: means 0,
/// variances 1, counters 0.
fn reset_running_stats(layers: &Sequential, from: usize) {
    for (mean, var, count) in trained_bn(layers, from) {
        let _ = mean.shallow_clone().zero_();
        let _ = var.shallow_clone().fill_(1.0);
        count.set(0);
    }
}

/// The layers up to the last BatchNorm on `x`, each BatchNorm from index
/// `from` on in training mode with its running statistics moved by 1/n
/// toward the batch's at its n-th batch (torch's cumulative average,
/// `momentum=None`), those before it in evaluation mode.
fn cumulative_bn_pass(layers: &Sequential, x: &Tensor, from: usize) {
    let is_bn = |l: &Layer| matches!(l, Layer::BatchNorm { .. });
    let Some(last) = layers.layers.iter().rposition(|(_, l)| is_bn(l)) else {
        return;
    };
    let mut x = x.shallow_clone();
    for (i, (_, layer)) in layers.layers[..=last].iter().enumerate() {
        x = match layer {
            Layer::BatchNorm {
                weight,
                bias,
                running_mean,
                running_var,
                num_batches_tracked,
            } if i >= from => {
                let n = num_batches_tracked.get() + 1;
                num_batches_tracked.set(n);
                let stats = [running_mean, running_var];
                batch_norm_moving(&x, [weight, bias], stats, true, 1.0 / n as f64)
            }
            l => l.forward(&x, false, (None, layers.bn_momentum), true),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Arch, Head, ModelSpec};
    use tch::{Device, Kind};

    /// update_bn's pass over two batches: each trained BatchNorm's running
    /// mean and variance are the plain means of the two batches' (the
    /// variance unbiased), its counter 2; the layers before `from` (frozen
    /// by `finetune`) keep theirs and run in evaluation mode.
    #[test]
    fn the_pass_averages_the_batches_and_keeps_frozen_layers() {
        let spec = ModelSpec::new(Arch::Vgg11, true, Head::Cifar, 10);
        let model = copy_of(&Vgg::new(spec, Device::Cpu));
        let layers = &model.features;
        let (from, first_trained) = (8, 9);
        let frozen = |i: usize| match &layers.layers[i].1 {
            Layer::BatchNorm { running_mean, .. } => running_mean.copy(),
            _ => unreachable!("features.{i} is a BatchNorm"),
        };
        let _ = frozen(5).shallow_clone().fill_(0.25);
        let kept = [frozen(1), frozen(5)];
        reset_running_stats(layers, from);
        tch::manual_seed(0);
        let xs = [
            Tensor::randn([4, 3, 32, 32], (Kind::Float, Device::Cpu)),
            Tensor::randn([3, 3, 32, 32], (Kind::Float, Device::Cpu)) * 2.0 + 1.0,
        ];
        let (mut means, mut vars) = (Vec::new(), Vec::new());
        tch::no_grad(|| {
            for x in &xs {
                let input = layers.forward_prefix(x, first_trained, false);
                let dims = &[0i64, 2, 3][..];
                means.push(input.mean_dim(dims, false, Kind::Float));
                vars.push(input.var_dim(dims, true, false));
                cumulative_bn_pass(layers, x, from);
            }
        });
        let (mean, var, count) = trained_bn(layers, from).next().unwrap();
        let want_mean = (&means[0] + &means[1]) / 2.0;
        let want_var = (&vars[0] + &vars[1]) / 2.0;
        assert!((mean - want_mean).abs().max().double_value(&[]) < 1e-5);
        assert!((var - want_var).abs().max().double_value(&[]) < 1e-5);
        assert!(trained_bn(layers, from).all(|(_, _, c)| c.get() == 2) && count.get() == 2);
        for (i, k) in [1, 5].into_iter().zip(&kept) {
            assert!(frozen(i).equal(k), "features.{i} changed");
        }
    }
}
