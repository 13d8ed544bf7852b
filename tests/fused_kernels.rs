//! The fused step's kernels of vggctl's own (issue #18, src/kernels.cu),
//! checked on the CPU, where the shim runs the very kernel source the GPU
//! compiles, thread by thread: BatchNorm+ReLU, and BatchNorm+ReLU+max-pool,
//! as one operation against libtorch's plain ops in fp16 (output, running
//! statistics and gradients), ties and odd sizes included; a model's layers
//! fused with them against the plain layers; the ReLU and bias gradients
//! without BatchNorm; and NVRTC compiling the kernels for each GPU
//! generation libtorch 2.11 supports, as a GPU run does on first use.

use std::cell::Cell;

use tch::{Device, Kind, Tensor};
use vggctl::model::{BN_EPS, BN_MOMENTUM, Layer, Sequential, batch_norm, to_channels_last};
use vggctl::shim::step::FusedBn;

/// libtorch's generator is the process's: each test holds this while it
/// seeds and draws.
static SEEDED: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn seeded(seed: i64) -> std::sync::MutexGuard<'static, ()> {
    let guard = SEEDED.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(seed);
    guard
}

const F32: (Kind, Device) = (Kind::Float, Device::Cpu);

/// `max|t|`, in fp32.
fn max_abs(t: &Tensor) -> f64 {
    t.to_kind(Kind::Float).abs().max().double_value(&[])
}

/// `max|a - b| / max|b|`, in fp32.
fn rel(a: &Tensor, b: &Tensor) -> f64 {
    max_abs(&(a.to_kind(Kind::Float) - b.to_kind(Kind::Float))) / max_abs(b).max(1e-30)
}

/// What one BatchNorm+ReLU (+max-pool for `FusedBn::OwnPool`) computes on a
/// copy of `x`, as `op` (`fused`) or as the plain ops: the output, the
/// running mean and variance after it, and the gradients of `sum(out * dy)`
/// for x, the weight and the bias.
struct Ran {
    out: Tensor,
    running: [Tensor; 2],
    grads: Vec<Tensor>,
}

fn run(x: &Tensor, [weight, bias]: [&Tensor; 2], dy: &Tensor, op: FusedBn, fused: bool) -> Ran {
    let leaves = [x, weight, bias].map(|t| t.copy().set_requires_grad(true));
    let running = [Tensor::zeros_like(weight), Tensor::ones_like(weight)];
    let [x, w, b] = &leaves;
    let [mean, var] = &running;
    let out = match fused {
        true => op
            .run(x, [w, b], [mean, var], BN_MOMENTUM, BN_EPS)
            .expect("the fused operation runs on the CPU"),
        false => {
            let y = batch_norm(x, w, b, mean, var, true).relu();
            match op {
                FusedBn::OwnPool => y.max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false),
                _ => y,
            }
        }
    };
    let loss = (out.to_kind(Kind::Float) * dy).sum(Kind::Float);
    let grads = Tensor::run_backward(&[loss], &leaves, false, false);
    Ran {
        out,
        running,
        grads,
    }
}

/// Checks the fused operation `op` against the plain fp16 ops on `x`: the
/// output in fp16's layout and dtype and the input's gradient within 1e-3
/// of their largest value (an fp16 ulp: the two may round BatchNorm's
/// transform a little apart; measured here: equal, and up to 2.6e-7), the
/// running statistics and the parameters' gradients within 1e-5 (measured:
/// equal, and up to 3.0e-7). A gradient routed to another position of a
/// window, or a BatchNorm term off by 1 %, misses by far more (0.3 to 1;
/// 1e-2).
fn assert_fused_is_plain(x: &Tensor, weight: &Tensor, bias: &Tensor, op: FusedBn) {
    let s = x.size();
    let k = if op == FusedBn::OwnPool { 2 } else { 1 };
    let dy = Tensor::randn([s[0], s[1], s[2] / k, s[3] / k], F32);
    let params = [weight, bias];
    let (got, want) = (
        run(x, params, &dy, op, true),
        run(x, params, &dy, op, false),
    );
    assert_eq!(got.out.size(), want.out.size(), "{s:?}");
    assert_eq!(got.out.kind(), Kind::Half);
    assert!(vggctl::model::is_channels_last(&got.out));
    assert!(
        rel(&got.out, &want.out) <= 1e-3,
        "output {s:?}: {}",
        rel(&got.out, &want.out)
    );
    for (i, (g, w)) in got.running.iter().zip(&want.running).enumerate() {
        assert!(
            rel(g, w) <= 1e-5,
            "running statistic {i} {s:?}: {}",
            rel(g, w)
        );
    }
    let tolerance = [1e-3, 1e-5, 1e-5];
    for (i, (g, w)) in got.grads.iter().zip(&want.grads).enumerate() {
        assert_eq!(g.kind(), w.kind(), "gradient {i}");
        assert!(
            rel(g, w) <= tolerance[i],
            "gradient {i} {s:?}: {}",
            rel(g, w)
        );
    }
}

fn half_channels_last(x: &Tensor) -> Tensor {
    to_channels_last(x).to_kind(Kind::Half)
}

/// On batches of several shapes (odd heights and widths lose their last
/// row and column, as max_pool2d's floor mode does; 2x2 is one window),
/// with weights of both signs, each fused operation of vggctl's kernels
/// (with the pool and without) is the plain ops.
#[test]
fn batchnorm_relu_with_and_without_the_pool_is_the_plain_fp16_ops_with_their_gradients() {
    let _seeded = seeded(3);
    for op in [FusedBn::OwnPool, FusedBn::Own] {
        for shape in [[3, 8, 6, 10], [2, 12, 5, 7], [4, 4, 2, 2]] {
            let x = half_channels_last(&(Tensor::randn(shape, F32) * 2.0 + 0.5));
            let c = shape[1];
            let weight = Tensor::randn([c], F32);
            let bias = Tensor::randn([c], F32) * 0.5;
            assert_fused_is_plain(&x, &weight, &bias, op);
        }
    }
}

/// Where a window holds equal values (small integers: ties everywhere),
/// the gradient goes where max_pool2d sends it, the first maximum; a window
/// that ReLU zeroed passes no gradient.
#[test]
fn batchnorm_relu_pool_breaks_ties_as_max_pool_does() {
    let _seeded = seeded(4);
    let x = half_channels_last(&Tensor::randint(3, [4, 8, 6, 6], F32));
    let weight = Tensor::randn([8], F32);
    let bias = Tensor::randn([8], F32) * 0.1;
    assert_fused_is_plain(&x, &weight, &bias, FusedBn::OwnPool);
}

/// A stack of conv, BatchNorm, ReLU, max-pool (twice, then once without a
/// pool) with `bn_relu_pool` and vggctl's BatchNorm+ReLU where no pool
/// follows: training-mode output and every parameter's
/// gradient are the plain layers' within 1e-3 (an fp16 ulp; measured: up
/// to 2.6e-7), the running statistics within 1e-5, each BatchNorm is
/// counted once, and no fused operation failed (a silent fallback to the
/// plain ops would pass the rest). A convolution's bias before BatchNorm
/// has gradient 0 in exact arithmetic (the normalization removes it): its
/// fp16 gradient is rounding noise, whose digits change with libtorch's
/// reduction order (its thread count: 2.2e-3 of itself apart at one
/// thread, 0 at two), so it is measured against its convolution's weight
/// gradient instead.
#[test]
fn layers_fused_with_the_pool_train_as_the_plain_layers() {
    let _seeded = seeded(5);
    let conv = |cin: i64, cout: i64| Layer::Conv {
        weight: to_channels_last(&(Tensor::randn([cout, cin, 3, 3], F32) * 0.3))
            .to_kind(Kind::Half),
        bias: (Tensor::randn([cout], F32) * 0.1).to_kind(Kind::Half),
    };
    let bn = |c: i64| Layer::BatchNorm {
        weight: Tensor::rand([c], F32) + 0.5,
        bias: Tensor::randn([c], F32) * 0.1,
        running_mean: Tensor::zeros([c], F32),
        running_var: Tensor::ones([c], F32),
        num_batches_tracked: Cell::new(0),
    };
    let stack = || {
        let layers = vec![
            conv(4, 8),
            bn(8),
            Layer::Relu,
            Layer::MaxPool,
            conv(8, 8),
            bn(8),
            Layer::Relu,
            Layer::MaxPool,
            conv(8, 8),
            bn(8),
            Layer::Relu,
        ];
        Sequential::new(
            layers
                .into_iter()
                .enumerate()
                .map(|(i, l)| (i.to_string(), l))
                .collect(),
        )
    };
    let x = half_channels_last(&Tensor::randn([3, 4, 12, 12], F32));
    let dy = Tensor::randn([3, 8, 3, 3], F32);
    tch::manual_seed(6);
    let plain = stack();
    tch::manual_seed(6);
    let mut fused = stack();
    fused.bn_relu_pool = true;
    fused.bn_relu = Some(FusedBn::Own);
    let ran = |s: &Sequential| {
        let params: Vec<Tensor> = s
            .layers
            .iter()
            .flat_map(|(_, l)| match l {
                Layer::Conv { weight, bias } | Layer::BatchNorm { weight, bias, .. } => {
                    vec![weight.set_requires_grad(true), bias.set_requires_grad(true)]
                }
                _ => vec![],
            })
            .collect();
        let y = s.forward_t(&x, true);
        let loss = (y.to_kind(Kind::Float) * &dy).sum(Kind::Float);
        (y, Tensor::run_backward(&[loss], &params, false, false))
    };
    let ((y, got), (want_y, want)) = (ran(&fused), ran(&plain));
    assert_eq!(fused.take_fusion_failure(), None);
    assert!(rel(&y, &want_y) <= 1e-3, "output: {}", rel(&y, &want_y));
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        // Per block: the convolution's weight and bias, BatchNorm's weight and bias.
        let scale = if i % 4 == 1 { &want[i - 1] } else { w };
        let err =
            max_abs(&(g.to_kind(Kind::Float) - w.to_kind(Kind::Float))) / max_abs(scale).max(1e-30);
        assert!(err <= 1e-3, "gradient {i}: {err}");
    }
    for ((_, a), (_, b)) in fused.layers.iter().zip(&plain.layers) {
        if let (
            Layer::BatchNorm {
                running_mean: m1,
                running_var: v1,
                num_batches_tracked: n1,
                ..
            },
            Layer::BatchNorm {
                running_mean: m2,
                running_var: v2,
                num_batches_tracked: n2,
                ..
            },
        ) = (a, b)
        {
            assert!(rel(m1, m2) <= 1e-5 && rel(v1, v2) <= 1e-5);
            assert_eq!((n1.get(), n2.get()), (1, 1));
        }
    }
}

/// What the operations refuse, with an error and their statistics
/// untouched (the model then runs the plain ops): fp32 batches, NCHW fp16
/// batches, fp16 parameters, a batch narrower than one window (the pool's).
#[test]
fn batchnorm_relu_with_its_kernels_refuses_what_they_do_not_run() {
    let _seeded = seeded(7);
    let good = half_channels_last(&Tensor::randn([2, 4, 4, 4], F32));
    let (w, b) = (Tensor::ones([4], F32), Tensor::zeros([4], F32));
    let cases = [
        (good.to_kind(Kind::Float), w.copy(), "fp16 channels-last"),
        (good.contiguous(), w.copy(), "fp16 channels-last"),
        (good.copy(), w.to_kind(Kind::Half), "fp32 parameters"),
        (
            half_channels_last(&Tensor::randn([2, 4, 4, 1], F32)),
            w.copy(),
            "2x2 or more",
        ),
    ];
    for op in [FusedBn::OwnPool, FusedBn::Own] {
        for (x, w, why) in &cases {
            let (m, v) = (Tensor::zeros([4], F32), Tensor::ones([4], F32));
            let got = op.run(x, [w, &b], [&m, &v], 0.1, 1e-5);
            if op == FusedBn::Own && *why == "2x2 or more" {
                // Without a pool any size runs.
                assert!(got.is_ok(), "{:#}", got.unwrap_err());
                continue;
            }
            let err = got.unwrap_err();
            assert!(format!("{err:#}").contains(why), "{op:?} {why}: {err:#}");
            assert_eq!(
                m.abs().max().double_value(&[]),
                0.0,
                "{op:?} {why}: moved the statistics"
            );
        }
    }
}

/// NVRTC (the torch wheel's) compiles the kernels for Turing, Ampere, Ada,
/// Hopper and Blackwell, as a GPU run does on first use: a non-empty cubin
/// each. An architecture NVRTC does not know fails with its message.
#[test]
fn nvrtc_compiles_the_kernels_for_each_gpu_generation() {
    for (major, minor) in [(7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)] {
        let bytes = vggctl::shim::step::compile_kernels(major, minor)
            .unwrap_or_else(|e| panic!("sm_{major}{minor}: {e:#}"));
        assert!(bytes > 1000, "sm_{major}{minor}: a cubin of {bytes} bytes");
    }
    let err = vggctl::shim::step::compile_kernels(1, 0).unwrap_err();
    assert!(format!("{err:#}").contains("sm_10"), "{err:#}");
}

/// The ReLU's and the bias's gradients in one kernel (without BatchNorm):
/// the masked gradient is ReLU's backward bit for bit and the bias's
/// gradient its fp32 sum within 1e-6, for channel counts that give one row
/// per chunk of the kernel's threads and a last chunk cut short (8192
/// channels over 198 rows: 29 chunks of 7 rows, the last of 2), with
/// outputs of both signs and exact zeros.
#[test]
fn relu_and_bias_gradients_in_one_kernel_are_relus_backward_and_a_sum() {
    let _seeded = seeded(8);
    for shape in [[3, 8, 6, 6], [2, 8192, 9, 11], [1, 4, 1, 1]] {
        let grad = half_channels_last(&Tensor::randn(shape, F32));
        // Both signs, and exact zeros where both draws are negative.
        let signed = Tensor::randn(shape, F32).relu() - Tensor::randn(shape, F32).relu();
        let out = half_channels_last(&signed);
        let (masked, bias) = vggctl::shim::step::relu_bias_grad(&grad, &out).unwrap();
        // tch's receiver is the forward's output, the argument the gradient.
        let want = out.threshold_backward(&grad, 0);
        assert!(masked.equal(&want), "{shape:?}: the masked gradient");
        assert!(vggctl::model::is_channels_last(&masked));
        let want_bias = want.sum_dim_intlist([0, 2, 3].as_slice(), false, Kind::Float);
        assert_eq!(bias.kind(), Kind::Float);
        assert!(
            rel(&bias, &want_bias) <= 1e-6,
            "{shape:?}: {}",
            rel(&bias, &want_bias)
        );
    }
    let fp32 = Tensor::randn([2, 4, 3, 3], F32);
    let err = vggctl::shim::step::relu_bias_grad(&fp32, &fp32).unwrap_err();
    assert!(format!("{err:#}").contains("fp16 channels-last"), "{err:#}");
}

/// conv+bias+ReLU with its backward's ReLU and bias gradients in one
/// kernel (`fused_grad`, fp16 channels-last on the CPU): the input and
/// weight gradients are the plain backward's bit for bit (the masked
/// gradient is), the bias's within 1e-5, alone and on two streams' path.
#[test]
fn a_convolutions_fused_relu_and_bias_gradients_are_the_plain_ones() {
    use vggctl::shim::step::{ConvOptions, conv3x3};
    let _seeded = seeded(9);
    let x = half_channels_last(&Tensor::randn([3, 8, 6, 6], F32));
    let w = half_channels_last(&(Tensor::randn([16, 8, 3, 3], F32) * 0.2));
    let b = (Tensor::randn([16], F32) * 0.1).to_kind(Kind::Half);
    let dy = Tensor::randn([3, 16, 6, 6], F32);
    let grads = |fused_grad: bool| {
        let leaves = [&x, &w, &b].map(|t| t.copy().set_requires_grad(true));
        let opts = ConvOptions {
            relu: true,
            two_streams: false,
            fused_grad,
        };
        let y = conv3x3(&leaves[0], &leaves[1], Some(&leaves[2]), opts).unwrap();
        let loss = (y.to_kind(Kind::Float) * &dy).sum(Kind::Float);
        Tensor::run_backward(&[loss], &leaves, false, false)
    };
    let (got, want) = (grads(true), grads(false));
    assert!(got[0].equal(&want[0]), "input gradient");
    assert!(got[1].equal(&want[1]), "weight gradient");
    assert_eq!(got[2].kind(), Kind::Half);
    assert!(
        rel(&got[2], &want[2]) <= 1e-3,
        "bias gradient: {}",
        rel(&got[2], &want[2])
    );
}
