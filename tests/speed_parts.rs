//! The CPU-testable parts of the GPU speed work: dynamic loss scaling skips
//! overflowing steps and adapts its scale; channels-last keeps values and
//! shapes; the fused flat-buffer optimizer matches the per-parameter SGD,
//! Adam, AdamW and RMSprop updates to 1e-6 (also channels-last) and its
//! state round-trips; both follow PyTorch's documented SGD (momentum,
//! Nesterov, weight decay), Adam, AdamW and RMSprop updates, computed
//! independently in f64, to 1e-6 (relative).

use tch::{Device, Kind, Tensor};
use vggctl::model::{Arch, Head, ModelSpec, Vgg};
use vggctl::model::{is_channels_last, to_channels_last};
use vggctl::optim::LossScaler;
use vggctl::optim::{DEFAULT_ALPHA, Optimizer, OptimizerConfig, OptimizerKind};

fn sgd(nesterov: bool) -> OptimizerConfig {
    OptimizerConfig {
        nesterov,
        ..OptimizerConfig::recipe_sgd()
    }
}

fn adamw() -> OptimizerConfig {
    adam(OptimizerKind::Adamw)
}

/// Adam (L2 weight decay) or AdamW (decoupled weight decay). Adam's
/// `eps` is 1e-3: its step is `g'/(|g'| + eps)` of a gradient `g' = g +
/// wd·p` that cancels to near zero for some of VGG's millions of weights,
/// where the last bit of `p` (which two ways of rounding an update leave
/// different) would move the step by up to `lr·1e-10/eps`, 5e-4 at 1e-8.
fn adam(kind: OptimizerKind) -> OptimizerConfig {
    OptimizerConfig {
        kind,
        momentum: 0.0,
        weight_decay: 0.05,
        nesterov: false,
        betas: (0.9, 0.999),
        eps: if kind == OptimizerKind::Adam {
            1e-3
        } else {
            1e-8
        },
        alpha: DEFAULT_ALPHA,
        norm_weight_decay: None,
        bias_weight_decay: None,
        amsgrad: false,
        centered: false,
        momentum_decay: 4e-3,
        decoupled_weight_decay: false,
        lr_decay: 0.0,
        initial_accumulator_value: 0.0,
        rho: 0.9,
    }
}

#[test]
fn an_overflowing_step_is_skipped_and_the_scale_adapts() {
    let flat = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]);
    let p = flat
        .narrow(0, 0, 4)
        .view([2, 2])
        .detach()
        .set_requires_grad(true);
    let mut opt = Optimizer::fused(sgd(false), vec![("w".into(), &p)], flat.shallow_clone());
    opt.enable_loss_scaling(&LossScaler {
        growth_interval: 3,
        ..LossScaler::default()
    });
    let before = flat.copy();
    let momentum = |o: &Optimizer| o.state_tensors()[0].1.copy();
    let zero_state = momentum(&opt);

    // Gradients of inf, then of NaN: no update, no momentum, the scale
    // halves each time; all decided on the device.
    for (bad, scale) in [(f64::INFINITY, 32768.0), (f64::NAN, 16384.0)] {
        let loss = (&p * bad).sum(Kind::Float);
        opt.backward_step(&loss, 0.1).unwrap();
        assert!(flat.equal(&before), "parameters changed on a skipped step");
        assert!(
            momentum(&opt).equal(&zero_state),
            "state changed on a skipped step"
        );
        assert_eq!(opt.loss_scaler().unwrap().scale, scale);
    }
    assert_eq!(opt.skipped(), 2);
    assert_eq!(opt.steps(), 0);

    // Clean steps: updates taken (gradients unscaled), growth after 3 of them.
    for i in 1..=3 {
        let loss = (&p * &p).sum(Kind::Float);
        opt.backward_step(&loss, 0.1).unwrap();
        let s = opt.loss_scaler().unwrap();
        assert_eq!(
            (s.scale, s.good_steps),
            if i < 3 { (16384.0, i) } else { (32768.0, 0) },
            "after {i} clean steps"
        );
    }
    assert_eq!(opt.steps(), 3);
    assert_eq!(opt.skipped(), 2);
    assert!(!flat.equal(&before));
    // The same updates as without scaling: gradients were unscaled.
    let mut q = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0])
        .view([2, 2])
        .set_requires_grad(true);
    let mut reference = Optimizer::new(sgd(false), vec![("w".into(), &q)]);
    for _ in 0..3 {
        reference
            .backward_step(&(&q * &q).sum(Kind::Float), 0.1)
            .unwrap();
    }
    let err = (&p - &q).abs().max().double_value(&[]);
    assert!(err < 1e-6, "{err}");
    let _ = &mut q;
}

#[test]
fn channels_last_keeps_values_and_shapes() {
    let x = Tensor::randn([2, 3, 8, 8], (Kind::Float, Device::Cpu));
    let y = to_channels_last(&x);
    assert_eq!(y.size(), x.size());
    assert!(is_channels_last(&y) && !is_channels_last(&x));
    assert!(y.equal(&x));
    tch::manual_seed(0);
    let mut m = Vgg::new(
        ModelSpec::new(Arch::Vgg11, true, Head::Cifar, 10),
        Device::Cpu,
    );
    let want = tch::no_grad(|| m.forward_t(&x.upsample_nearest2d([32, 32], None, None), false));
    m.to_channels_last();
    let conv = m.features.layers[0].1.shallow();
    if let vggctl::model::Layer::Conv { weight, .. } = conv {
        assert!(is_channels_last(&weight));
    }
    let got = tch::no_grad(|| {
        m.forward_t(
            &to_channels_last(&x.upsample_nearest2d([32, 32], None, None)),
            false,
        )
    });
    let err = (&got - &want).abs().max().double_value(&[]);
    assert!(err < 1e-5, "{err}");
}

/// A loss whose gradient is exactly `g` for every parameter: both
/// optimizers then see identical gradients, so any difference is the update's.
fn linear_loss(params: &[(String, &Tensor)], grads: &[Tensor]) -> Tensor {
    params
        .iter()
        .zip(grads)
        .map(|((_, p), g)| (*p * g).sum(Kind::Float))
        .fold(Tensor::from(0f32), |a, b| a + b)
}

/// Three updates of the same model with the same gradients, two ways,
/// each parameter with the weight decay `cfg` gives it.
fn compare(cfg: OptimizerConfig, channels_last: bool) {
    let spec = ModelSpec::new(Arch::Vgg11, true, Head::Cifar, 10);
    // Copies, not equal seeds: tests run in parallel threads that share
    // libtorch's generator.
    let a = Vgg::new(spec, Device::Cpu);
    let mut b = Vgg::new(spec, Device::Cpu);
    b.load_state_dict(
        "a",
        &a.state_dict().into_iter().collect(),
        vggctl::model::Values::FiniteOnly,
    )
    .unwrap();
    let flat = b.flatten_trainable(channels_last, None);
    let mut plain = Optimizer::new(cfg.clone(), a.trainable_parameters());
    let mut fused = Optimizer::fused(cfg.clone(), b.trainable_parameters(), flat);
    let norms = a.norm_parameter_names();
    for opt in [&mut plain, &mut fused] {
        opt.decay_by(|name| cfg.decay_of(name, norms.iter().any(|n| n == name)));
    }
    for _ in 0..3 {
        let grads: Vec<Tensor> = a
            .trainable_parameters()
            .iter()
            .map(|(_, p)| Tensor::randn(p.size(), (Kind::Float, Device::Cpu)) * 0.01)
            .collect();
        plain
            .backward_step(&linear_loss(&a.trainable_parameters(), &grads), 0.05)
            .unwrap();
        fused
            .backward_step(&linear_loss(&b.trainable_parameters(), &grads), 0.05)
            .unwrap();
    }
    for ((name, pa), (_, pb)) in a.parameters().iter().zip(b.parameters()) {
        let err = (*pa - pb).abs().max().double_value(&[]);
        assert!(err <= 1e-6, "{name}: {err}");
        if channels_last && pb.dim() == 4 {
            assert!(
                is_channels_last(pb),
                "{name} lost its NHWC strides in the update"
            );
        }
    }
    // The state saved per parameter is the same either way ...
    let saved: std::collections::BTreeMap<String, Tensor> =
        fused.state_tensors().into_iter().collect();
    for (name, t) in plain.state_tensors() {
        let err = (&t - &saved[&name]).abs().max().double_value(&[]);
        assert!(err <= 1e-6, "{name}: {err}");
    }
    // ... and loads back into a fresh fused optimizer exactly.
    let mut c = Vgg::new(spec, Device::Cpu);
    let flat = c.flatten_trainable(channels_last, None);
    let mut again = Optimizer::fused(cfg, c.trainable_parameters(), flat);
    again.load_state("test", &saved, 3).unwrap();
    for (k, t) in again.state_tensors() {
        assert!(t.equal(&saved[&k]), "{k} round trip");
    }
}

#[test]
fn fused_sgd_matches_per_parameter_sgd() {
    compare(sgd(false), false);
    compare(sgd(true), false);
}

/// RMSprop with momentum, a smoothing constant and an eps of its own; as
/// Adam's, its step `g'/(sqrt(v) + eps)` wants an eps well above the last
/// bit of a cancelled L2 gradient (see `adam`).
fn rmsprop(momentum: f64) -> OptimizerConfig {
    OptimizerConfig {
        kind: OptimizerKind::Rmsprop,
        momentum,
        alpha: 0.9,
        eps: 1e-3,
        ..adam(OptimizerKind::Adam)
    }
}

/// NAdam, RAdam or Adamax with Adam's eps of 1e-3 (see `adam`), betas of their
/// own (RAdam's rectified steps start at the 7th: 10 steps take both
/// branches), NAdam a momentum decay of its own.
fn adam_family(kind: OptimizerKind) -> OptimizerConfig {
    OptimizerConfig {
        kind,
        betas: (0.8, 0.95),
        momentum_decay: 0.01,
        ..adam(OptimizerKind::Adam)
    }
}

/// Each update rule, SGD with and without Nesterov, Adam and AdamW with
/// and without AMSGrad, RMSprop with and without momentum, and centered,
/// NAdam and RAdam, both also with decoupled weight decay, Adamax, Adagrad
/// and Adadelta.
fn every_rule() -> [OptimizerConfig; 16] {
    [
        sgd(false),
        sgd(true),
        adam(OptimizerKind::Adam),
        adamw(),
        OptimizerConfig {
            amsgrad: true,
            ..adam(OptimizerKind::Adam)
        },
        OptimizerConfig {
            amsgrad: true,
            ..adamw()
        },
        rmsprop(0.9),
        rmsprop(0.0),
        OptimizerConfig {
            centered: true,
            ..rmsprop(0.9)
        },
        adam_family(OptimizerKind::Nadam),
        adam_family(OptimizerKind::Radam),
        decoupled(OptimizerKind::Nadam),
        decoupled(OptimizerKind::Radam),
        adam_family(OptimizerKind::Adamax),
        adagrad(),
        adadelta(),
    ]
}

/// Adadelta with a rho of its own, at torch's LR scale (the tests' LR of
/// 0.05 times a step of about `sqrt(eps)`: a large eps so that it moves).
fn adadelta() -> OptimizerConfig {
    OptimizerConfig {
        kind: OptimizerKind::Adadelta,
        rho: 0.8,
        eps: 1e-2,
        ..adam(OptimizerKind::Adam)
    }
}

/// Adagrad with an LR decay and starting sums of its own, Adam's eps of
/// 1e-3 (see `adam`).
fn adagrad() -> OptimizerConfig {
    OptimizerConfig {
        kind: OptimizerKind::Adagrad,
        lr_decay: 0.5,
        initial_accumulator_value: 0.1,
        ..adam(OptimizerKind::Adam)
    }
}

/// NAdam or RAdam with decoupled weight decay (torch.optim's
/// `decoupled_weight_decay=True`).
fn decoupled(kind: OptimizerKind) -> OptimizerConfig {
    OptimizerConfig {
        decoupled_weight_decay: true,
        ..adam_family(kind)
    }
}

#[test]
fn fused_rmsprop_matches_per_parameter_rmsprop() {
    compare(rmsprop(0.9), false);
    compare(rmsprop(0.0), false);
    compare(rmsprop(0.9), true);
    compare(
        OptimizerConfig {
            centered: true,
            ..rmsprop(0.9)
        },
        false,
    );
}

#[test]
fn fused_adam_and_adamw_match_per_parameter_ones() {
    compare(adam(OptimizerKind::Adam), false);
    compare(adamw(), false);
    compare(
        OptimizerConfig {
            amsgrad: true,
            ..adamw()
        },
        false,
    );
}

/// NAdam, RAdam, Adamax and Adagrad, which have no libtorch kernel for
/// every device (NAdam also with decoupled weight decay): the flat update
/// equals the per-parameter one, the state (NAdam's product of momenta
/// too) saves and loads back.
#[test]
fn flat_updates_match_per_parameter_ones() {
    compare(adam_family(OptimizerKind::Nadam), false);
    compare(adam_family(OptimizerKind::Radam), true);
    compare(decoupled(OptimizerKind::Nadam), false);
    compare(adam_family(OptimizerKind::Adamax), true);
    compare(adagrad(), false);
    compare(adadelta(), true);
}

/// torchvision's parameter groups (`--norm-weight-decay`,
/// `--bias-weight-decay`): the fused update runs one kernel per group over
/// runs of the flat buffer that interleave, and equals the per-parameter
/// update (the SGD kernel given the base decay for every group fails it).
#[test]
fn fused_updates_by_weight_decay_group_match_per_parameter_ones() {
    for base in [
        sgd(true),
        adam(OptimizerKind::Adam),
        adamw(),
        rmsprop(0.9),
        adam_family(OptimizerKind::Nadam),
        decoupled(OptimizerKind::Radam),
    ] {
        let grouped = OptimizerConfig {
            weight_decay: 0.05,
            norm_weight_decay: Some(0.0),
            bias_weight_decay: Some(0.5),
            ..base
        };
        compare(grouped.clone(), false);
        compare(grouped, true);
    }
    let cfg = OptimizerConfig {
        norm_weight_decay: Some(0.0),
        bias_weight_decay: Some(0.5),
        ..sgd(false)
    };
    assert_eq!(cfg.decay_of("features.1.weight", true), 0.0);
    assert_eq!(cfg.decay_of("features.1.bias", true), 0.5);
    assert_eq!(cfg.decay_of("features.0.bias", false), 0.5);
    assert_eq!(cfg.decay_of("features.0.weight", false), 5e-4);
    let norm_only = OptimizerConfig {
        bias_weight_decay: None,
        ..cfg
    };
    assert_eq!(norm_only.decay_of("features.1.bias", true), 0.0);
    assert_eq!(norm_only.decay_of("classifier.0.bias", false), 5e-4);
}

#[test]
fn fused_channels_last_matches_contiguous() {
    compare(sgd(true), true);
}

/// PyTorch's documented SGD, Adam, AdamW, RMSprop, NAdam, RAdam, Adamax,
/// Adagrad and Adadelta updates, in f64, for one parameter vector.
fn reference_update(cfg: &OptimizerConfig, p0: &[f64], grads: &[Vec<f64>], lr: f64) -> Vec<f64> {
    let mut p = p0.to_vec();
    // Adagrad's sums start at its initial accumulator value.
    let start = match cfg.kind {
        OptimizerKind::Adagrad => cfg.initial_accumulator_value,
        _ => 0.0,
    };
    let (mut m, mut v) = (vec![0.0; p.len()], vec![start; p.len()]);
    // AMSGrad's largest second moment; centered RMSprop's gradient average;
    // Adamax's infinity norm; Adadelta's steps' average.
    let mut third = vec![0.0; p.len()];
    // NAdam's momentum of step t, and the product of those so far.
    let mu = |t: i32| cfg.betas.0 * (1.0 - 0.5 * 0.96f64.powf(t as f64 * cfg.momentum_decay));
    let mut mu_product = 1.0;
    for (t, g) in grads.iter().enumerate() {
        let t = (t + 1) as i32;
        mu_product *= mu(t);
        for i in 0..p.len() {
            match cfg.kind {
                OptimizerKind::Sgd => {
                    let d = g[i] + cfg.weight_decay * p[i];
                    m[i] = if t == 1 { d } else { cfg.momentum * m[i] + d };
                    let step = if cfg.nesterov {
                        d + cfg.momentum * m[i]
                    } else {
                        m[i]
                    };
                    p[i] -= lr * step;
                }
                OptimizerKind::Rmsprop => {
                    let g = g[i] + cfg.weight_decay * p[i];
                    v[i] = cfg.alpha * v[i] + (1.0 - cfg.alpha) * g * g;
                    let mut avg = v[i];
                    if cfg.centered {
                        third[i] = cfg.alpha * third[i] + (1.0 - cfg.alpha) * g;
                        avg -= third[i] * third[i];
                    }
                    let step = g / (avg.sqrt() + cfg.eps);
                    m[i] = cfg.momentum * m[i] + step;
                    p[i] -= lr * if cfg.momentum != 0.0 { m[i] } else { step };
                }
                OptimizerKind::Adagrad => {
                    let g = g[i] + cfg.weight_decay * p[i];
                    v[i] += g * g;
                    let clr = lr / (1.0 + (t - 1) as f64 * cfg.lr_decay);
                    p[i] -= clr * g / (v[i].sqrt() + cfg.eps);
                }
                OptimizerKind::Adadelta => {
                    let g = g[i] + cfg.weight_decay * p[i];
                    v[i] = cfg.rho * v[i] + (1.0 - cfg.rho) * g * g;
                    let delta = ((third[i] + cfg.eps) / (v[i] + cfg.eps)).sqrt() * g;
                    third[i] = cfg.rho * third[i] + (1.0 - cfg.rho) * delta * delta;
                    p[i] -= lr * delta;
                }
                OptimizerKind::Adam
                | OptimizerKind::Adamw
                | OptimizerKind::Nadam
                | OptimizerKind::Radam
                | OptimizerKind::Adamax => {
                    let (b1, b2) = cfg.betas;
                    let mut g = g[i];
                    if cfg.kind == OptimizerKind::Adamw || cfg.decoupled_weight_decay {
                        p[i] *= 1.0 - lr * cfg.weight_decay;
                    } else {
                        g += cfg.weight_decay * p[i];
                    }
                    m[i] = b1 * m[i] + (1.0 - b1) * g;
                    v[i] = b2 * v[i] + (1.0 - b2) * g * g;
                    let (bc1, bc2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
                    p[i] -= match cfg.kind {
                        OptimizerKind::Nadam => {
                            let denom = (v[i] / bc2).sqrt() + cfg.eps;
                            let next = mu(t + 1);
                            lr * (1.0 - mu(t)) / (1.0 - mu_product) * g / denom
                                + lr * next / (1.0 - mu_product * next) * m[i] / denom
                        }
                        OptimizerKind::Radam => {
                            let rho_inf = 2.0 / (1.0 - b2) - 1.0;
                            let rho = rho_inf - 2.0 * t as f64 * b2.powi(t) / bc2;
                            let rect = ((rho - 4.0) * (rho - 2.0) * rho_inf
                                / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho))
                                .sqrt();
                            let adaptive = if rho > 5.0 {
                                rect * bc2.sqrt() / (v[i].sqrt() + cfg.eps)
                            } else {
                                1.0
                            };
                            lr * m[i] / bc1 * adaptive
                        }
                        OptimizerKind::Adamax => {
                            // The infinity norm in place of the second moment.
                            third[i] = (b2 * third[i]).max(g.abs() + cfg.eps);
                            lr / bc1 * m[i] / third[i]
                        }
                        _ => {
                            third[i] = third[i].max(v[i]);
                            let second = if cfg.amsgrad { third[i] } else { v[i] };
                            lr / bc1 * m[i] / (second.sqrt() / bc2.sqrt() + cfg.eps)
                        }
                    };
                }
            }
        }
    }
    p
}

#[test]
fn updates_follow_pytorchs_documented_rules() {
    let p0 = [0.5, -1.25, 2.0, 0.0, 3.5, -0.75];
    let grads: Vec<Vec<f64>> = (0..10)
        .map(|t| {
            (0..p0.len())
                .map(|i| ((i * 7 + t * 3) % 11) as f64 / 10.0 - 0.5)
                .collect()
        })
        .collect();
    for cfg in every_rule() {
        let want = reference_update(&cfg, &p0, &grads, 0.05);
        for fused in [false, true] {
            let flat = Tensor::from_slice(&p0.map(|x| x as f32));
            let p = flat.view([2, 3]).detach().set_requires_grad(true);
            let mut opt = if fused {
                Optimizer::fused(cfg.clone(), vec![("w".into(), &p)], flat.shallow_clone())
            } else {
                Optimizer::new(cfg.clone(), vec![("w".into(), &p)])
            };
            for g in &grads {
                let g = Tensor::from_slice(&g.iter().map(|&x| x as f32).collect::<Vec<_>>())
                    .view([2, 3]);
                opt.backward_step(&(&p * &g).sum(Kind::Float), 0.05)
                    .unwrap();
            }
            let got: Vec<f32> = Vec::try_from(p.detach().reshape([-1])).unwrap();
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                // f32 arithmetic: 1e-6 relative to the value.
                assert!(
                    (*g as f64 - w).abs() <= 1e-6 * w.abs().max(1.0),
                    "{:?} fused={fused} [{i}]: {g} vs {w}",
                    cfg.kind
                );
            }
        }
    }
}

#[test]
fn a_skipped_step_leaves_parameters_and_state_bit_for_bit() {
    // After clean steps the state is not zero (a momentum buffer of zeros
    // would hide a decay applied on a skipped step); weight decay is on.
    for cfg in every_rule() {
        let flat = Tensor::from_slice(&[0.5f32, -1.0, 2.0, 0.25, 3.0, -0.75]);
        let p = flat.view([2, 3]).detach().set_requires_grad(true);
        let mut opt = Optimizer::fused(cfg.clone(), vec![("w".into(), &p)], flat.shallow_clone());
        opt.enable_loss_scaling(&LossScaler::default());
        for _ in 0..2 {
            opt.backward_step(&(&p * &p * &p).sum(Kind::Float), 0.05)
                .unwrap();
        }
        let snapshot = |o: &Optimizer| -> Vec<Tensor> {
            let mut v = vec![flat.copy()];
            v.extend(o.state_tensors().into_iter().map(|(_, t)| t.copy()));
            v
        };
        let before = snapshot(&opt);
        assert!(
            before[1..]
                .iter()
                .all(|t| t.abs().min().double_value(&[]) > 0.0),
            "{:?}: state should be non-zero before the skip",
            cfg.kind
        );
        for bad in [f64::INFINITY, f64::NAN, f64::NEG_INFINITY] {
            opt.backward_step(&(&p * bad).sum(Kind::Float), 0.05)
                .unwrap();
            for (now, was) in snapshot(&opt).iter().zip(&before) {
                assert!(now.equal(was), "{:?}: changed on a skipped step", cfg.kind);
            }
        }
        assert_eq!((opt.steps(), opt.skipped()), (2, 3), "{:?}", cfg.kind);
    }
}

#[test]
fn a_skipped_step_does_not_count_for_adam_either() {
    // 3 clean steps after an overflow equal 3 steps without scaling (Adam's
    // bias correction would differ if the skipped step were counted).
    for cfg in [sgd(true), adam(OptimizerKind::Adam), adamw()] {
        let run = |scaled: bool| {
            let flat = Tensor::from_slice(&[0.5f32, -1.0, 2.0, 0.25]);
            let p = flat.view([2, 2]).detach().set_requires_grad(true);
            let mut opt =
                Optimizer::fused(cfg.clone(), vec![("w".into(), &p)], flat.shallow_clone());
            if scaled {
                opt.enable_loss_scaling(&LossScaler::default());
                opt.backward_step(&(&p * f64::INFINITY).sum(Kind::Float), 0.05)
                    .unwrap();
            }
            for _ in 0..3 {
                opt.backward_step(&(&p * &p * &p).sum(Kind::Float), 0.05)
                    .unwrap();
            }
            assert_eq!(opt.steps(), 3);
            flat
        };
        let err = (run(true) - run(false)).abs().max().double_value(&[]);
        assert!(err <= 1e-6, "{:?}: {err}", cfg.kind);
    }
}
