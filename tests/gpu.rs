//! GPU-only checks, ignored elsewhere; `scripts/gpu-kit` builds them for a
//! CUDA machine, where `scripts/gpu-check` runs them with the benchmark:
//! - the shim's CUDA graph records on its own stream and a replay reads the
//!   static input's current values; memory statistics and bf16 answer;
//! - training with CUDA graphs follows eager training: with
//!   `--deterministic` in fp32, two eager runs agree (their difference is
//!   the floor) and the graphed run is within 1e-4 + 10x that floor of
//!   them (training and evaluation losses relative, every weight
//!   absolute; BatchNorm counters exact) while the learning rate changes
//!   between epochs; fp16 steps graph too;
//! - the recipe's options on the GPU (`--model-ema`, `--auto-augment`,
//!   `--random-erase`, `--mixup-alpha`/`--cutmix-alpha`: soft labels through
//!   the captured step) follow the eager step as above, the average is
//!   written, `--accum-steps 2` steps eagerly; the data time per step with
//!   them is printed (AutoAugment runs image by image);
//! - the fused step (BatchNorm's convolutions without their zero bias)
//!   trains as `--no-fused-step` does, within 1e-4 after 20 steps in fp32;
//!   its fp16 copy of the weights, cast once per step, gives autocast's
//!   gradients bit for bit; its BatchNorm+ReLU (cuDNN, one pass each way)
//!   computes what the plain ops compute, eagerly and in a CUDA graph; its
//!   convolution with the weight gradient on a second stream gives the
//!   one-stream gradients, eagerly and replayed with new input values;
//! - each precision runs and says what it ran as, with its peak memory;
//! - a streamed image folder (pinned host batches, asynchronous copies)
//!   trains on the GPU, and `eval` of its checkpoint streamed counts
//!   exactly what it counts with the folder in memory;
//! - a bounded wait for the GPU gives up in time and leaves the work
//!   running;
//! - a world of one under torchrun's variables with `--dist-backend nccl`
//!   joins its group through NCCL, keeps the step in the CUDA graph, and
//!   trains as a plain run does;
//! - fp16 loss scaling on the device (CUDA's `_amp_update_scale_` and the
//!   skip): an overflowing step leaves parameters and state bit for bit and
//!   halves the scale, clean steps grow it, and the updates equal the CPU's;
//! - `vggctl features` on the device equals the CPU's rows (fp32 within
//!   1e-4, fp16 autocast within 2e-2 of the largest value).

mod common;

use std::path::Path;

use tch::{Device, Kind, Tensor};
use vggctl::formats::safetensors::read_safetensors;
use vggctl::optim::LossScaler;
use vggctl::optim::{
    DEFAULT_ALPHA, DEFAULT_MOMENTUM_DECAY, DEFAULT_RHO, Optimizer, OptimizerConfig, OptimizerKind,
};
use vggctl::shim::{self, CudaGraph};
use vggctl::train::state::EpochMetrics;

const GPU: &str = "needs a CUDA GPU (scripts/gpu-check runs it)";

fn train(out: &Path, epochs: u32, extra: &[&str]) -> Vec<EpochMetrics> {
    train_with_env(out, epochs, extra, &[])
}

/// [`train`] with these environment variables (a launcher's).
fn train_with_env(
    out: &Path,
    epochs: u32,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Vec<EpochMetrics> {
    train_run(out, epochs, extra, env).0
}

/// [`train_with_env`], with the run's output.
fn train_run(
    out: &Path,
    epochs: u32,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (Vec<EpochMetrics>, common::Run) {
    let o = out.display().to_string();
    let e = epochs.to_string();
    let mut args = vec![
        "train",
        "--arch",
        "vgg11",
        "--bn",
        "--batch-size",
        "32",
        "--limit-train",
        "320",
        "--limit-test",
        "64",
        "--epochs",
        &e,
        "--scheduler",
        "cosine",
        "--seed",
        "7",
        "--device",
        "cuda",
        "--quiet",
        "--profile",
        "--dataset",
        "digits",
        "--out",
        &o,
    ];
    // An `--arch` among the extra arguments replaces VGG11-BN.
    if extra.contains(&"--arch") {
        args.drain(1..4);
    }
    // And a `--scheduler` the cosine one.
    if extra.contains(&"--scheduler") {
        let at = args.iter().position(|a| *a == "--scheduler").unwrap();
        args.drain(at..at + 2);
    }
    args.extend_from_slice(extra);
    let dir = common::tempdir();
    let r = common::Run::from(
        std::process::Command::new(common::bin())
            .args(&args)
            .current_dir(dir.path())
            .envs(env.iter().copied())
            .output()
            .expect("running vggctl"),
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (metrics, r)
}

#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-check runs it)"]
fn shim_graphs_replay_on_current_inputs() {
    assert!(tch::Cuda::is_available(), "{GPU}");
    assert!(shim::has_cuda(), "this build has no CUDA half in its shim");
    let dev = Device::Cuda(0);
    let mut x = Tensor::ones([1 << 20], (Kind::Float, dev));
    let mut graph = CudaGraph::new(dev).unwrap();
    let y = graph
        .on_side_stream(|g| {
            let _ = &x * 2.0 + 1.0; // warm-up, as for real steps
            g.capture(|| &x * 2.0 + 1.0)
        })
        .unwrap();
    let _ = x.fill_(3.0);
    graph.replay().unwrap();
    assert_eq!(y.min().double_value(&[]), 7.0);
    assert_eq!(y.max().double_value(&[]), 7.0);
    let _ = x.fill_(-1.0);
    graph.replay().unwrap();
    assert_eq!(y.max().double_value(&[]), -1.0);

    let peak = shim::peak_memory(dev, false).unwrap().unwrap();
    assert!(peak >= 8 << 20, "peak {peak} bytes with two 4 MiB tensors");
    shim::bf16_supported(dev).unwrap();
}

/// The bounded wait that stands in for c10d's watchdog around replayed
/// all-reduces: seconds of queued matrix products are not done within a
/// millisecond (false, promptly, the work left running), and are within a
/// minute (true), their result then readable.
#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-check runs it)"]
fn waits_for_the_gpu_are_bounded() {
    assert!(tch::Cuda::is_available(), "{GPU}");
    let a = Tensor::randn([4096, 4096], (Kind::Float, Device::Cuda(0))) / 64.0;
    tch::Cuda::synchronize(0);
    let mut x = a.shallow_clone();
    for _ in 0..2000 {
        x = x.matmul(&a);
    }
    let started = std::time::Instant::now();
    let within = std::time::Duration::from_millis(1);
    assert!(
        !shim::dist::await_device(0, within).unwrap(),
        "2000 products of 4096x4096 in 1 ms?"
    );
    let gave_up = started.elapsed();
    assert!(
        gave_up < std::time::Duration::from_millis(500),
        "gave up after {gave_up:?}"
    );
    let minute = std::time::Duration::from_secs(60);
    assert!(shim::dist::await_device(0, minute).unwrap());
    println!(
        "a wait gave up after {gave_up:?}; the products took {:?}",
        started.elapsed()
    );
    let _ = x.sum(Kind::Float).double_value(&[]);
}

#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-check runs it)"]
fn loss_scaling_runs_on_the_device() {
    assert!(tch::Cuda::is_available(), "{GPU}");
    // The variants: AMSGrad (Adam, AdamW), centered (RMSprop), decoupled
    // weight decay (RAdam), LR decay and starting sums (Adagrad); Adamax
    // and Adadelta too.
    for (kind, variant) in [
        (OptimizerKind::Sgd, false),
        (OptimizerKind::Adam, false),
        (OptimizerKind::Adam, true),
        (OptimizerKind::Adamw, true),
        (OptimizerKind::Rmsprop, false),
        (OptimizerKind::Rmsprop, true),
        (OptimizerKind::Nadam, false),
        (OptimizerKind::Radam, true),
        (OptimizerKind::Adamax, false),
        (OptimizerKind::Adagrad, true),
        (OptimizerKind::Adadelta, false),
    ] {
        let cfg = OptimizerConfig {
            kind,
            momentum: 0.9,
            weight_decay: 5e-4,
            nesterov: true,
            betas: (0.9, 0.999),
            eps: 1e-8,
            alpha: DEFAULT_ALPHA,
            norm_weight_decay: None,
            bias_weight_decay: None,
            amsgrad: variant,
            centered: variant,
            momentum_decay: DEFAULT_MOMENTUM_DECAY,
            decoupled_weight_decay: variant,
            lr_decay: if variant { 0.5 } else { 0.0 },
            initial_accumulator_value: if variant { 0.1 } else { 0.0 },
            rho: DEFAULT_RHO,
        };
        // The same steps on the CPU and on the GPU.
        let run = |dev: Device| {
            let flat = Tensor::from_slice(&[0.5f32, -1.0, 2.0, 0.25, 3.0, -0.75]).to_device(dev);
            let p = flat.view([2, 3]).detach().set_requires_grad(true);
            let mut opt =
                Optimizer::fused(cfg.clone(), vec![("w".into(), &p)], flat.shallow_clone());
            opt.enable_loss_scaling(&LossScaler {
                growth_interval: 2,
                ..LossScaler::default()
            });
            let cube = |p: &Tensor| (p * p * p).sum(Kind::Float);
            opt.backward_step(&cube(&p), 0.05).unwrap();
            let before = flat.copy();
            let state = opt.state_tensors();
            opt.backward_step(&(&p * f64::INFINITY).sum(Kind::Float), 0.05)
                .unwrap();
            assert!(
                flat.equal(&before),
                "{kind:?} on {dev:?}: parameters changed"
            );
            for ((_, now), (_, was)) in opt.state_tensors().iter().zip(&state) {
                assert!(now.equal(was), "{kind:?} on {dev:?}: state changed");
            }
            assert_eq!(opt.loss_scaler().unwrap().scale, 32768.0);
            for _ in 0..2 {
                opt.backward_step(&cube(&p), 0.05).unwrap();
            }
            assert_eq!(
                opt.loss_scaler().unwrap().scale,
                65536.0,
                "{kind:?} on {dev:?}"
            );
            assert_eq!((opt.steps(), opt.skipped()), (3, 1));
            flat.to_device(Device::Cpu)
        };
        let err = (run(Device::Cpu) - run(Device::Cuda(0)))
            .abs()
            .max()
            .double_value(&[]);
        assert!(err <= 1e-6, "{kind:?}: GPU and CPU updates differ by {err}");
    }
}

/// The fused step against `--no-fused-step`, both graphed, fp32 with
/// `--deterministic` — VGG11-BN from torchvision's zero biases
/// (convolutions before BatchNorm without their bias) and VGG11 without
/// BatchNorm (conv+bias+ReLU in one cuDNN kernel): after 20 steps the
/// weights and running statistics are within 1e-4 of the reference's
/// (relative to each tensor's largest value; the BN model's convolution
/// biases, zero in the fused run, within 1e-4 absolute), BatchNorm counters
/// equal, and fp16 runs both too.
#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-check runs it)"]
fn the_fused_step_trains_as_the_reference_step() {
    let tmp = common::tempdir();
    let (f, r) = (tmp.path().join("fused"), tmp.path().join("reference"));
    let det = ["--precision", "fp32", "--deterministic", "--cuda-graphs"];
    let fused = train(&f, 2, &det);
    let reference = train(&r, 2, &[&det[..], &["--no-fused-step"]].concat());
    assert!(
        fused[0].ran_as.contains("fused step"),
        "{}",
        fused[0].ran_as
    );
    assert!(
        !reference[0].ran_as.contains("fused step"),
        "{}",
        reference[0].ran_as
    );
    let load = |dir: &Path| {
        read_safetensors(&dir.join("last.safetensors"))
            .unwrap()
            .tensors
    };
    let (a, b) = (load(&f), load(&r));
    let mut worst = (0.0f64, String::new());
    for (k, t) in &b {
        if k.ends_with("num_batches_tracked") {
            assert!(t.equal(&a[k]), "{k}");
            continue;
        }
        let err = (&a[k] - t).abs().max().double_value(&[]);
        let scale = t.abs().max().double_value(&[]);
        let rel = if scale > 1e-3 { err / scale } else { err };
        println!("{k}: fused vs reference {rel:.3e}");
        assert!(rel <= 1e-4, "{k}: {rel}");
        if rel > worst.0 {
            worst = (rel, k.clone());
        }
    }
    println!(
        "fused step vs reference after 20 steps: worst {:.3e} ({})",
        worst.0, worst.1
    );
    // fp16: bias-free convolutions, BatchNorm+ReLU (and max-pool) in one pass, the
    // weights cast once. Rounding differs, the training does not.
    let half = train(&tmp.path().join("fp16"), 1, &["--precision", "fp16"]);
    let half_reference = train(
        &tmp.path().join("fp16-reference"),
        1,
        &["--precision", "fp16", "--no-fused-step"],
    );
    assert!(half[0].ran_as.contains("fused step") && half[0].train_loss.is_finite());
    let (lf, lr) = (half[0].train_loss, half_reference[0].train_loss);
    println!("fp16, one epoch: train loss {lf} fused, {lr} reference");
    assert!((lf - lr).abs() <= 0.05 * lr, "{lf} against {lr}");
    // VGG11 without BatchNorm: conv+bias+ReLU in one cuDNN kernel.
    let plain = ["--arch", "vgg11"];
    let fused = train(
        &tmp.path().join("plain-fused"),
        2,
        &[&plain[..], &det[..]].concat(),
    );
    let reference = train(
        &tmp.path().join("plain-reference"),
        2,
        &[&plain[..], &det[..], &["--no-fused-step"]].concat(),
    );
    assert!(
        fused[0].ran_as.contains("fused step"),
        "{}",
        fused[0].ran_as
    );
    let (a, b) = (
        load(&tmp.path().join("plain-fused")),
        load(&tmp.path().join("plain-reference")),
    );
    for (k, t) in &b {
        let err = (&a[k] - t).abs().max().double_value(&[]);
        let rel = err / t.abs().max().double_value(&[]).max(1e-3);
        println!("{k}: conv+bias+ReLU vs reference {rel:.3e}");
        assert!(rel <= 1e-4, "{k}: {rel}");
    }
    for (f, r) in fused.iter().zip(&reference) {
        println!(
            "epoch {}: train loss {} fused, {} reference",
            f.epoch, f.train_loss, r.train_loss
        );
    }
    let half = train(
        &tmp.path().join("plain-fp16"),
        1,
        &[&plain[..], &["--precision", "fp16"]].concat(),
    );
    assert!(half[0].ran_as.contains("fused step") && half[0].train_loss.is_finite());
}

/// The fused step's fp16 copy of the weights (cast once per step from the
/// flat fp32 buffer, autograd differentiating the copy) gives autocast's
/// gradients bit for bit on CUDA: VGG11-BN, NHWC as training runs it,
/// deterministic cuDNN (both sides run the same kernels on the same
/// numbers, so any difference is the copy's). The copy holds the 18
/// convolution and linear tensors, their gradients come in fp16.
#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-check runs it)"]
fn the_weights_cast_once_give_autocasts_gradients() {
    use std::collections::BTreeMap;
    use vggctl::model::{Arch, Head, ModelSpec, Vgg, to_channels_last};
    assert!(tch::Cuda::is_available(), "{GPU}");
    let dev = Device::Cuda(0);
    shim::set_cudnn_deterministic(true).unwrap();
    tch::Cuda::cudnn_set_benchmark(false);
    shim::set_autocast_dtype(shim::AutocastDtype::Float16).unwrap();
    tch::manual_seed(5);
    let x = to_channels_last(&Tensor::randn([32, 3, 32, 32], (Kind::Float, dev)));
    let y = Tensor::randint(10, [32], (Kind::Int64, dev));
    let gradients = |compute: Option<Kind>| {
        tch::manual_seed(11);
        let mut m = Vgg::new(ModelSpec::new(Arch::Vgg11, true, Head::Gap, 10), dev);
        let _flat = m.flatten_trainable(true, compute);
        let views: BTreeMap<String, Tensor> = m.compute_views().into_iter().collect();
        let (names, sources): (Vec<String>, Vec<Tensor>) = m
            .parameters()
            .into_iter()
            .map(|(n, t)| {
                let source = views.get(&n).unwrap_or(t).shallow_clone();
                (n, source)
            })
            .unzip();
        let loss = tch::autocast(true, || m.forward_t(&x, true))
            .to_kind(Kind::Float)
            .cross_entropy_for_logits(&y);
        let grads = Tensor::run_backward(&[loss], &sources, false, false);
        (names, grads, views.len())
    };
    let (names, want, none) = gradients(None);
    let (_, got, copied) = gradients(Some(Kind::Half));
    assert_eq!((none, copied), (0, 18));
    let mut halves = 0;
    for ((name, w), g) in names.iter().zip(&want).zip(&got) {
        halves += usize::from(g.kind() == Kind::Half);
        let diff = (&g.to_kind(Kind::Float) - w).abs().max().double_value(&[]);
        println!("{name}: cast once vs autocast, largest difference {diff:.3e}");
        assert!(w.equal(&g.to_kind(Kind::Float)), "{name}: {diff}");
    }
    assert_eq!(halves, 18);
    shim::set_cudnn_deterministic(false).unwrap();
}

/// Asserts that `got` is within `tolerance` of `want`'s largest value
/// (both compared in fp32), printing the error under `what`.
fn assert_close(what: &str, got: &Tensor, want: &Tensor, tolerance: f64) {
    let (got, want) = (got.to_kind(Kind::Float), want.to_kind(Kind::Float));
    let err = (&got - &want).abs().max().double_value(&[]);
    let rel = err / want.abs().max().double_value(&[]);
    println!("{what}: {rel:.3e} of the largest");
    assert!(rel <= tolerance, "{what}: {rel}");
}

/// The fused step's BatchNorm+ReLU (cuDNN's BatchNorm with its activation,
/// fp16 NHWC) computes what BatchNorm and ReLU compute in fp32: output,
/// running statistics and the input, weight and bias gradients within
/// 1e-2 of each one's largest value, eagerly and replayed from a CUDA graph
/// (the running statistics move once per replay).
#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-check runs it)"]
fn the_fused_batchnorm_relu_matches_the_plain_ops() {
    fused_batchnorm_matches_the_plain_ops(shim::step::FusedBn::Cudnn);
}

/// The fused step's BatchNorm+ReLU+max-pool (vggctl's own kernels,
/// src/kernels.cu, compiled by NVRTC on first use and launched through the
/// driver API) computes what BatchNorm, ReLU and max_pool2d compute in fp32,
/// as `the_fused_batchnorm_relu_matches_the_plain_ops` checks it, eagerly
/// and replayed from a CUDA graph. gpu-check runs it in a process of its
/// own: should a kernel fault, the CUDA context of the other tests is not
/// lost with it, and the benchmark leaves the part out.
#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-check runs it)"]
fn the_fused_kernels_bn_relu_pool_match_the_plain_ops() {
    fused_batchnorm_matches_the_plain_ops(shim::step::FusedBn::OwnPool);
}

/// The fused step's BatchNorm+ReLU in vggctl's own kernels (no pool; the
/// alternative to cuDNN's pass) against the plain ops in fp32, as
/// `the_fused_batchnorm_relu_matches_the_plain_ops` checks cuDNN's. In
/// gpu-check's process of its own with the other kernel tests.
#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-check runs it)"]
fn the_fused_kernels_bn_relu_own_match_the_plain_ops() {
    fused_batchnorm_matches_the_plain_ops(shim::step::FusedBn::Own);
}

/// conv+bias+ReLU's backward with the ReLU's and the bias's gradients in
/// one kernel of vggctl's own (NVRTC; fp16 channels-last): input, weight
/// and bias gradients within 1e-3 of the plain backward's, alone and with
/// two streams, eagerly and replayed from a CUDA graph with new input
/// values. In gpu-check's process of its own with the other kernel test.
#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-check runs it)"]
fn the_fused_kernels_relu_bias_grad_match_the_plain_backward() {
    assert!(tch::Cuda::is_available(), "{GPU}");
    use vggctl::model::to_channels_last;
    let dev = Device::Cuda(0);
    let opts = (Kind::Float, dev);
    tch::manual_seed(5);
    let half = |t: Tensor| to_channels_last(&t).to_kind(Kind::Half);
    let w = half(Tensor::randn([256, 128, 3, 3], opts) * 0.05);
    let b = (Tensor::randn([256], opts) * 0.1).to_kind(Kind::Half);
    let dy = to_channels_last(&Tensor::randn([64, 256, 16, 16], opts));
    let step = |x: &Tensor, fused_grad: bool, two_streams: bool| {
        let leaves = [x, &w, &b].map(|t| t.detach().set_requires_grad(true));
        let conv = shim::step::ConvOptions {
            relu: true,
            two_streams,
            fused_grad,
        };
        let y = shim::step::conv3x3(&leaves[0], &leaves[1], Some(&leaves[2]), conv).unwrap();
        let loss = (y.to_kind(Kind::Float) * &dy).sum(Kind::Float);
        Tensor::run_backward(&[loss], &leaves, false, false)
    };
    let x = half(Tensor::randn([64, 128, 16, 16], opts));
    let want = step(&x, false, false);
    for two_streams in [false, true] {
        let got = step(&x, true, two_streams);
        for (what, (g, w)) in ["input", "weight", "bias"]
            .iter()
            .zip(got.iter().zip(&want))
        {
            let name = format!("ReLU+bias gradient, {what} grad (two streams {two_streams})");
            assert_close(&name, g, w, 1e-3);
        }
    }
    // Captured, then replayed on new values in the captured input.
    let captured = x.copy();
    let mut graph = CudaGraph::new(dev).unwrap();
    let grads = graph
        .on_side_stream(|graph| {
            let _ = step(&captured, true, true); // warm-up
            graph.capture(|| step(&captured, true, true))
        })
        .unwrap();
    let x2 = half(Tensor::randn([64, 128, 16, 16], opts));
    tch::no_grad(|| captured.shallow_clone().copy_(&x2));
    graph.replay().unwrap();
    let want2 = step(&x2, false, false);
    for (what, (g, w)) in ["input", "weight", "bias"]
        .iter()
        .zip(grads.iter().zip(&want2))
    {
        assert_close(
            &format!("ReLU+bias gradient replayed, {what} grad"),
            g,
            w,
            1e-3,
        );
    }
}

/// BatchNorm+ReLU (and max-pool, for `FusedBn::OwnPool`) fused as `op`
/// against the plain ops.
fn fused_batchnorm_matches_the_plain_ops(op: shim::step::FusedBn) {
    use vggctl::model::{BN_EPS, BN_MOMENTUM, batch_norm, to_channels_last};
    assert!(tch::Cuda::is_available(), "{GPU}");
    let dev = Device::Cuda(0);
    let opts = (Kind::Float, dev);
    let pool = op == shim::step::FusedBn::OwnPool;
    tch::manual_seed(3);
    let mut x = Tensor::randn([64, 128, 16, 16], opts) * 2.0 + 0.5;
    if pool {
        // No near-ties in a window: multiples of 0.5 plus 0.125 times the
        // position in the window, so that fp16 and fp32 pick the same
        // maximum (a near-tie's gradient could go to either position).
        let parity = |shape: [i64; 4]| Tensor::arange(16, opts).remainder(2).view(shape);
        x = (x * 2.0).round() * 0.5 + (parity([1, 1, 16, 1]) * 2.0 + parity([1, 1, 1, 16])) * 0.125;
    }
    let x = to_channels_last(&x);
    let side = if pool { 8 } else { 16 };
    let dy = to_channels_last(&Tensor::randn([64, 128, side, side], opts));
    let weight = Tensor::rand([128], opts) + 0.5;
    let bias = Tensor::randn([128], opts) * 0.1;
    let name = format!(
        "{op:?} BatchNorm+ReLU{}",
        if pool { "+max-pool" } else { "" }
    );
    let close = |what: &str, got: &Tensor, want: &Tensor, tolerance: f64| {
        assert_close(&format!("{name} {what}"), got, want, tolerance)
    };
    // One step either way: output, running statistics, gradients.
    let step = |fused: bool, xs: &Tensor, stats: &[Tensor; 2]| {
        let leaves = [xs.shallow_clone(), weight.copy(), bias.copy()]
            .map(|t| t.detach().set_requires_grad(true));
        let [x, w, b] = &leaves;
        let (mean, var) = (&stats[0], &stats[1]);
        let y = match fused {
            true => op.run(x, [w, b], [mean, var], BN_MOMENTUM, BN_EPS).unwrap(),
            false => {
                let y = batch_norm(x, w, b, mean, var, true).relu();
                match pool {
                    true => y.max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false),
                    false => y,
                }
            }
        };
        let loss = (y.to_kind(Kind::Float) * &dy).sum(Kind::Float);
        let grads = Tensor::run_backward(&[loss], &leaves, false, false);
        (y, grads)
    };
    let fresh = || [Tensor::zeros([128], opts), Tensor::ones([128], opts)];
    let (want_stats, got_stats) = (fresh(), fresh());
    let (want_y, want_g) = step(false, &x, &want_stats);
    let half = x.to_kind(Kind::Half);
    let (got_y, got_g) = step(true, &half, &got_stats);
    close("output", &got_y, &want_y, 1e-2);
    close("running mean", &got_stats[0], &want_stats[0], 1e-3);
    close("running var", &got_stats[1], &want_stats[1], 1e-3);
    for (what, (g, w)) in ["input grad", "weight grad", "bias grad"]
        .iter()
        .zip(got_g.iter().zip(&want_g))
    {
        close(what, g, w, 1e-2);
    }
    // Captured and replayed twice: the outputs again, the statistics moved twice.
    let graph_stats = fresh();
    let mut graph = CudaGraph::new(dev).unwrap();
    let (y, g) = graph
        .on_side_stream(|graph| {
            let _ = step(true, &half, &fresh()); // warm-up
            graph.capture(|| step(true, &half, &graph_stats))
        })
        .unwrap();
    for (t, v) in graph_stats.iter().zip(fresh()) {
        tch::no_grad(|| t.shallow_clone().copy_(&v));
    }
    graph.replay().unwrap();
    graph.replay().unwrap();
    close("output replayed", &y, &want_y, 1e-2);
    close("input grad replayed", &g[0], &want_g[0], 1e-2);
    let twice = fresh();
    let _ = step(false, &x, &twice);
    let _ = step(false, &x, &twice);
    close(
        "running mean after two replays",
        &graph_stats[0],
        &twice[0],
        1e-3,
    );
    close(
        "running var after two replays",
        &graph_stats[1],
        &twice[1],
        1e-3,
    );
}

/// The shim's convolution with its weight and bias gradients on a second
/// stream (the fused step's `two-streams`): its gradients equal the
/// one-stream ones within 1e-3 of the largest (fp16, channels-last, with
/// and without bias and ReLU), eagerly and replayed from a CUDA graph with
/// new values in the captured input (a missing fork or join would show as
/// stale or torn gradients there).
#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-check runs it)"]
fn the_convolution_on_two_streams_gives_one_streams_gradients() {
    use vggctl::model::to_channels_last;
    assert!(tch::Cuda::is_available(), "{GPU}");
    let dev = Device::Cuda(0);
    let opts = (Kind::Half, dev);
    tch::manual_seed(4);
    let w = to_channels_last(&(Tensor::randn([256, 128, 3, 3], opts) * 0.05));
    let b = Tensor::randn([256], opts) * 0.1;
    let dy = to_channels_last(&Tensor::randn([64, 256, 16, 16], opts));
    let close = |what: &str, got: &Tensor, want: &Tensor| {
        assert_close(&format!("two streams, {what}"), got, want, 1e-3)
    };
    for (bias, relu) in [(true, true), (false, false)] {
        let step = |x: &Tensor, two_streams: bool| {
            let mut leaves: Vec<Tensor> =
                [x, &w].map(|t| t.detach().set_requires_grad(true)).into();
            if bias {
                leaves.push(b.detach().set_requires_grad(true));
            }
            let conv = shim::step::ConvOptions {
                relu,
                two_streams,
                fused_grad: false,
            };
            let y = shim::step::conv3x3(&leaves[0], &leaves[1], leaves.get(2), conv).unwrap();
            Tensor::run_backward(&[(&y * &dy).sum(Kind::Float)], &leaves, false, false)
        };
        let x = to_channels_last(&Tensor::randn([64, 128, 16, 16], opts));
        let want = step(&x, false);
        for (what, (g, w)) in ["input", "weight", "bias"]
            .iter()
            .zip(step(&x, true).iter().zip(&want))
        {
            close(&format!("{what} grad (bias {bias}, relu {relu})"), g, w);
        }
        let captured = x.copy();
        let mut graph = CudaGraph::new(dev).unwrap();
        let got = graph
            .on_side_stream(|graph| {
                let _ = step(&captured, true); // warm-up
                graph.capture(|| step(&captured, true))
            })
            .unwrap();
        let x2 = to_channels_last(&Tensor::randn([64, 128, 16, 16], opts));
        tch::no_grad(|| captured.shallow_clone().copy_(&x2));
        graph.replay().unwrap();
        let want = step(&x2, false);
        for (what, (g, w)) in ["input", "weight", "bias"]
            .iter()
            .zip(got.iter().zip(&want))
        {
            close(
                &format!("{what} grad replayed (bias {bias}, relu {relu})"),
                g,
                w,
            );
        }
    }
}

/// OneCycleLR changes the LR every update, which the CUDA graph reads
/// from its tensor at each replay: without momentum cycling the graphed
/// run follows the eager one; with it (a momentum the captured kernel
/// would keep at its first value) the training step runs eagerly, and
/// `ran_as` says the graphs are evaluation's only. CyclicLR without
/// cycling graphs as OneCycleLR does.
#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-check runs it)"]
fn onecycle_runs_on_the_device() {
    let tmp = common::tempdir();
    let det = [
        "--precision",
        "fp32",
        "--deterministic",
        "--scheduler",
        "onecycle",
    ];
    let t = tmp.path();
    let plain = ["--no-cycle-momentum", "--no-cuda-graphs"];
    let eager = train(&t.join("eager"), 2, &[&det[..], &plain].concat());
    let plain = ["--no-cycle-momentum", "--cuda-graphs"];
    let graph = train(&t.join("graph"), 2, &[&det[..], &plain].concat());
    let rel = |x: f64, y: f64| (x - y).abs() / x.abs().max(1e-9);
    for (e, g) in eager.iter().zip(&graph) {
        println!(
            "onecycle epoch {}: train loss eager {} graphed {}, test loss {} / {}",
            e.epoch, e.train_loss, g.train_loss, e.test_loss, g.test_loss
        );
        assert!(rel(e.train_loss, g.train_loss) <= 1e-3 && rel(e.test_loss, g.test_loss) <= 1e-3);
        assert_eq!(g.profile.as_ref().unwrap().graphed_steps, 10);
    }
    let cycled = train(&t.join("cycled"), 1, &det);
    let ran_as = &cycled[0].ran_as;
    assert!(ran_as.ends_with("CUDA graph (evaluation only)"), "{ran_as}");
    assert_eq!(cycled[0].profile.as_ref().unwrap().graphed_steps, 0);
    // CyclicLR takes the same path: its LR through the graph's tensor.
    let cyclic = [
        "--precision",
        "fp32",
        "--deterministic",
        "--scheduler",
        "cyclic",
        "--lr-min",
        "0.001",
        "--cycle-steps",
        "3,2",
        "--no-cycle-momentum",
    ];
    let eager = train(
        &t.join("cyclic-eager"),
        1,
        &[&cyclic[..], &["--no-cuda-graphs"]].concat(),
    );
    let graph = train(
        &t.join("cyclic-graph"),
        1,
        &[&cyclic[..], &["--cuda-graphs"]].concat(),
    );
    let (e, g) = (&eager[0], &graph[0]);
    println!(
        "cyclic: train loss eager {} graphed {}",
        e.train_loss, g.train_loss
    );
    assert!(rel(e.train_loss, g.train_loss) <= 1e-3 && rel(e.test_loss, g.test_loss) <= 1e-3);
    assert_eq!(g.profile.as_ref().unwrap().graphed_steps, 10);
}

/// `--swa-start` on the device (the run's numerics: mixed precision,
/// channels-last, CUDA graphs): the average is evaluated at the end, its
/// BatchNorm statistics recomputed over 320 images in batches of 32 (10
/// batches a layer), and `eval` of `swa.safetensors` reports the run's own
/// figures (one image and 1e-2 of the loss apart at most: the inference
/// form may round otherwise than the run's evaluation).
#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-check runs it)"]
fn swa_runs_on_the_device() {
    let tmp = common::tempdir();
    let out = tmp.path().join("swa");
    let m = train(&out, 2, &["--swa-start", "1", "--swa-lr", "0.005"]);
    assert!(m[0].swa.is_none());
    let swa = m[1]
        .swa
        .as_ref()
        .expect("the last epoch evaluates the average");
    let file = out.join("swa.safetensors");
    let sd = read_safetensors(&file).unwrap();
    let counts: Vec<i64> = sd
        .tensors
        .iter()
        .filter(|(k, _)| k.ends_with("num_batches_tracked"))
        .map(|(_, t)| t.int64_value(&[]))
        .collect();
    assert!(
        !counts.is_empty() && counts.iter().all(|&c| c == 10),
        "{counts:?}"
    );
    let file = file.display().to_string();
    let args = [
        "eval",
        "--checkpoint",
        &file,
        "--dataset",
        "digits",
        "--limit-test",
        "64",
        "--device",
        "cuda",
        "--json",
    ];
    let report: serde_json::Value = serde_json::from_str(&ok(tmp.path(), &args)).unwrap();
    let (top1, loss) = (
        report["top1"].as_f64().unwrap(),
        report["loss"].as_f64().unwrap(),
    );
    println!(
        "swa: the run's top-1 {} loss {}; eval's {top1} {loss}",
        swa.top1, swa.loss
    );
    assert!((top1 - swa.top1).abs() <= 100.0 / 64.0 + 1e-9);
    assert!((loss - swa.loss).abs() <= 1e-2 * swa.loss.abs());
}

#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-check runs it)"]
fn graphed_training_follows_eager_training() {
    let tmp = common::tempdir();
    let (a, a2, b) = (
        tmp.path().join("eager"),
        tmp.path().join("eager-again"),
        tmp.path().join("graph"),
    );
    let det = ["--precision", "fp32", "--deterministic"];
    let eager = train(&a, 2, &[&det[..], &["--no-cuda-graphs"]].concat());
    let again = train(&a2, 2, &[&det[..], &["--no-cuda-graphs"]].concat());
    let graph = train(&b, 2, &[&det[..], &["--cuda-graphs"]].concat());
    assert!(
        graph[0].ran_as.ends_with("CUDA graph") && !eager[0].ran_as.ends_with("CUDA graph"),
        "{} / {}",
        graph[0].ran_as,
        eager[0].ran_as
    );
    let rel = |x: f64, y: f64| (x - y).abs() / x.abs().max(1e-9);
    for ((e, e2), g) in eager.iter().zip(&again).zip(&graph) {
        // Training steps and the (also graphed) evaluation.
        for (what, x, x2, y) in [
            ("train loss", e.train_loss, e2.train_loss, g.train_loss),
            ("test loss", e.test_loss, e2.test_loss, g.test_loss),
        ] {
            println!("epoch {}: {what}: eager {x} / {x2}, graphed {y}", e.epoch);
            assert!(
                rel(x, y) <= 1e-4 + 10.0 * rel(x, x2),
                "epoch {}: {what} {x} eager (again: {x2}) vs {y} graphed",
                e.epoch
            );
        }
        // 10 full batches per epoch, all through the graph path (3 warm-ups first).
        assert_eq!(g.profile.as_ref().unwrap().graphed_steps, 10);
        assert!(g.peak_gpu_bytes.unwrap() > 0);
    }
    assert_ne!(eager[0].lr, eager[1].lr, "the check needs an LR change");
    // --profile's ops.csv holds the replayed graph's kernels (CUPTI sees
    // inside graph launches): 8 convolutions forward and backward are
    // more than 16 kernels a step.
    let ops = std::fs::read_to_string(b.join("ops.csv")).unwrap();
    println!("ops.csv of the graphed run (top 30):");
    ops.lines().take(31).for_each(|l| println!("  {l}"));
    let kernels: f64 = ops
        .lines()
        .filter(|l| l.starts_with("cuda,"))
        .map(|l| l.split(',').nth(1).unwrap().parse::<f64>().unwrap())
        .sum();
    assert!(kernels > 16.0, "{kernels} GPU kernels a step:\n{ops}");
    // fp16 graphs too: its loss scaler decides on the device.
    let half = train(
        &tmp.path().join("fp16"),
        2,
        &["--precision", "fp16", "--cuda-graphs"],
    );
    assert!(half[1].ran_as.starts_with("fp16") && half[1].ran_as.ends_with("CUDA graph"));
    assert!(half[1].train_loss.is_finite() && half[1].loss_scale.is_some());
    let load = |dir: &Path| {
        read_safetensors(&dir.join("last.safetensors"))
            .unwrap()
            .tensors
    };
    let (ea, ea2, gb) = (load(&a), load(&a2), load(&b));
    let mut bad = Vec::new();
    for (k, t) in &ea {
        if k.ends_with("num_batches_tracked") {
            assert!(t.equal(&gb[k]), "{k}");
            continue;
        }
        let floor = (t - &ea2[k]).abs().max().double_value(&[]);
        let err = (t - &gb[k]).abs().max().double_value(&[]);
        println!("{k}: graphed vs eager {err:.3e}, eager vs eager {floor:.3e}");
        if err > 1e-4 + 10.0 * floor {
            bad.push(format!("{k}: {err:.3e} (floor {floor:.3e})"));
        }
    }
    assert!(bad.is_empty(), "graphed weights differ: {bad:?}");
}

#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-check runs it)"]
fn recipe_options_follow_eager_training_through_the_graph() {
    let tmp = common::tempdir();
    let recipe = [
        "--precision",
        "fp32",
        "--deterministic",
        "--model-ema",
        "--model-ema-steps",
        "2",
        "--auto-augment",
        "cifar10",
        "--random-erase",
        "0.5",
        "--mixup-alpha",
        "0.4",
        "--cutmix-alpha",
        "1.0",
    ];
    let (e, g) = (tmp.path().join("eager"), tmp.path().join("graph"));
    let eager = train(&e, 2, &[&recipe[..], &["--no-cuda-graphs"]].concat());
    let graph = train(&g, 2, &[&recipe[..], &["--cuda-graphs"]].concat());
    let rel = |x: f64, y: f64| (x - y).abs() / x.abs().max(1e-9);
    for (a, b) in eager.iter().zip(&graph) {
        let p = b.profile.as_ref().unwrap();
        println!(
            "epoch {}: train loss eager {} graphed {}; EMA top-1 {:?}; data {:.2} ms/step",
            a.epoch,
            a.train_loss,
            b.train_loss,
            b.ema.as_ref().map(|m| m.top1),
            1000.0 * p.data / p.steps.max(1) as f64
        );
        assert!(rel(a.train_loss, b.train_loss) <= 1e-3, "epoch {}", a.epoch);
        assert_eq!(p.graphed_steps, 10);
        assert!(b.ema.is_some());
    }
    assert!(g.join("ema.safetensors").is_file());
    let acc = train(
        &tmp.path().join("accum"),
        1,
        &["--accum-steps", "2", "--cuda-graphs"],
    );
    assert_eq!(acc[0].profile.as_ref().unwrap().graphed_steps, 0);
    assert!(acc[0].train_loss.is_finite());
}

#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-check runs it)"]
fn every_precision_runs_and_says_what_it_ran_as() {
    let tmp = common::tempdir();
    let major = shim::compute_capability(Device::Cuda(0)).unwrap().unwrap();
    let bf16 = shim::bf16_supported(Device::Cuda(0)).unwrap();
    assert_eq!(bf16, major >= 8);
    for (precision, want) in [
        ("fp32", "fp32"),
        ("tf32", "tf32"),
        ("fp16", "fp16"),
        ("bf16", if bf16 { "bf16" } else { "fp16" }),
        ("auto", if major >= 7 { "fp16" } else { "fp32" }),
    ] {
        let m = train(&tmp.path().join(precision), 1, &["--precision", precision]);
        assert!(
            m[0].ran_as.starts_with(&format!("{want}, channels_last")),
            "{precision}: {}",
            m[0].ran_as
        );
        assert!(m[0].train_loss.is_finite(), "{precision}");
        assert_eq!(m[0].loss_scale.is_some(), want == "fp16", "{precision}");
    }
}

#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-check runs it)"]
fn fused_inference_plan_matches_the_model() {
    use vggctl::infer::InferencePlan;
    use vggctl::model::{Arch, Head, ModelSpec, Vgg};
    assert!(tch::Cuda::is_available(), "{GPU}");
    tch::manual_seed(5);
    let dev = Device::Cuda(0);
    for (bn, head) in [(true, Head::Cifar), (false, Head::Imagenet)] {
        let model = Vgg::new(ModelSpec::new(Arch::Vgg11, bn, head, 10), dev);
        let x = Tensor::randn([8, 3, 64, 64], (Kind::Float, dev));
        let want = tch::no_grad(|| model.forward_t(&x, false));
        let scale = want.abs().max().double_value(&[]);
        for (kind, tol) in [
            (Kind::Float, 1e-2),
            (Kind::Half, 1e-2),
            (Kind::BFloat16, 5e-2),
        ] {
            let plan = InferencePlan::new(&model, kind, true);
            let got = plan.forward(&x);
            let err = (&got - &want).abs().max().double_value(&[]) / scale;
            println!(
                "fused plan, bn {bn}, {kind:?}: max error {err:.2e} of the largest logit, fused kernels {:?}",
                plan.fused()
            );
            assert_eq!(
                plan.fused(),
                Some(true),
                "{kind:?}: cuDNN's conv+bias+ReLU did not run"
            );
            assert!(err <= tol, "bn {bn}, {kind:?}: {err}");
        }
    }
}

/// Runs vggctl in `dir`; its stdout, after checking it succeeded.
fn ok(dir: &Path, args: &[&str]) -> String {
    let r = common::run_in(dir, args);
    assert_eq!(r.code, 0, "{}", r.stderr);
    r.stdout
}

#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-check runs it)"]
fn a_streamed_folder_trains_on_the_gpu_and_evaluates_as_in_memory() {
    let tmp = common::tempdir();
    let photos = tmp.path().join("photos");
    for entry in std::fs::read_dir(common::fixtures().join("photos")).unwrap() {
        let class = entry.unwrap().path();
        let dst = photos.join(class.file_name().unwrap());
        std::fs::create_dir_all(&dst).unwrap();
        for f in std::fs::read_dir(&class).unwrap() {
            let f = f.unwrap().path();
            // Readable images only: both paths then hold out the same files.
            if f.file_name().unwrap() != "broken.jpg" {
                std::fs::copy(&f, dst.join(f.file_name().unwrap())).unwrap();
            }
        }
    }
    let (data, cache) = (photos.display().to_string(), tmp.path().join("cache"));
    let cache = cache.display().to_string();
    let common_args = [
        "--dataset",
        "folder",
        "--data-dir",
        &data,
        "--device",
        "cuda",
    ];
    let mut train = vec![
        "train",
        "--arch",
        "vgg11",
        "--epochs",
        "2",
        "--batch-size",
        "8",
    ];
    train.extend_from_slice(&common_args);
    train.extend_from_slice(&["--cache-mem", "0", "--out", "run", "--quiet"]);
    ok(tmp.path(), &train);
    let config = std::fs::read_to_string(tmp.path().join("run/config.json")).unwrap();
    assert!(config.contains("\"streamed\": true"), "{config}");
    let eval = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec!["eval", "--checkpoint", "run/last.safetensors", "--json"];
        args.extend_from_slice(&common_args);
        args.extend_from_slice(&["--cache-dir", &cache]);
        args.extend_from_slice(extra);
        serde_json::from_str(&ok(tmp.path(), &args)).unwrap()
    };
    let (streamed, resident) = (eval(&["--cache-mem", "0"]), eval(&[]));
    for key in ["images", "confusion", "support"] {
        assert_eq!(streamed[key], resident[key], "{key}");
    }
    println!(
        "streamed eval on the GPU: {} images, top-1 {}",
        streamed["images"], streamed["top1"]
    );

    // Each image's prediction through the evaluation's CUDA graph (three
    // warm-up batches, then replays, the partial last batch eager) is the
    // eager evaluation's: the same rows, probabilities within 1e-5.
    let rows = |name: &str, graphs: &str| -> Vec<Vec<String>> {
        eval(&[
            "--val-split",
            "0.6",
            "--batch-size",
            "4",
            "--precision",
            "fp32",
            graphs,
            "--predictions",
            name,
        ]);
        let text = std::fs::read_to_string(tmp.path().join(name)).unwrap();
        text.lines()
            .skip(1)
            .map(|l| l.split(',').map(String::from).collect())
            .collect()
    };
    let (graphed, eager) = (
        rows("graphed.csv", "--cuda-graphs"),
        rows("eager.csv", "--no-cuda-graphs"),
    );
    assert_eq!(graphed.len(), 22);
    assert_eq!(graphed.len(), eager.len());
    for (g, e) in graphed.iter().zip(&eager) {
        assert_eq!(g[..5], e[..5], "{g:?} {e:?}");
        for col in [5, 6] {
            let (a, b): (f64, f64) = (g[col].parse().unwrap(), e[col].parse().unwrap());
            assert!((a - b).abs() <= 1e-5, "{g:?} {e:?}");
        }
    }
}

/// `WORLD_SIZE=1` under NCCL (what one lent GPU can run of the NCCL path):
/// the rank joins a c10d group through ProcessGroupNCCL (NCCL's own log
/// says its communicator started; the run's sums and maxima then go
/// through NCCL on the GPU), the training step stays in the CUDA graph
/// with the gradients' all-reduce captured in it, and with
/// `--deterministic` the run equals a plain one.
#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-check runs it)"]
fn nccl_world_of_one_trains_as_one_process_in_the_graph() {
    if !vggctl::dist::NCCL_BUILT {
        panic!("this vggctl was built without NCCL (scripts/setup installs its headers)");
    }
    let tmp = common::tempdir();
    let det = ["--precision", "fp32", "--deterministic", "--cuda-graphs"];
    let started = std::time::Instant::now();
    let plain = train(&tmp.path().join("plain"), 2, &det);
    let plain_s = started.elapsed().as_secs_f64();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port()
        .to_string();
    let env = [
        ("RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("LOCAL_RANK", "0"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", port.as_str()),
        ("NCCL_DEBUG", "INFO"),
    ];
    let started = std::time::Instant::now();
    let (nccl, run) = train_run(
        &tmp.path().join("nccl"),
        2,
        &[&det[..], &["--dist-backend", "nccl"]].concat(),
        &env,
    );
    let log = format!("{}{}", run.stdout, run.stderr);
    assert!(log.contains("NCCL INFO"), "NCCL never started:\n{log}");
    println!(
        "plain {plain_s:.1} s, NCCL world of one {:.1} s (whole runs, start-up included)",
        started.elapsed().as_secs_f64()
    );
    for (p, n) in plain.iter().zip(&nccl) {
        assert!(n.ran_as.ends_with("CUDA graph"), "{}", n.ran_as);
        assert_eq!(n.profile.as_ref().unwrap().graphed_steps, 10);
        assert_eq!((p.train_loss, p.test_loss), (n.train_loss, n.test_loss));
    }
}

/// `vggctl features` on the device: in fp32 (`--deterministic`) the rows
/// equal the CPU's within 1e-4 of their largest value, in the default fp16
/// autocast (channels-last) within 2e-2; a conv layer's map and fc7-like
/// vectors both.
#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-check runs it)"]
fn features_on_the_device_equal_the_cpus() {
    let tmp = common::tempdir();
    let run = tmp.path().join("run");
    train(&run, 1, &[]);
    let (ckpt, photos) = (
        run.join("last.safetensors").display().to_string(),
        common::fixtures()
            .join("photos")
            .join("cat")
            .join("cat_01.png"),
    );
    let photos = photos.display().to_string();
    let rows = |name: &str, extra: &[&str]| {
        let out = tmp.path().join(name).display().to_string();
        let mut args = vec![
            "features",
            "--checkpoint",
            &ckpt,
            "--layer",
            "features.10,classifier.1",
        ];
        args.extend_from_slice(&["-o", &out, &photos, &photos]);
        args.extend_from_slice(extra);
        ok(tmp.path(), &args);
        read_safetensors(Path::new(&out)).unwrap().tensors
    };
    let cpu = rows("cpu.safetensors", &["--device", "cpu"]);
    let fp32 = rows(
        "fp32.safetensors",
        &["--device", "cuda", "--precision", "fp32", "--deterministic"],
    );
    let fp16 = rows("fp16.safetensors", &["--device", "cuda"]);
    for (name, want) in &cpu {
        let scale = want.abs().max().double_value(&[]).max(1e-12);
        for (what, got, tolerance) in [("fp32", &fp32[name], 1e-4), ("fp16", &fp16[name], 2e-2)] {
            let err = (got - want).abs().max().double_value(&[]) / scale;
            println!("features {name} {what}: {err:.2e} of the largest value");
            assert!(err <= tolerance, "{name} {what}: {err}");
        }
    }
}
