//! The fused training step's algebra (issue #18), checked on CPU tensors:
//! a convolution followed by training-mode BatchNorm may leave out its
//! bias (`Sequential::bias_free`), because BatchNorm subtracts the batch
//! mean. With any bias the outputs and the other gradients are the
//! reference's and the bias's own gradient is zero; only the running mean
//! moves by the bias, which is why the trainer turns it on only while the
//! biases are zero. From torchvision's zero biases, training with the
//! fused update equals the reference step (the bias-free parameters'
//! gradients are zero-filled) and the biases stay exactly zero.

use std::collections::BTreeMap;

use tch::{Device, Kind, Tensor};
use vggctl::model::{Arch, Head, Layer, ModelSpec, Vgg};
use vggctl::optim::{Optimizer, OptimizerConfig};

/// libtorch's generator is the process's: each test holds this while it
/// seeds and draws, so that tests running side by side draw alike.
static SEEDED: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The `.bias` names of the model's convolutions.
fn conv_bias_names(m: &Vgg) -> Vec<String> {
    m.features
        .layers
        .iter()
        .filter(|(_, l)| matches!(l, Layer::Conv { .. }))
        .map(|(n, _)| format!("{n}.bias"))
        .collect()
}

/// VGG11-BN with the GAP head (no dropout), seeded: two calls give the
/// same model.
fn model() -> Vgg {
    tch::manual_seed(11);
    Vgg::new(
        ModelSpec::new(Arch::Vgg11, true, Head::Gap, 10),
        Device::Cpu,
    )
}

fn batch() -> (Tensor, Tensor) {
    tch::manual_seed(5);
    let x = Tensor::randn([8, 3, 32, 32], (Kind::Float, Device::Cpu));
    let y = Tensor::randint(10, [8], (Kind::Int64, Device::Cpu));
    (x, y)
}

/// Training-mode logits on `x` and the gradients of their cross-entropy
/// with `y` for every parameter (undefined for one the loss did not use).
fn gradients(m: &Vgg, x: &Tensor, y: &Tensor) -> (Tensor, Vec<Tensor>) {
    let logits = m.forward_t(x, true);
    let loss = logits.cross_entropy_for_logits(y);
    let params: Vec<Tensor> = m
        .parameters()
        .into_iter()
        .map(|(_, t)| t.shallow_clone())
        .collect();
    let grads = Tensor::run_backward(&[&loss], &params, false, false);
    (logits, grads)
}

/// `m` after five steps of the fused SGD update (momentum 0.9, weight
/// decay 5e-4, lr 0.05) on the test batch.
fn five_steps(mut m: Vgg) -> Vgg {
    let cfg = OptimizerConfig::recipe_sgd();
    let (x, y) = batch();
    let flat = m.flatten_trainable(false, None);
    let mut opt = Optimizer::fused(cfg, m.trainable_parameters(), flat);
    for _ in 0..5 {
        let loss = m.forward_t(&x, true).cross_entropy_for_logits(&y);
        opt.backward_step(&loss, 0.05).unwrap();
    }
    m
}

/// Gives the convolutions of both models the same random biases
/// (N(0, 0.1²), seeded).
fn same_random_conv_biases(a: &Vgg, b: &Vgg) {
    tch::manual_seed(3);
    for (x, y) in conv_biases(a).iter().zip(conv_biases(b)) {
        let values = Tensor::randn(x.size(), (Kind::Float, Device::Cpu)) * 0.1;
        tch::no_grad(|| {
            x.shallow_clone().copy_(&values);
            y.shallow_clone().copy_(&values);
        });
    }
}

/// What `make` builds after five steps, and after five steps with `fuse`
/// applied to it first.
fn reference_and_fused(make: fn() -> Vgg, fuse: fn(&mut Vgg)) -> [Vgg; 2] {
    let mut fused = make();
    fuse(&mut fused);
    [five_steps(make()), five_steps(fused)]
}

/// Every parameter of `fused` but those named in `skip` within 1e-5 of
/// `reference`'s, and (where `travelled`) training moved them away from
/// `start`'s.
fn assert_trained_alike(reference: &Vgg, fused: &Vgg, start: &Vgg, skip: &[String], moved: bool) {
    let mut travelled = 0.0f64;
    for (((name, a), (_, b)), (_, s)) in reference
        .parameters()
        .into_iter()
        .zip(fused.parameters())
        .zip(start.parameters())
    {
        if skip.contains(&name) {
            continue;
        }
        assert!(rel(b, a) < 1e-5, "{name}: {}", rel(b, a));
        travelled = travelled.max(rel(a, s));
    }
    assert!(
        !moved || travelled > 1e-3,
        "training did not move the weights: {travelled}"
    );
}

/// Largest |a - b| over the largest |b| (or 1e-30).
fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let diff = (a - b).abs().max().double_value(&[]);
    diff / b.abs().max().double_value(&[]).max(1e-30)
}

/// The convolutions' biases (those before BatchNorm: all of them here).
fn conv_biases(m: &Vgg) -> Vec<Tensor> {
    m.features
        .layers
        .iter()
        .filter_map(|(_, l)| match l {
            Layer::Conv { bias, .. } => Some(bias.shallow_clone()),
            _ => None,
        })
        .collect()
}

/// Copies of the BatchNorm layers' running means or variances.
fn running(m: &Vgg, which: &str) -> Vec<Tensor> {
    running_tensors(m, which).iter().map(Tensor::copy).collect()
}

/// The BatchNorm layers' running means or variances themselves.
fn running_tensors(m: &Vgg, which: &str) -> Vec<Tensor> {
    m.features
        .layers
        .iter()
        .filter_map(|(_, l)| match l {
            Layer::BatchNorm {
                running_mean,
                running_var,
                ..
            } => Some(match which {
                "mean" => running_mean.shallow_clone(),
                _ => running_var.shallow_clone(),
            }),
            _ => None,
        })
        .collect()
}

#[test]
fn a_bias_before_training_batchnorm_cancels() {
    let _seeded = SEEDED.lock().unwrap_or_else(|e| e.into_inner());
    let (reference, fused) = (model(), model());
    assert!(fused.features.conv_biases_before_bn_are_zero(0));
    same_random_conv_biases(&reference, &fused);
    assert!(!fused.features.conv_biases_before_bn_are_zero(0));
    // Only the last convolution's bias is beyond the first 25 modules.
    assert!(!fused.features.conv_biases_before_bn_are_zero(25));
    let mut fused = fused;
    fused.features.bias_free = true;
    let (x, y) = batch();
    let grads = [gradients(&reference, &x, &y), gradients(&fused, &x, &y)];
    let ((logits_a, grads_a), (logits_b, grads_b)) = (&grads[0], &grads[1]);
    assert!(
        rel(logits_b, logits_a) < 1e-5,
        "{}",
        rel(logits_b, logits_a)
    );
    let names: Vec<String> = reference.parameters().into_iter().map(|(n, _)| n).collect();
    let biases = conv_biases(&reference);
    let conv_bias_names = conv_bias_names(&reference);
    assert_eq!(conv_bias_names.len(), 8);
    let scale = grads_a
        .iter()
        .map(|g| g.abs().max().double_value(&[]))
        .fold(0.0, f64::max);
    for ((name, a), b) in names.iter().zip(grads_a).zip(grads_b) {
        if conv_bias_names.contains(name) {
            assert!(!b.defined(), "{name}: the fused model used its bias");
            // The reference's gradient is zero up to rounding; the fused
            // model's is absent (the bias is not in its graph).
            let top = a.abs().max().double_value(&[]);
            assert!(top < 1e-6 * scale, "{name}: {top} against {scale}");
        } else {
            assert!(b.defined(), "{name} has no gradient");
            assert!(rel(b, a) < 1e-5, "{name}: {}", rel(b, a));
        }
    }
    let undefined = grads_b.iter().filter(|g| !g.defined()).count();
    assert_eq!(
        undefined,
        biases.len(),
        "every convolution's bias, and nothing else"
    );
    // The running mean is the batch mean of what BatchNorm saw: shifted
    // by the bias (times the momentum); the variance is not.
    for ((ma, mb), bias) in running(&reference, "mean")
        .iter()
        .zip(running(&fused, "mean"))
        .zip(&biases)
    {
        let shift = ma - &mb;
        assert!(
            rel(&shift, &(bias * 0.1)) < 1e-5,
            "{}",
            rel(&shift, &(bias * 0.1))
        );
    }
    for (va, vb) in running(&reference, "var")
        .iter()
        .zip(running(&fused, "var"))
    {
        assert!(rel(&vb, va) < 1e-5, "{}", rel(&vb, va));
    }
}

/// Five steps of the fused SGD update (momentum, weight decay) from
/// torchvision's zero biases, each bias-free step taken from the
/// reference's state before it (weights, running statistics and momentum;
/// its own biases and their momentum, zero): every update follows the
/// reference's within 1e-5, and the biases stay exactly zero. Stepping
/// from the reference's state keeps the check about the step: two
/// trajectories that drift apart by rounding meet a max-pool's near-tie
/// or a ReLU's zero sooner or later and part by 1e-3 (seen after five
/// free-running steps on one CPU and not on another).
#[test]
fn from_zero_biases_the_fused_step_trains_as_the_reference() {
    let _seeded = SEEDED.lock().unwrap_or_else(|e| e.into_inner());
    let (mut reference, mut fused) = (model(), model());
    fused.features.bias_free = true;
    let (x, y) = batch();
    let biases = conv_bias_names(&reference);
    let optimizer = |m: &mut Vgg| {
        let flat = m.flatten_trainable(false, None);
        Optimizer::fused(
            OptimizerConfig::recipe_sgd(),
            m.trainable_parameters(),
            flat,
        )
    };
    let (mut ref_opt, mut fused_opt) = (optimizer(&mut reference), optimizer(&mut fused));
    for step in 1..=5 {
        take_state(&fused, &reference, &biases);
        let mut momentum: BTreeMap<String, Tensor> = ref_opt.state_tensors().into_iter().collect();
        for (key, t) in fused_opt.state_tensors() {
            if biases.iter().any(|b| key.ends_with(&format!(".{b}"))) {
                momentum.insert(key, t);
            }
        }
        fused_opt
            .load_state("the reference", &momentum, step - 1)
            .unwrap();
        for (m, opt) in [(&reference, &mut ref_opt), (&fused, &mut fused_opt)] {
            let loss = m.forward_t(&x, true).cross_entropy_for_logits(&y);
            opt.backward_step(&loss, 0.05).unwrap();
        }
        for b in conv_biases(&fused) {
            assert_eq!(
                b.abs().max().double_value(&[]),
                0.0,
                "step {step}: a bias moved"
            );
        }
        let moved = conv_biases(&reference)
            .iter()
            .map(|b| b.abs().max().double_value(&[]))
            .fold(0.0, f64::max);
        assert!(moved < 1e-6, "the reference's biases moved by {moved}");
        assert_trained_alike(&reference, &fused, &model(), &biases, step == 5);
        for which in ["mean", "var"] {
            for (a, b) in running(&reference, which)
                .iter()
                .zip(running(&fused, which))
            {
                assert!(
                    rel(&b, a) < 1e-5,
                    "step {step}: running {which}: {}",
                    rel(&b, a)
                );
            }
        }
    }
}

/// `to` takes `from`'s parameters (but those named in `skip`) and running
/// statistics, in place (its optimizer's flat buffer stays its own).
fn take_state(to: &Vgg, from: &Vgg, skip: &[String]) {
    tch::no_grad(|| {
        for ((name, t), (_, f)) in to.parameters().into_iter().zip(from.parameters()) {
            if !skip.contains(&name) {
                t.shallow_clone().copy_(f);
            }
        }
        for which in ["mean", "var"] {
            for (t, f) in running_tensors(to, which).iter().zip(running(from, which)) {
                t.shallow_clone().copy_(&f);
            }
        }
    });
}

/// Without BatchNorm nothing is left out: every bias is used.
#[test]
fn without_batchnorm_every_bias_is_used() {
    let _seeded = SEEDED.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(11);
    let mut m = Vgg::new(
        ModelSpec::new(Arch::Vgg11, false, Head::Gap, 10),
        Device::Cpu,
    );
    m.features.bias_free = true;
    assert!(m.features.conv_biases_before_bn_are_zero(0), "vacuously");
    let (x, y) = batch();
    let (_, grads) = gradients(&m, &x, &y);
    assert!(grads.iter().all(|g| g.defined()));
}

/// VGG11 without BatchNorm, GAP head (no dropout), seeded.
fn plain_model() -> Vgg {
    tch::manual_seed(11);
    Vgg::new(
        ModelSpec::new(Arch::Vgg11, false, Head::Gap, 10),
        Device::Cpu,
    )
}

/// Convolution, bias and ReLU as one operation with its own backward
/// (the shim's; on the CPU its forward is the plain ops, so the backward is
/// what this checks): the logits equal the plain model's, every gradient
/// within 1e-5 of its largest value in fp32 (a bias's gradient sums the
/// 8,192 positions of the batch in another order than libtorch's: the
/// first one's 1.2e-6 apart on one CPU, below 1e-6 on another) and 1e-2
/// under bf16 autocast, each side rounding in its own order.
#[test]
fn conv_bias_relu_is_the_plain_ops_with_their_gradients() {
    let _seeded = SEEDED.lock().unwrap_or_else(|e| e.into_inner());
    let reference = plain_model();
    let mut fused = plain_model();
    fused.features.conv_relu = true;
    same_random_conv_biases(&reference, &fused);
    let (x, y) = batch();
    for (autocast, tolerance) in [(false, 1e-5), (true, 1e-2)] {
        let run = |m: &Vgg| match autocast {
            true => vggctl::shim::cpu_autocast(|| gradients(m, &x, &y)).unwrap(),
            false => gradients(m, &x, &y),
        };
        let ((la, ga), (lb, gb)) = (run(&reference), run(&fused));
        assert!(
            rel(&lb, &la) <= tolerance,
            "autocast {autocast}: logits {}",
            rel(&lb, &la)
        );
        let names: Vec<String> = reference.parameters().into_iter().map(|(n, _)| n).collect();
        for ((name, a), b) in names.iter().zip(&ga).zip(&gb) {
            assert!(b.defined() && b.kind() == Kind::Float, "{name}");
            assert!(
                rel(b, a) <= tolerance,
                "autocast {autocast}: {name}: {}",
                rel(b, a)
            );
        }
    }
}

/// Five fused SGD steps with the conv+bias+ReLU operation equal the plain
/// model's within 1e-5.
#[test]
fn conv_bias_relu_trains_as_the_plain_ops() {
    let _seeded = SEEDED.lock().unwrap_or_else(|e| e.into_inner());
    let runs = reference_and_fused(plain_model, |m| m.features.conv_relu = true);
    assert_trained_alike(&runs[0], &runs[1], &plain_model(), &[], true);
}

/// The shim's convolution itself (the model falls back to the plain ops if
/// it fails, which the model-level checks above could not tell): with and
/// without its bias and ReLU, asked for two streams or not (one stream on
/// a CPU), it answers, and its output and the input, weight and bias
/// gradients equal autograd's through the plain ops, in fp32 and
/// channels-last.
#[test]
fn the_shims_convolution_answers_with_autograds_gradients() {
    let _seeded = SEEDED.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(7);
    let opts = (Kind::Float, Device::Cpu);
    let forms = [
        (true, true, false),
        (true, false, true),
        (false, false, true),
        (false, true, true),
    ];
    for channels_last in [false, true] {
        for (bias, relu, two_streams) in forms {
            let layout = |t: Tensor| match channels_last {
                true => vggctl::model::to_channels_last(&t),
                false => t,
            };
            let x = layout(Tensor::randn([4, 8, 6, 6], opts)).set_requires_grad(true);
            let w = layout(Tensor::randn([5, 8, 3, 3], opts) * 0.2).set_requires_grad(true);
            let b = Tensor::randn([5], opts).set_requires_grad(true);
            let weights = Tensor::randn([4, 5, 6, 6], opts);
            let b = bias.then_some(&b);
            let conv = vggctl::shim::step::ConvOptions {
                relu,
                two_streams,
                fused_grad: false,
            };
            let fused = vggctl::shim::step::conv3x3(&x, &w, b, conv).unwrap();
            let mut plain = x.conv2d(&w, b, [1, 1], [1, 1], [1, 1], 1);
            if relu {
                plain = plain.relu();
                assert!(fused.min().double_value(&[]) == 0.0, "no ReLU");
            }
            let form = format!("bias {bias}, relu {relu}, channels_last {channels_last}");
            assert!(rel(&fused, &plain) < 1e-6, "{form}");
            let inputs: Vec<&Tensor> = [Some(&x), Some(&w), b].into_iter().flatten().collect();
            let grads = |y: &Tensor| {
                Tensor::run_backward(&[(y * &weights).sum(Kind::Float)], &inputs, false, false)
            };
            let (gf, gp) = (grads(&fused), grads(&plain));
            for (what, (f, p)) in ["input", "weight", "bias"].iter().zip(gf.iter().zip(&gp)) {
                assert!(rel(f, p) < 1e-5, "{what} ({form}): {}", rel(f, p));
            }
        }
    }
}

/// The test batch, in NHWC strides if asked.
fn batch_in(channels_last: bool) -> (Tensor, Tensor) {
    let (x, y) = batch();
    match channels_last {
        true => (vggctl::model::to_channels_last(&x), y),
        false => (x, y),
    }
}

/// VGG11-BN (GAP head) with its trained weights flattened with `compute`
/// (the weights' compute copy) in the layout asked for, and the fused SGD
/// update over them.
fn flattened(compute: Option<Kind>, channels_last: bool) -> (Vgg, Optimizer) {
    let mut m = model();
    let cfg = OptimizerConfig::recipe_sgd();
    let flat = m.flatten_trainable(channels_last, compute);
    let mut opt = Optimizer::fused(cfg, m.trainable_parameters(), flat);
    opt.differentiate(m.compute_views());
    (m, opt)
}

/// The cross-entropy of `m`'s training-mode logits under bf16 autocast.
fn bf16_loss(m: &Vgg, x: &Tensor, y: &Tensor) -> Tensor {
    vggctl::shim::cpu_autocast(|| m.forward_t(x, true))
        .unwrap()
        .to_kind(Kind::Float)
        .cross_entropy_for_logits(y)
}

/// The weights cast to bf16 once per step (one compute copy that autograd
/// differentiates) give autocast's gradients bit for bit, in both layouts:
/// the copy's views hold every convolution and linear tensor in bf16 and
/// their gradients, cast to fp32, are the ones autocast's casts per layer
/// give the parameters.
#[test]
fn weights_cast_once_give_autocasts_gradients() {
    let _seeded = SEEDED.lock().unwrap_or_else(|e| e.into_inner());
    for channels_last in [false, true] {
        let (x, y) = batch_in(channels_last);
        let (reference, _) = flattened(None, channels_last);
        let (cast, _) = flattened(Some(Kind::BFloat16), channels_last);
        assert!(reference.compute_views().is_empty());
        let views: std::collections::BTreeMap<String, Tensor> =
            cast.compute_views().into_iter().collect();
        // VGG11: 8 convolutions and one linear layer, weight and bias each.
        assert_eq!(views.len(), 18, "channels_last {channels_last}");
        let names: Vec<String> = reference.parameters().into_iter().map(|(n, _)| n).collect();
        let sources: Vec<Tensor> = cast
            .parameters()
            .into_iter()
            .map(|(n, t)| views.get(&n).unwrap_or(t).shallow_clone())
            .collect();
        let params: Vec<Tensor> = reference
            .parameters()
            .into_iter()
            .map(|(_, t)| t.shallow_clone())
            .collect();
        let want = Tensor::run_backward(&[bf16_loss(&reference, &x, &y)], &params, false, false);
        let got = Tensor::run_backward(&[bf16_loss(&cast, &x, &y)], &sources, false, false);
        for ((name, w), g) in names.iter().zip(&want).zip(&got) {
            let copied = views.contains_key(name);
            let kind = if copied { Kind::BFloat16 } else { Kind::Float };
            assert_eq!(g.kind(), kind, "{name}");
            assert!(w.equal(&g.to_kind(Kind::Float)), "{name}: {}", rel(g, w));
            if copied && channels_last && g.dim() == 4 {
                assert!(vggctl::model::is_channels_last(&views[name]), "{name}");
            }
        }
    }
}

/// Three fused SGD steps with the weights cast once per step equal
/// autocast's within 1e-6 (the gradients are equal bit for bit, above;
/// the update's CPU kernel rounds an element in its vector body or its
/// scalar tail by where the element sits in the flat buffer, and the copy
/// moves the convolution and linear weights to its front), momentum
/// buffers too, in both layouts; the update leaves the copy stale and the
/// next training forward pass refreshes it.
#[test]
fn weights_cast_once_per_step_train_as_autocast_casts() {
    let _seeded = SEEDED.lock().unwrap_or_else(|e| e.into_inner());
    for channels_last in [false, true] {
        let (x, y) = batch_in(channels_last);
        let mut runs = [None, Some(Kind::BFloat16)].map(|compute| {
            let (m, mut opt) = flattened(compute, channels_last);
            for _ in 0..3 {
                opt.backward_step(&bf16_loss(&m, &x, &y), 0.05).unwrap();
            }
            (m, opt.state_tensors())
        });
        let [(reference, ref_state), (cast, cast_state)] = &mut runs;
        let dict: std::collections::BTreeMap<String, Tensor> =
            cast.state_dict().into_iter().collect();
        for (name, a) in reference.state_dict() {
            assert!(
                rel(&dict[&name], &a) < 1e-6,
                "{name} (channels_last {channels_last}): {}",
                rel(&dict[&name], &a)
            );
        }
        assert_trained_alike(reference, cast, &model(), &[], true);
        assert_eq!(ref_state.len(), cast_state.len());
        for ((na, a), (nb, b)) in ref_state.iter().zip(cast_state.iter()) {
            assert_eq!(na, nb);
            assert!(
                rel(b, a) < 1e-6,
                "{na} (channels_last {channels_last}): {}",
                rel(b, a)
            );
        }
        let params: std::collections::BTreeMap<String, Tensor> = cast
            .parameters()
            .into_iter()
            .map(|(n, t)| (n, t.to_kind(Kind::BFloat16)))
            .collect();
        let views = cast.compute_views();
        let stale = views.iter().filter(|(n, v)| !v.equal(&params[n])).count();
        assert!(stale > 0, "the update wrote the copy");
        let _ = bf16_loss(cast, &x, &y);
        for (name, view) in &views {
            assert!(view.equal(&params[name]), "{name} not refreshed");
        }
    }
}

/// BatchNorm+ReLU as one operation is cuDNN's (CUDA, fp16, channels-last):
/// elsewhere the shim refuses it with an error, not a crash, and a model
/// asked to fuse it runs the plain ops instead, exactly: the same logits
/// bit for bit, the same running statistics, each BatchNorm counted once;
/// it keeps the failure for the trainer to report once, and stops trying.
#[test]
fn batchnorm_relu_falls_back_to_the_plain_ops_where_cudnn_cannot_run_it() {
    let _seeded = SEEDED.lock().unwrap_or_else(|e| e.into_inner());
    let opts = (Kind::Float, Device::Cpu);
    let (x, _) = batch();
    let (w, b) = (Tensor::ones([3], opts), Tensor::zeros([3], opts));
    let (m, v) = (Tensor::zeros([3], opts), Tensor::ones([3], opts));
    let cudnn = vggctl::shim::step::FusedBn::Cudnn;
    let err = cudnn.run(&x, [&w, &b], [&m, &v], 0.1, 1e-5).unwrap_err();
    let err = format!("{err:#}");
    // Built with cuDNN's headers (the torch wheel's), or without.
    assert!(
        err.contains("CUDA fp16 channels-last") || err.contains("no cuDNN headers"),
        "{err}"
    );
    assert_eq!(
        m.abs().max().double_value(&[]),
        0.0,
        "the refusal moved the statistics"
    );
    let (reference, mut fused) = (model(), model());
    fused.features.bn_relu = Some(cudnn);
    let (a, b) = (reference.forward_t(&x, true), fused.forward_t(&x, true));
    assert!(a.equal(&b), "{}", rel(&b, &a));
    for which in ["mean", "var"] {
        for (a, b) in running(&reference, which)
            .iter()
            .zip(running(&fused, which))
        {
            assert!(a.equal(&b), "running {which}");
        }
    }
    assert_eq!(reference.num_batches_tracked(), fused.num_batches_tracked());
    assert!(fused.num_batches_tracked().iter().all(|(_, n)| *n == 1));
    // The failure is kept for the trainer's warning, once; after it the
    // model does not try again.
    let why = fused
        .features
        .take_fusion_failure()
        .expect("a failure to report");
    assert!(why.contains("BatchNorm+ReLU"), "{why}");
    assert_eq!(fused.features.take_fusion_failure(), None);
    let _ = fused.forward_t(&x, true);
    assert_eq!(fused.features.take_fusion_failure(), None, "it tried again");
}

/// The first convolution with its input and weight zero-padded to 8
/// channels (`Sequential::pad_input`, here in fp32 to check the algebra)
/// computes what the plain layer computes (VGG11 without BatchNorm, so
/// that every bias has a gradient): logits and every gradient within 1e-5,
/// NCHW and channels-last, alone and with conv+bias+ReLU as one operation,
/// the weight's gradient with the weight's 3 channels; five fused SGD
/// steps train alike.
#[test]
fn a_first_convolution_padded_to_8_channels_computes_the_plain_one() {
    let _seeded = SEEDED.lock().unwrap_or_else(|e| e.into_inner());
    let pad = |m: &mut Vgg| m.features.pad_input = Some(Kind::Float);
    for (channels_last, conv_relu) in [(false, false), (true, false), (true, true)] {
        let (x, y) = batch();
        let [mut plain, mut padded] = [plain_model(), plain_model()];
        pad(&mut padded);
        padded.features.conv_relu = conv_relu;
        let x = match channels_last {
            true => {
                plain.to_channels_last();
                padded.to_channels_last();
                vggctl::model::to_channels_last(&x)
            }
            false => x,
        };
        let (l0, g0) = gradients(&plain, &x, &y);
        let (l1, g1) = gradients(&padded, &x, &y);
        assert!(rel(&l1, &l0) < 1e-5, "logits: {}", rel(&l1, &l0));
        for ((name, _), (a, b)) in plain.parameters().into_iter().zip(g1.iter().zip(&g0)) {
            assert_eq!(a.size(), b.size(), "{name}");
            assert!(rel(a, b) < 1e-5, "{name}: {}", rel(a, b));
        }
    }
    let [reference, fused] = reference_and_fused(plain_model, pad);
    assert_trained_alike(&reference, &fused, &plain_model(), &[], true);
}

/// Every convolution run as the shim's operation (`Sequential::two_streams`;
/// on a CPU its gradients come from one stream, so this checks the model's
/// use of it): logits and every gradient within 1e-5 of the plain model's,
/// with BatchNorm (also without the biases before it) and without (also
/// with conv+bias+ReLU as one operation); five fused SGD steps alike.
#[test]
fn convolutions_as_the_shims_operation_compute_the_plain_ones() {
    let _seeded = SEEDED.lock().unwrap_or_else(|e| e.into_inner());
    let (x, y) = batch();
    for (bn, bias_free, conv_relu) in [
        (true, false, false),
        (true, true, false),
        (false, false, true),
    ] {
        let make = if bn { model } else { plain_model };
        let (plain, mut shims) = (make(), make());
        shims.features.two_streams = true;
        shims.features.bias_free = bias_free;
        shims.features.conv_relu = conv_relu;
        let (l0, g0) = gradients(&plain, &x, &y);
        let (l1, g1) = gradients(&shims, &x, &y);
        let failed = shims.features.take_fusion_failure();
        assert!(
            failed.is_none(),
            "the shim's convolution failed: {failed:?}"
        );
        assert!(rel(&l1, &l0) < 1e-5, "logits: {}", rel(&l1, &l0));
        for ((name, _), (a, b)) in plain.parameters().into_iter().zip(g1.iter().zip(&g0)) {
            if bn && conv_bias_names(&plain).contains(&name) {
                // Before BatchNorm the bias cancels: it is left out (no
                // gradient) or its gradient is rounding.
                match a.defined() {
                    true => assert!(a.abs().max().double_value(&[]) < 1e-6, "{name}"),
                    false => assert!(bias_free, "{name}"),
                }
                continue;
            }
            assert!(rel(a, b) < 1e-5, "{name}: {}", rel(a, b));
        }
    }
    let [reference, fused] = reference_and_fused(plain_model, |m| m.features.two_streams = true);
    assert_trained_alike(&reference, &fused, &plain_model(), &[], true);
}
