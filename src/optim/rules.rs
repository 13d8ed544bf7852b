//! Each update rule's arithmetic, op by op, on one parameter or on a flat
//! buffer of them: SGD, RMSprop, Adam and AdamW (see the module above for
//! where each runs). A new rule's formula goes here; its state's saved
//! names in `saved`, its options' checks in `config`.

use tch::{Kind, Tensor};

use super::{OptimizerConfig, OptimizerKind};

/// One update of `p` with gradient `g` and its state (`buf1`, `buf2`,
/// `buf3` of [`super::Optimizer`], or views of them), op by op: the per-parameter
/// reference the fused kernels are tested against. The learning rate and
/// the step number are 0-dim tensors on the parameters' device.
pub(super) fn apply_update(
    cfg: &OptimizerConfig,
    lr: &Tensor,
    step: &Tensor,
    p: &mut Tensor,
    g: &Tensor,
    state: &mut [Tensor; 3],
) {
    let [b1, b2, b3] = state;
    match cfg.kind {
        OptimizerKind::Sgd => {
            let mut d = if cfg.weight_decay != 0.0 {
                g + &*p * cfg.weight_decay
            } else {
                g.shallow_clone()
            };
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
            let g = match cfg.weight_decay {
                0.0 => g.shallow_clone(),
                wd => g + &*p * wd,
            };
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
        OptimizerKind::Adam | OptimizerKind::Adamw => {
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
    }
}
