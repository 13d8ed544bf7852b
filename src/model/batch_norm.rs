//! BatchNorm as torchvision's BatchNorm2d computes it, on one process's
//! batch or over every rank's batches together (SyncBatchNorm).

use std::sync::Arc;

use tch::{Kind, Tensor};

/// BatchNorm2d's `eps`, torchvision's for every VGG.
pub const BN_EPS: f64 = 1e-5;
/// BatchNorm2d's default `momentum` of the running statistics.
pub const BN_MOMENTUM: f64 = 0.1;

/// torchvision's BatchNorm2d on `x` (training mode: batch statistics,
/// the running ones updated; else the running ones).
pub fn batch_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    train: bool,
) -> Tensor {
    let stats = [running_mean, running_var];
    batch_norm_moving(x, [weight, bias], stats, train, BN_MOMENTUM)
}

/// [`batch_norm`] whose running statistics move by `momentum` toward the
/// batch's in training mode (torch's cumulative average is 1/n at the
/// n-th batch).
pub fn batch_norm_moving(
    x: &Tensor,
    [weight, bias]: [&Tensor; 2],
    [running_mean, running_var]: [&Tensor; 2],
    train: bool,
    momentum: f64,
) -> Tensor {
    Tensor::batch_norm(
        x,
        Some(weight),
        Some(bias),
        Some(running_mean),
        Some(running_var),
        train,
        momentum,
        BN_EPS,
        true,
    )
}

/// A differentiable sum over the ranks of a data-parallel run (what
/// `dist::World::sum_across` gives).
pub type SumAcross = Arc<dyn Fn(&Tensor) -> Tensor + Send + Sync>;

/// Training-mode BatchNorm over all ranks' batches together (PyTorch's
/// SyncBatchNorm): mean and biased variance from sums taken across the
/// ranks by `sum` (two passes, in fp32), the running statistics moved by
/// `m` toward them (the variance unbiased over the global count).
pub(super) fn sync_batch_norm(
    x: &Tensor,
    [weight, bias]: [&Tensor; 2],
    [running_mean, running_var]: [&Tensor; 2],
    sum: &SumAcross,
    m: f64,
) -> Tensor {
    let c = x.size()[1];
    let per_channel = |t: &Tensor| t.sum_dim_intlist(&[0i64, 2, 3][..], false, Kind::Float);
    let xf = x.to_kind(Kind::Float);
    let local = Tensor::from_slice(&[(x.numel() as i64 / c) as f32]).to_device(x.device());
    let sums = sum(&Tensor::cat(&[per_channel(&xf), local], 0));
    let n = sums.narrow(0, c, 1);
    let mean = sums.narrow(0, 0, c) / &n;
    let centered = xf - mean.view([1, c, 1, 1]);
    let var = sum(&per_channel(&centered.square())) / &n;
    let scale = (&var + BN_EPS).rsqrt() * weight;
    let y = centered * scale.view([1, c, 1, 1]) + bias.view([1, c, 1, 1]);
    tch::no_grad(|| {
        let unbiased = var.detach() * &n / (&n - 1.0);
        let _ = running_mean
            .shallow_clone()
            .g_mul_scalar_(1.0 - m)
            .g_add_(&(mean.detach() * m));
        let _ = running_var
            .shallow_clone()
            .g_mul_scalar_(1.0 - m)
            .g_add_(&(unbiased * m));
    });
    y.to_kind(x.kind())
}
