//! SGD (PyTorch's semantics: weight decay added to the gradient, momentum
//! buffer, optional Nesterov), Adam (the same L2 term), AdamW (decoupled
//! weight decay), both optionally AMSGrad, RMSprop (L2, optional
//! momentum, optionally centered), NAdam and RAdam (L2 or decoupled), with their state in
//! tensors this module owns, so that a checkpoint can save and restore it
//! exactly.
//!
//! Two ways to run the same arithmetic:
//! - per parameter: gradients from `backward()` in each parameter's `.grad`,
//!   one chain of kernels per parameter (the reference);
//! - fused (multi-tensor): the trainable parameters live in one flat buffer
//!   (each parameter a view of it), gradients come back from
//!   `run_backward` and are concatenated, and libtorch's fused kernel
//!   (`_fused_sgd_` / `_fused_adam_` / `_fused_adamw_`, through `shim`)
//!   updates the whole model in one pass (RMSprop, NAdam, RAdam, Adamax,
//!   Adagrad and Adadelta, which have no such kernel: a few kernels over the whole flat buffers). This is what the GPU wants: a
//!   VGG16 step drops from ~130 chains of optimizer kernels to one kernel,
//!   and there is no zeroing of gradients.
//!
//! Parameters may take different weight decays, grouped as torchvision's
//! reference recipe groups them (`groups`): the fused kernel then runs
//! once per group.
//!
//! fp16's dynamic loss scaling (tch has no GradScaler) runs on the device
//! inside the fused update; [`LossScaler`] is its saved form.
//!
//! The state is kept as flat buffers in both modes and saved per parameter
//! (`optimizer.momentum_buffer.<name>`), so a checkpoint does not depend on
//! the mode that wrote it (`saved`). With a compute copy of the weights
//! (`Vgg::flatten_trainable`), autograd differentiates the copy and the
//! update applies its gradients to the fp32 parameters.

mod config;
mod groups;
mod rules;
mod saved;

pub use config::{
    DEFAULT_ALPHA, DEFAULT_MOMENTUM_DECAY, DEFAULT_RHO, OptimizerConfig, OptimizerKind,
    RULE_OPTIONS,
};
pub use saved::LossScaler;

use groups::{DecayGroup, decay_groups};
use rules::{Counters, apply_update};

use anyhow::Result;
use tch::{Kind, Tensor};

/// Where one parameter lives in the flat buffers.
struct Slot {
    name: String,
    param: Tensor,
    /// What autograd differentiates for it (fused mode): the parameter, or
    /// its compute-dtype copy (see [`Optimizer::differentiate`]).
    source: Tensor,
    /// Zeros standing in for the gradient of a parameter the loss did not
    /// use, made once.
    zeros: Option<Tensor>,
    offset: i64,
    numel: i64,
    /// Its weight decay (see [`OptimizerConfig::decay_of`]).
    decay: f64,
    /// A 4-d parameter stored channels-last (NHWC strides): its flat segment
    /// holds the elements in that order.
    nhwc: bool,
}

/// Where the view `p` starts in the flat buffer `flat`, in elements.
fn offset_in(flat: &Tensor, p: &Tensor) -> i64 {
    let bytes = p.data_ptr() as i64 - flat.data_ptr() as i64;
    bytes / flat.kind().elt_size_in_bytes() as i64
}

fn is_nhwc(t: &Tensor) -> bool {
    let (size, stride) = (t.size(), t.stride());
    size.len() == 4 && size[1] > 1 && stride[1] == 1
}

/// What `Optimizer::backward` computed: the fused mode's flat gradient
/// (in the parameters' storage order), or nothing where the gradients are
/// in the parameters' `.grad`.
pub struct Gradients(Option<Tensor>);

pub struct Optimizer {
    cfg: OptimizerConfig,
    /// The parameters in the order given (that of the saved state).
    slots: Vec<Slot>,
    /// The slots in the flat buffer's order (fused mode; in which the flat
    /// gradient is concatenated).
    buffer_order: Vec<usize>,
    /// The flat parameter buffer the parameters are views of (fused mode).
    flat: Option<Tensor>,
    /// The parameters by weight decay (fused mode's kernel calls).
    groups: Vec<DecayGroup>,
    /// SGD: momentum buffer. Adam(W): first moment. RMSprop: the squared
    /// gradients' average. Flat, all parameters.
    buf1: Tensor,
    /// Adam(W): second moment. RMSprop: its momentum buffer (empty without
    /// momentum, and for SGD).
    buf2: Tensor,
    /// Adam(W) with AMSGrad: the largest second moment so far. Centered
    /// RMSprop: the gradients' average. Empty otherwise.
    buf3: Tensor,
    /// The learning rate of the update in progress and the number of
    /// updates taken (Adam's bias correction), 0-dim on the parameters'
    /// device: a captured CUDA graph reads their current values, and a
    /// skipped fp16 step is not counted, without the host looking.
    lr: Tensor,
    step: Tensor,
    /// NAdam: the product of the momenta of the updates taken (float32, as
    /// torch.optim.NAdam's `mu_product`), on the device for the same reason.
    mu_product: Tensor,
    /// The flat gradient's storage, written again by every `backward` on
    /// the CPU (fused mode): a fresh one per step is a model-sized block
    /// that glibc maps and unmaps each time, and the kernel zeroes its
    /// pages again (a third of a CPU fine-tune's time for an ImageNet
    /// head). On CUDA the caching allocator (or the graph's pool) reuses
    /// memory by itself.
    grad_buf: Option<Tensor>,
    /// `--clip-grad-norm`: the most the gradients' global 2-norm may be.
    clip: Option<f64>,
    /// `--clip-grad-value`: the bound on every gradient element.
    clip_value: Option<f64>,
    scaler: Option<DeviceScaler>,
}

/// fp16 loss scaling on the device, with PyTorch GradScaler's policy
/// (`LossScaler` is its saved form): no host synchronization per step, so
/// an fp16 step can run ahead of the GPU and be captured in a CUDA graph.
struct DeviceScaler {
    scale: Tensor,
    /// Clean steps since the scale last changed (int32, as `_amp_update_scale_` wants).
    tracker: Tensor,
    /// Steps skipped so far (int64).
    skipped: Tensor,
    growth_factor: f64,
    backoff_factor: f64,
    growth_interval: i64,
}

impl Optimizer {
    /// Per-parameter mode. `params` are the trainable parameters by name
    /// (handles sharing storage and gradients with the model's).
    pub fn new(cfg: OptimizerConfig, params: Vec<(String, &Tensor)>) -> Self {
        Self::build(cfg, params, None)
    }

    /// Fused mode: `flat` is the buffer every parameter is a view of, in
    /// any order (see `Vgg::flatten_trainable`).
    pub fn fused(cfg: OptimizerConfig, params: Vec<(String, &Tensor)>, flat: Tensor) -> Self {
        Self::build(cfg, params, Some(flat))
    }

    fn build(cfg: OptimizerConfig, params: Vec<(String, &Tensor)>, flat: Option<Tensor>) -> Self {
        let mut offset = 0;
        let slots: Vec<Slot> = params
            .into_iter()
            .map(|(name, p)| {
                let numel = p.numel() as i64;
                let s = Slot {
                    name,
                    param: p.shallow_clone(),
                    source: p.shallow_clone(),
                    zeros: None,
                    offset: flat.as_ref().map_or(offset, |f| offset_in(f, p)),
                    numel,
                    decay: cfg.weight_decay,
                    nhwc: is_nhwc(p),
                };
                offset += numel;
                s
            })
            .collect();
        let mut buffer_order: Vec<usize> = (0..slots.len()).collect();
        buffer_order.sort_by_key(|&i| slots[i].offset);
        let opts = slots.first().map_or((Kind::Float, tch::Device::Cpu), |s| {
            (s.param.kind(), s.param.device())
        });
        // Adagrad's sum starts at its initial accumulator value.
        let start = match cfg.kind {
            OptimizerKind::Adagrad => cfg.initial_accumulator_value,
            _ => 0.0,
        };
        let buf1 = Tensor::full([offset], start, opts);
        let rmsprop_momentum = cfg.kind == OptimizerKind::Rmsprop && cfg.momentum != 0.0;
        let adadelta = cfg.kind == OptimizerKind::Adadelta;
        let buf2 = if cfg.kind.has_betas() || rmsprop_momentum || adadelta {
            Tensor::zeros([offset], opts)
        } else {
            Tensor::zeros([0], opts)
        };
        let third = (cfg.kind.is_adam() && cfg.amsgrad)
            || (cfg.kind == OptimizerKind::Rmsprop && cfg.centered);
        let buf3 = Tensor::zeros([if third { offset } else { 0 }], opts);
        let groups = decay_groups(&slots, &buffer_order);
        Optimizer {
            cfg,
            slots,
            buffer_order,
            flat,
            groups,
            buf1,
            buf2,
            buf3,
            lr: Tensor::zeros([], opts),
            step: Tensor::zeros([], opts),
            mu_product: Tensor::ones([], (Kind::Float, opts.1)),
            grad_buf: None,
            clip: None,
            clip_value: None,
            scaler: None,
        }
    }

    /// The momentum (Adam's beta1) of the updates from now on: OneCycleLR's
    /// cycled one. Not for a captured CUDA graph, which keeps the value it
    /// was captured with.
    pub fn set_cycled_momentum(&mut self, m: f64) {
        self.cfg.set_cycled_momentum(m);
    }

    /// Scales every step's gradients so their global 2-norm is at most
    /// `max_norm`, as `torch.nn.utils.clip_grad_norm_` does before
    /// `optimizer.step()` (after unscaling, with fp16).
    pub fn clip_grad_norm(&mut self, max_norm: Option<f64>) {
        self.clip = max_norm;
    }

    /// Clamps every element of each step's gradients to `[-value, value]`,
    /// as `torch.nn.utils.clip_grad_value_` does before `optimizer.step()`
    /// (after unscaling, with fp16).
    pub fn clip_grad_value(&mut self, value: Option<f64>) {
        // Beyond float32's largest value a bound clamps nothing finite, and
        // libtorch would refuse to convert it.
        self.clip_value = value.map(|v| v.min(f32::MAX as f64));
    }

    /// `clip_grad_norm_`'s factor for `grads` (one tensor per parameter),
    /// on the device: the norm of the per-parameter 2-norms, then
    /// `min(1, max_norm / (norm + 1e-6))`.
    fn clip_factor(&self, grads: &[Tensor]) -> Option<Tensor> {
        let max_norm = self.clip?;
        let norms: Vec<Tensor> = grads.iter().map(|g| g.norm()).collect();
        let total = Tensor::stack(&norms, 0).norm();
        // Beyond float32's largest value a max norm changes nothing (a
        // finite norm is below it), and libtorch would refuse to convert it.
        let max_norm = max_norm.min(f32::MAX as f64);
        let max = Tensor::full([], max_norm, (total.kind(), total.device()));
        Some((max / (total + 1e-6)).clamp_max(1.0))
    }

    /// Scales the loss and skips steps with non-finite gradients (fp16),
    /// starting from `state`. Only the fused update supports it.
    pub fn enable_loss_scaling(&mut self, state: &LossScaler) {
        let dev = self.lr.device();
        self.scaler = Some(DeviceScaler {
            scale: Tensor::from(state.scale as f32).to_device(dev),
            tracker: Tensor::from(state.good_steps as i32).to_device(dev),
            skipped: Tensor::zeros([], (Kind::Int64, dev)),
            growth_factor: state.growth_factor,
            backoff_factor: state.backoff_factor,
            growth_interval: state.growth_interval as i64,
        });
    }

    /// The loss scaler's current state (reads the device), if scaling.
    pub fn loss_scaler(&self) -> Option<LossScaler> {
        self.scaler.as_ref().map(|s| LossScaler {
            scale: s.scale.double_value(&[]),
            growth_factor: s.growth_factor,
            backoff_factor: s.backoff_factor,
            growth_interval: s.growth_interval as u32,
            good_steps: s.tracker.int64_value(&[]) as u32,
        })
    }

    /// Updates taken so far (reads the device).
    pub fn steps(&self) -> i64 {
        self.step.double_value(&[]) as i64
    }

    /// Steps skipped for non-finite gradients so far (reads the device).
    pub fn skipped(&self) -> i64 {
        self.scaler
            .as_ref()
            .map_or(0, |s| s.skipped.int64_value(&[]))
    }

    /// A flat buffer's segment for one parameter, in the parameter's shape
    /// and memory layout.
    fn view(buf: &Tensor, s: &Slot) -> Tensor {
        let seg = buf.narrow(0, s.offset, s.numel);
        let size = s.param.size();
        if s.nhwc {
            seg.view([size[0], size[2], size[3], size[1]])
                .permute([0, 3, 1, 2])
        } else {
            seg.view(size.as_slice())
        }
    }

    /// `g` as its slot's segment of the flat gradient, in the parameter's
    /// storage order; a parameter the loss did not use (a convolution's
    /// bias skipped before BatchNorm) has none, and gets zeros.
    fn flat_grad(g: &Tensor, s: &mut Slot) -> Tensor {
        if !g.defined() {
            let source = &s.source;
            return s
                .zeros
                .get_or_insert_with(|| source.zeros_like().reshape([-1]))
                .shallow_clone();
        }
        if s.nhwc {
            g.permute([0, 2, 3, 1]).reshape([-1])
        } else {
            g.reshape([-1])
        }
    }

    /// Autograd differentiates `views` (by parameter name: the compute
    /// copy's, `Vgg::compute_views`) in place of those parameters, and the
    /// update applies their gradients to the parameters. Fused mode only
    /// (the per-parameter update reads each parameter's `.grad`).
    pub fn differentiate(&mut self, views: Vec<(String, Tensor)>) {
        if self.flat.is_none() {
            return;
        }
        for (name, view) in views {
            if let Some(s) = self.slots.iter_mut().find(|s| s.name == name) {
                s.source = view;
            }
        }
    }

    /// Backward pass and update for `loss` (`prepare` + `backward_update`).
    /// With loss scaling (fp16), the loss is scaled, the gradients unscaled
    /// and checked, and a step with non-finite gradients leaves parameters
    /// and state as they were, all on the device.
    pub fn backward_step(&mut self, loss: &Tensor, lr: f64) -> Result<()> {
        self.prepare(lr);
        self.backward_update(loss)
    }

    /// Sets the step's learning rate on the device. Runs eagerly, also
    /// before each replay of a captured step.
    pub fn prepare(&mut self, lr: f64) {
        let _ = self.lr.fill_(lr);
    }

    /// The backward pass and the update with the learning rate `prepare`
    /// set: device work only, never a host synchronization, so with the
    /// fused update it can be captured in a CUDA graph.
    pub fn backward_update(&mut self, loss: &Tensor) -> Result<()> {
        let g = self.backward(loss);
        self.update(g)
    }

    /// The backward pass alone (`update` takes what it returns): the fused
    /// mode's flat gradient, or the gradients left in each parameter's
    /// `.grad`.
    pub fn backward(&mut self, loss: &Tensor) -> Gradients {
        self.backward_into(loss, true)
    }

    /// `backward`; `reuse`: the flat gradient may be written into the
    /// storage the previous step's was (which must be gone by then).
    fn backward_into(&mut self, loss: &Tensor, reuse: bool) -> Gradients {
        if self.flat.is_none() {
            self.zero_grad();
            loss.backward();
            return Gradients(None);
        }
        let scaled = match &self.scaler {
            Some(s) => loss * &s.scale,
            None => loss.shallow_clone(),
        };
        let order = &self.buffer_order;
        let sources: Vec<&Tensor> = order.iter().map(|&i| &self.slots[i].source).collect();
        let grads = Tensor::run_backward(&[&scaled], &sources, false, false);
        let parts: Vec<Tensor> = grads
            .iter()
            .zip(order)
            .map(|(g, &i)| Self::flat_grad(g, &mut self.slots[i]))
            .collect();
        let kind = self.slots.first().map_or(Kind::Float, |s| s.param.kind());
        let device = self.lr.device();
        if reuse && device == tch::Device::Cpu && parts.iter().all(|p| p.kind() == kind) {
            let numel = parts.iter().map(|p| p.numel() as i64).sum::<i64>();
            let buf = self
                .grad_buf
                .get_or_insert_with(|| Tensor::empty([numel], (kind, device)));
            return Gradients(Some(Tensor::cat_out(buf, &parts, 0)));
        }
        // One concatenation per run of gradients in one dtype (a compute
        // copy's come first), cast to the parameters' dtype.
        let mut runs: Vec<Tensor> = parts
            .chunk_by(|a, b| a.kind() == b.kind())
            .map(|run| Tensor::cat(run, 0).to_kind(kind))
            .collect();
        Gradients(Some(match runs.len() {
            1 => runs.remove(0),
            _ => Tensor::cat(&runs, 0),
        }))
    }

    /// The backward pass of one of the batches whose gradients make one
    /// update (gradient accumulation): `acc` is the sum of the earlier
    /// batches' (None for the first), and the result adds this batch's.
    pub fn backward_adding(&mut self, loss: &Tensor, acc: Option<Gradients>) -> Gradients {
        let Some(earlier) = acc else {
            return self.backward(loss);
        };
        if self.flat.is_none() {
            // The parameters' `.grad`s add up by themselves.
            loss.backward();
            return earlier;
        }
        // Not into the reused storage: `earlier` may be in it.
        match (earlier.0, self.backward_into(loss, false).0) {
            (Some(a), Some(b)) => Gradients(Some(a + b)),
            (a, b) => Gradients(a.or(b)),
        }
    }

    /// Lets `reduce` change the gradients `backward` computed, as one flat
    /// tensor (data-parallel training averages them across ranks): the
    /// fused mode's flat gradient itself, else the parameters' `.grad`s
    /// gathered into one and put back.
    pub fn reduce_gradients(
        &self,
        grads: &Gradients,
        reduce: impl FnOnce(&Tensor) -> Result<()>,
    ) -> Result<()> {
        if let Some(g) = &grads.0 {
            return reduce(g);
        }
        let gs: Vec<Tensor> = self
            .slots
            .iter()
            .map(|s| s.param.grad())
            .filter(|g| g.defined())
            .collect();
        let flat = Tensor::cat(&gs.iter().map(|g| g.reshape([-1])).collect::<Vec<_>>(), 0);
        reduce(&flat)?;
        let mut at = 0;
        for g in &gs {
            let n = g.numel() as i64;
            tch::no_grad(|| g.shallow_clone().copy_(&flat.narrow(0, at, n).view_as(g)));
            at += n;
        }
        Ok(())
    }

    /// The update for the gradients of `backward`. Fused, it is libtorch's
    /// multi-tensor kernel (`_fused_sgd_` / `_fused_adamw_`): one pass over
    /// the flat parameters, gradients and state. With loss scaling (fp16)
    /// the gradients are first unscaled and checked in one pass, and a step
    /// with non-finite ones leaves parameters and state as they were, all
    /// decided on the device.
    pub fn update(&mut self, grads: Gradients) -> Result<()> {
        let (Some(flat), Some(mut g)) = (&self.flat, grads.0) else {
            let _ = self.step.g_add_scalar_(1.0);
            self.advance_mu_product(None);
            let gs: Vec<Tensor> = self.slots.iter().map(|s| s.param.grad()).collect();
            let gs: Vec<Tensor> = gs.into_iter().filter(|g| g.defined()).collect();
            if let Some(f) = self.clip_factor(&gs) {
                tch::no_grad(|| gs.iter().for_each(|g| _ = g.shallow_clone().g_mul_(&f)));
            }
            if let Some(v) = self.clip_value {
                tch::no_grad(|| gs.iter().for_each(|g| _ = g.shallow_clone().clamp_(-v, v)));
            }
            self.step_per_parameter();
            return Ok(());
        };
        if g.kind() != flat.kind() {
            g = g.to_kind(flat.kind());
        }
        let found_inf = self.scaler.as_ref().map(|s| {
            let mut found = Tensor::zeros([], (Kind::Float, flat.device()));
            g.internal_amp_non_finite_check_and_unscale(&mut found, &s.scale.reciprocal());
            found
        });
        let per_parameter: Vec<Tensor> = match self.clip {
            Some(_) => self.slots.iter().map(|s| Self::view(&g, s)).collect(),
            None => Vec::new(),
        };
        if let Some(f) = self.clip_factor(&per_parameter) {
            let _ = g.g_mul_(&f);
        }
        if let Some(v) = self.clip_value {
            let _ = g.clamp_(-v, v);
        }
        let _ = match &found_inf {
            Some(found) => self.step.g_add_(&(-found + 1.0)),
            None => self.step.g_add_scalar_(1.0),
        };
        self.advance_mu_product(found_inf.as_ref());
        if !self.cfg.kind.is_fused() {
            self.update_flat(flat, g, found_inf.as_ref());
        } else {
            for group in &self.groups {
                self.update_group(group, flat, &g, found_inf.as_ref())?;
            }
        }
        if let (Some(s), Some(found)) = (&mut self.scaler, found_inf) {
            let _ = s.skipped.g_add_(&found.to_kind(Kind::Int64));
            let _ = s.scale.internal_amp_update_scale_(
                &s.tracker,
                &found,
                s.growth_factor,
                s.backoff_factor,
                s.growth_interval,
            );
        }
        Ok(())
    }

    fn counters(&self) -> Counters<'_> {
        Counters {
            lr: &self.lr,
            step: &self.step,
            mu_product: &self.mu_product,
        }
    }

    /// NAdam: multiplies in the momentum of the step just counted, unless
    /// fp16's `found_inf` says the step is skipped.
    fn advance_mu_product(&self, found_inf: Option<&Tensor>) {
        if self.cfg.kind != OptimizerKind::Nadam {
            return;
        }
        let mu = rules::nadam_mu(&self.cfg, &self.step.to_kind(Kind::Double));
        let next = &self.mu_product * mu.to_kind(Kind::Float);
        let next = match found_inf {
            Some(found) => next.where_self(&found.eq(0.0), &self.mu_product),
            None => next,
        };
        self.mu_product.shallow_clone().copy_(&next);
    }

    fn zero_grad(&mut self) {
        for s in &mut self.slots {
            let mut g = s.param.grad();
            if g.defined() {
                let _ = g.detach_().zero_();
            }
        }
    }

    fn step_per_parameter(&mut self) {
        let cfg = self.cfg.clone();
        tch::no_grad(|| {
            for s in &self.slots {
                let g = s.param.grad();
                if !g.defined() {
                    continue;
                }
                let mut state = [&self.buf1, &self.buf2, &self.buf3].map(|b| match b.numel() {
                    0 => b.shallow_clone(),
                    _ => Self::view(b, s),
                });
                let mut p = s.param.shallow_clone();
                let cfg = OptimizerConfig {
                    weight_decay: s.decay,
                    ..cfg.clone()
                };
                apply_update(&cfg, &self.counters(), &mut p, &g, &mut state);
            }
        });
    }
}
