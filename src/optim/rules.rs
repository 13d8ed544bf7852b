//! Each update rule's arithmetic, op by op, on one parameter or on a flat
//! buffer of them: SGD, RMSprop, Adam, AdamW, NAdam, RAdam, Adamax, Adagrad and Adadelta (see the module above for
//! where each runs). A new rule's formula goes here; its state's saved
//! names in `saved`, its options' checks in `config`.

use tch::{Kind, Tensor};

use super::{OptimizerConfig, OptimizerKind};

/// What an update reads besides the parameters, gradients and their state:
/// 0-dim tensors on the parameters' device, so that a captured CUDA graph
/// reads their current values.
pub(super) struct Counters<'a> {
    pub lr: &'a Tensor,
    /// Updates taken, this one included (Adam's bias corrections).
    pub step: &'a Tensor,
    /// NAdam's product of the momenta so far, this update's included.
    pub mu_product: &'a Tensor,
}

/// One update of `p` with gradient `g` and its state (`buf1`, `buf2`,
/// `buf3` of [`super::Optimizer`], or views of them), op by op: the per-parameter
/// reference the fused kernels are tested against.
pub(super) fn apply_update(
    cfg: &OptimizerConfig,
    c: &Counters,
    p: &mut Tensor,
    g: &Tensor,
    state: &mut [Tensor; 3],
) {
    let [b1, b2, b3] = state;
    let lr = c.lr;
    match cfg.kind {
        OptimizerKind::Sgd => {
            let mut d = with_l2(g, p, cfg.weight_decay);
            if cfg.momentum != 0.0 {
                let _ = b1.g_mul_scalar_(cfg.momentum).g_add_(&d);
                d = if cfg.nesterov {
                    &d + &*b1 * cfg.momentum
                } else {
                    b1.shallow_clone()
                };
            }
            let _ = p.g_sub_(&(d * lr));
        }
        OptimizerKind::Rmsprop => {
            let g = with_l2(g, p, cfg.weight_decay);
            let _ = b1
                .g_mul_scalar_(cfg.alpha)
                .g_add_(&(&g * &g * (1.0 - cfg.alpha)));
            let avg = match cfg.centered {
                true => {
                    let _ = b3
                        .g_mul_scalar_(cfg.alpha)
                        .g_add_(&(&g * (1.0 - cfg.alpha)));
                    (&*b1 - &*b3 * &*b3).sqrt() + cfg.eps
                }
                false => b1.sqrt() + cfg.eps,
            };
            let d = if cfg.momentum != 0.0 {
                let _ = b2.g_mul_scalar_(cfg.momentum).g_add_(&(&g / &avg));
                b2.shallow_clone()
            } else {
                &g / &avg
            };
            let _ = p.g_sub_(&(d * lr));
        }
        OptimizerKind::Adam | OptimizerKind::Adamw => adam(cfg, c, p, g, [b1, b2, b3]),
        OptimizerKind::Nadam | OptimizerKind::Radam => {
            // Adam's moments (as torch.optim's NAdam and RAdam update
            // them), then each rule's step.
            let g = match cfg.decoupled_weight_decay {
                true => {
                    let _ = p.g_mul_(&(lr * -cfg.weight_decay + 1.0));
                    g.shallow_clone()
                }
                false => with_l2(g, p, cfg.weight_decay),
            };
            let (beta1, beta2) = cfg.betas;
            let _ = b1.lerp_(&g, 1.0 - beta1);
            let _ = b2.g_mul_scalar_(beta2).g_add_(&(&g * &g * (1.0 - beta2)));
            let t = c.step.to_kind(Kind::Double);
            match cfg.kind {
                OptimizerKind::Nadam => nadam(cfg, c, &t, p, &g, [b1, b2]),
                _ => radam(cfg, c, &t, p, [b1, b2]),
            }
        }
        OptimizerKind::Adamax => adamax(cfg, c, p, g, [b1, b2]),
        OptimizerKind::Adagrad => adagrad(cfg, c, p, g, b1),
        OptimizerKind::Adadelta => adadelta(cfg, c, p, g, [b1, b2]),
    }
}

/// torch.optim.Adamax's step: the first moment as Adam's, the second the
/// largest of the decayed last one and `|g| + eps` (the infinity norm),
/// the step `lr / (1 - beta1^t)` along their quotient.
fn adamax(
    cfg: &OptimizerConfig,
    c: &Counters,
    p: &mut Tensor,
    g: &Tensor,
    [b1, b2]: [&mut Tensor; 2],
) {
    let g = with_l2(g, p, cfg.weight_decay);
    let (beta1, beta2) = cfg.betas;
    let _ = b1.lerp_(&g, 1.0 - beta1);
    let largest = b2.g_mul_scalar_(beta2).maximum(&(g.abs() + cfg.eps));
    b2.copy_(&largest);
    // The bias correction in f64, as PyTorch's Python float.
    let bc1 = -Tensor::pow_scalar(beta1, &c.step.to_kind(Kind::Double)) + 1.0;
    let step_size = (c.lr.to_kind(Kind::Double) / bc1).to_kind(p.kind());
    let _ = p.g_sub_(&(&*b1 / &*b2 * step_size));
}

/// torch.optim.Adam's step (the weight decay an L2 term) or AdamW's
/// (decoupled), optionally AMSGrad's (`max_exp_avg_sq` the largest second
/// moment so far).
fn adam(
    cfg: &OptimizerConfig,
    c: &Counters,
    p: &mut Tensor,
    g: &Tensor,
    [b1, b2, b3]: [&mut Tensor; 3],
) {
    let (lr, step) = (c.lr, c.step);
    let (beta1, beta2) = cfg.betas;
    let g = if cfg.kind == OptimizerKind::Adamw {
        let _ = p.g_mul_(&(lr * -cfg.weight_decay + 1.0));
        g.shallow_clone()
    } else {
        g + &*p * cfg.weight_decay
    };
    let _ = b1.g_mul_scalar_(beta1).g_add_(&(&g * (1.0 - beta1)));
    let _ = b2.g_mul_scalar_(beta2).g_add_(&(&g * &g * (1.0 - beta2)));
    // The bias corrections in f64, as libtorch's kernels compute
    // them: in f32, 1 - 0.999 loses five digits to cancellation.
    let t = step.to_kind(Kind::Double);
    let bc1 = -Tensor::pow_scalar(beta1, &t) + 1.0;
    let bc2 = -Tensor::pow_scalar(beta2, &t) + 1.0;
    let step_size = (lr.to_kind(Kind::Double) / bc1).to_kind(p.kind());
    let second = match cfg.amsgrad {
        true => {
            let largest = b3.maximum(b2);
            b3.copy_(&largest);
            b3.shallow_clone()
        }
        false => b2.shallow_clone(),
    };
    let denom = second.sqrt() / bc2.sqrt().to_kind(p.kind()) + cfg.eps;
    let _ = p.g_sub_(&(&*b1 / denom * step_size));
}

/// torch.optim.Adagrad's step: the squared gradients' `sum`, and update
/// t's learning rate `lr / (1 + (t − 1)·lr_decay)` in f64, as PyTorch's
/// Python floats.
fn adagrad(cfg: &OptimizerConfig, c: &Counters, p: &mut Tensor, g: &Tensor, sum: &mut Tensor) {
    let g = with_l2(g, p, cfg.weight_decay);
    let _ = sum.g_add_(&(&g * &g));
    let t = c.step.to_kind(Kind::Double);
    let clr = c.lr.to_kind(Kind::Double) / ((t - 1.0) * cfg.lr_decay + 1.0);
    let _ = p.g_sub_(&(&g / (sum.sqrt() + cfg.eps) * clr.to_kind(p.kind())));
}

/// torch.optim.Adadelta's step: the squared gradients' average, the step
/// the gradient times the root of the past steps' average over the root
/// of that one, then the steps' average.
fn adadelta(
    cfg: &OptimizerConfig,
    c: &Counters,
    p: &mut Tensor,
    g: &Tensor,
    [square_avg, acc_delta]: [&mut Tensor; 2],
) {
    let g = with_l2(g, p, cfg.weight_decay);
    let rho = cfg.rho;
    let _ = square_avg
        .g_mul_scalar_(rho)
        .g_add_(&(&g * &g * (1.0 - rho)));
    let std = (&*square_avg + cfg.eps).sqrt();
    let delta = (&*acc_delta + cfg.eps).sqrt() / std * &g;
    let _ = acc_delta
        .g_mul_scalar_(rho)
        .g_add_(&(&delta * &delta * (1.0 - rho)));
    let _ = p.g_sub_(&(delta * c.lr));
}

/// `g` plus the L2 term of weight decay `wd` (none at 0).
fn with_l2(g: &Tensor, p: &Tensor, wd: f64) -> Tensor {
    match wd {
        0.0 => g.shallow_clone(),
        wd => g + p * wd,
    }
}

/// NAdam's momentum at step `t` (f64): `beta1·(1 − 0.96^(tψ)/2)`.
pub(super) fn nadam_mu(cfg: &OptimizerConfig, t: &Tensor) -> Tensor {
    let decayed = Tensor::pow_scalar(0.96, &(t * cfg.momentum_decay));
    (decayed * -0.5 + 1.0) * cfg.betas.0
}

/// torch.optim.NAdam's step at step `t` (f64), after the moments: one
/// along the gradient `g` (its L2 term in) weighted by this step's
/// momentum and one along the first moment weighted by the next's, each
/// over the bias-corrected root second moment. The coefficients in f64,
/// as PyTorch's are Python floats.
fn nadam(
    cfg: &OptimizerConfig,
    c: &Counters,
    t: &Tensor,
    p: &mut Tensor,
    g: &Tensor,
    [exp_avg, exp_avg_sq]: [&mut Tensor; 2],
) {
    let kind = p.kind();
    let bc2 = -Tensor::pow_scalar(cfg.betas.1, t) + 1.0;
    let (mu, mu_next) = (nadam_mu(cfg, t), nadam_mu(cfg, &(t + 1.0)));
    let product = c.mu_product.to_kind(Kind::Double);
    let lr = c.lr.to_kind(Kind::Double);
    let along_grad = (-&lr * (-mu + 1.0) / (-&product + 1.0)).to_kind(kind);
    let along_avg = (-lr * &mu_next / (-(product * mu_next) + 1.0)).to_kind(kind);
    let denom = (&*exp_avg_sq / bc2.to_kind(kind)).sqrt() + cfg.eps;
    let _ = p.g_add_(&(g / &denom * along_grad));
    let _ = p.g_add_(&(&*exp_avg / &denom * along_avg));
}

/// torch.optim.RAdam's step at step `t` (f64), after the moments: while
/// the approximated simple moving average's length `rho_t` is 5 or less,
/// the bias-corrected first moment alone (SGD with momentum), then Adam's
/// step times the variance rectification. Decided on the device (`where`),
/// as PyTorch's capturable form does.
fn radam(
    cfg: &OptimizerConfig,
    c: &Counters,
    t: &Tensor,
    p: &mut Tensor,
    [exp_avg, exp_avg_sq]: [&mut Tensor; 2],
) {
    let (beta1, beta2) = cfg.betas;
    let kind = p.kind();
    let beta2_t = Tensor::pow_scalar(beta2, t);
    let bc1 = -Tensor::pow_scalar(beta1, t) + 1.0;
    let bc2 = -&beta2_t + 1.0;
    let rho_inf = 2.0 / (1.0 - beta2) - 1.0;
    let rho_t = -(t * 2.0 * beta2_t / &bc2) + rho_inf;
    let rect = ((&rho_t - 4.0) * (&rho_t - 2.0) * rho_inf
        / (&rho_t * ((rho_inf - 4.0) * (rho_inf - 2.0))))
        .sqrt();
    let adaptive = (exp_avg_sq.sqrt() + cfg.eps).reciprocal() * bc2.sqrt().to_kind(kind);
    let scale = (adaptive * rect.to_kind(kind)).where_scalarother(&rho_t.gt(5.0), 1.0);
    let step_size = (c.lr.to_kind(Kind::Double) / bc1).to_kind(kind);
    let _ = p.g_sub_(&(&*exp_avg * step_size * scale));
}
