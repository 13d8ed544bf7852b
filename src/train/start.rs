//! How a run starts: a fresh state or the saved one, the ranks of a
//! data-parallel run made alike, the optimizer the numerics ask for, how
//! batches are preprocessed, and the weight averages (with a resumed
//! run's optimizer state).

use std::collections::BTreeMap;

use anyhow::{Result, anyhow, bail};
use tch::{Device, Kind, Tensor};

use crate::data::Dataset;
use crate::data::augment::{Normalizer, Preprocess};
use crate::data::auto_augment::AutoAugment;
use crate::dist::{Sampler, World};
use crate::model::{BN_EPS, BN_MOMENTUM, Layer, PAD_CHANNELS, Values, Vgg, batch_norm};
use crate::numerics::{FusedStep, Numerics, StepPart};
use crate::optim::Optimizer;
use crate::shim::step::{ConvOptions, FusedBn, conv3x3};

use super::config::TrainConfig;
use super::ema::Ema;
use super::run_dir::RunDir;
use super::state::{Partial, TrainState};
use super::swa::Swa;

/// A saved run to continue: its state and its tensors (weights and
/// optimizer state).
pub type Resume = (TrainState, BTreeMap<String, Tensor>);

/// Optimizer tensors still to load, with the file they came from.
pub type OptimizerState = (String, BTreeMap<String, Tensor>);

/// The first state of a run: a fresh one, or the saved one (with `config`'s
/// changes) after loading its weights into `model`, OneCycleLR's updates
/// per epoch settled from the data. Returns the optimizer
/// tensors still to load, with the file they came from.
pub fn start_state(
    mut config: TrainConfig,
    data: &Dataset,
    model: &mut Vgg,
    resume: Option<Resume>,
    run_dir: &RunDir,
) -> Result<(TrainState, Option<OptimizerState>)> {
    let per_rank = |c: &TrainConfig| {
        let sampler = Sampler {
            rank: 0,
            size: c.world_size.max(1),
            repeats: c.ra_reps,
        };
        sampler.len(data.train.len())
    };
    let Some((saved, tensors)) = resume else {
        config.settle_updates(per_rank(&config))?;
        let state = TrainState {
            config,
            class_names: data.classes.clone(),
            mean: data.mean,
            std: data.std,
            epoch: 0,
            step: 0,
            partial: Partial::default(),
            optimizer_steps: 0,
            scaler: None,
            best_top1: None,
            history: Vec::new(),
            run_id: TrainState::new_run_id(),
            weights_in_last: None,
            ema_averaged: None,
            swa_averaged: None,
        };
        return Ok((state, None));
    };
    let source = run_dir.resume().display().to_string();
    let b = saved.config.batch_size as u128;
    let n = per_rank(&saved.config) as u128;
    if saved.step as u128 * b > n {
        bail!(
            "{source}: step {} of epoch {} is past the end of an epoch of {n} images at batch {b}; the file does not belong to this data",
            saved.step,
            saved.epoch + 1
        );
    }
    let weights: BTreeMap<String, Tensor> = tensors
        .iter()
        .filter(|(k, _)| {
            !k.starts_with("optimizer.")
                && !k.starts_with(super::ema::PREFIX)
                && !k.starts_with(super::swa::PREFIX)
        })
        .map(|(k, v)| (k.clone(), v.shallow_clone()))
        .collect();
    model.load_state_dict(&source, &weights, Values::FiniteOnly)?;
    config
        .settle_updates(n as i64)
        .map_err(|e| anyhow!("{source}: {e}"))?;
    Ok((TrainState { config, ..saved }, Some((source, tensors))))
}

/// Makes the ranks of a data-parallel run start alike: the same model,
/// split sizes (`sizes`: train, test) and settings (checked), rank 0's weights and buffers, and the epoch's sums so
/// far held by rank 0 alone (sums are taken across the ranks), and
/// BatchNorm synchronized if asked. CUDA graphs stay on with NCCL (the
/// gradients' all-reduce is captured in the step's graph) and are off with
/// Gloo (its collectives go through the host) and with SyncBatchNorm.
pub fn join_world(
    world: &World,
    model: &mut Vgg,
    state: &mut TrainState,
    numerics: &mut Numerics,
    sizes: [i64; 2],
) -> Result<()> {
    if !world.graphable() {
        numerics.cuda_graphs = false;
    }
    if world.size == 1 {
        return Ok(());
    }
    world.check_same(
        "the model, the data's size and the run's settings",
        fingerprint(model, &state.config, sizes),
    )?;
    world.broadcast_all(model.entries().iter().map(|e| e.tensor))?;
    if !world.is_main() {
        state.partial = Partial::default();
    }
    if state.config.sync_bn {
        model.features.sync = world.sum_across();
        numerics.cuda_graphs = false;
    }
    Ok(())
}

/// A hash of the model's tensor names and shapes, the splits' sizes and the
/// run's settings; the device and the paths are left out (each rank has its
/// own GPU, and each machine may keep the data in its own place).
fn fingerprint(model: &Vgg, config: &TrainConfig, sizes: [i64; 2]) -> i64 {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for e in model.entries() {
        h.update(format!("{}{:?};", e.name, e.tensor.size()));
    }
    h.update(format!("{sizes:?}"));
    let mut c = config.clone();
    c.device = String::new();
    c.data_dir = String::new();
    c.val_dir = None;
    h.update(serde_json::to_vec(&c).unwrap_or_default());
    let d = h.finalize();
    i64::from_le_bytes(d[..8].try_into().expect("8 bytes"))
}

/// What the fused step does for this model (`numerics.fused_step`: the
/// parts the run may use, narrowed to those it uses): with BatchNorm,
/// convolutions before it leave out their bias while training, if every
/// such bias in the trained layers is zero (from scratch; torchvision's
/// pretrained ones are not); without BatchNorm, convolution, bias and ReLU
/// run as one operation (in fp16 channels-last, its backward's ReLU and
/// bias gradients in one kernel), and with it (fp16, channels-last) BatchNorm and
/// ReLU (in vggctl's kernels, else cuDNN's; and the max-pool after them,
/// where one follows), each where it runs on this device and agrees with
/// the plain ops;
/// in half precision, the weights are cast once per step (see
/// [`build_optimizer`]), and channels-last the first convolution's input
/// is padded to 8 channels; on CUDA each convolution's weight gradient is
/// computed on a second stream beside its input gradient.
pub fn fuse_step(model: &mut Vgg, numerics: &mut Numerics) {
    let from = model.frozen_prefix;
    let (may, bn) = (numerics.fused_step, model.spec.bn);
    let features = &mut model.features;
    features.bias_free =
        may.has(StepPart::NoBias) && bn && features.conv_biases_before_bn_are_zero(from);
    features.conv_relu = may.has(StepPart::ConvRelu) && !bn && conv_relu_works(numerics);
    features.relu_bias_grad =
        may.has(StepPart::ReluBiasGrad) && features.conv_relu && relu_bias_grad_works(numerics);
    let bn_op = |part: StepPart, op: FusedBn| may.has(part) && bn && bn_relu_works(numerics, op);
    features.bn_relu = [
        (StepPart::BnReluOwn, FusedBn::Own),
        (StepPart::BnRelu, FusedBn::Cudnn),
    ]
    .into_iter()
    .find_map(|(part, op)| bn_op(part, op).then_some(op));
    features.bn_relu_pool = bn_op(StepPart::BnReluPool, FusedBn::OwnPool);
    let kind = numerics.compute_kind();
    let narrow = matches!(&features.layers[0].1, Layer::Conv { weight, .. }
        if weight.size()[1] < PAD_CHANNELS);
    let pad = may.has(StepPart::PadInput) && numerics.channels_last && kind != Kind::Float;
    features.pad_input = (pad && narrow).then_some(kind);
    features.two_streams = may.has(StepPart::TwoStreams) && two_streams_work(numerics);
    let mut uses = FusedStep::NONE;
    uses.set(StepPart::NoBias, features.bias_free);
    uses.set(StepPart::ConvRelu, features.conv_relu);
    uses.set(StepPart::ReluBiasGrad, features.relu_bias_grad);
    uses.set(StepPart::BnRelu, features.bn_relu == Some(FusedBn::Cudnn));
    uses.set(StepPart::BnReluOwn, features.bn_relu == Some(FusedBn::Own));
    uses.set(StepPart::BnReluPool, features.bn_relu_pool);
    uses.set(StepPart::CastOnce, casts_once(numerics).is_some());
    uses.set(StepPart::PadInput, features.pad_input.is_some());
    uses.set(StepPart::TwoStreams, features.two_streams);
    numerics.fused_step = uses;
}

/// The dtype the fused step keeps its copy of the weights in (half
/// precision with the fused update), if it keeps one.
fn casts_once(numerics: &Numerics) -> Option<Kind> {
    let kind = numerics.compute_kind();
    let may = numerics.fused_step.has(StepPart::CastOnce);
    (may && numerics.fused && kind != Kind::Float).then_some(kind)
}

/// Whether the fused conv+bias+ReLU runs on the run's device, in its
/// compute dtype and layout, and computes what the plain ops compute (fp32
/// within 1e-4, TF32 and half precision within 1e-2 of the largest value), checked
/// once on a small batch of fixed values (no random draws: the run's
/// generator is left as it was).
fn conv_relu_works(numerics: &Numerics) -> bool {
    let (dev, kind) = (numerics.device, numerics.compute_kind());
    let x = numerics
        .input(&fixed_values(&[2, 16, 8, 8], 1.0, dev))
        .to_kind(kind);
    let w = numerics
        .input(&fixed_values(&[16, 16, 3, 3], 0.1, dev))
        .to_kind(kind);
    let b = fixed_values(&[16], 0.1, dev).to_kind(kind);
    let relu = ConvOptions {
        relu: true,
        ..ConvOptions::default()
    };
    let Ok(got) = conv3x3(&x, &w, Some(&b), relu) else {
        return false;
    };
    let (f, wf, bf) = (
        x.to_kind(Kind::Float),
        w.to_kind(Kind::Float),
        b.to_kind(Kind::Float),
    );
    let want = f.conv2d(&wf, Some(&bf), [1, 1], [1, 1], [1, 1], 1).relu();
    // TF32 (and half precision) round the products: their kernels differ more.
    let strict = numerics.precision == crate::numerics::Precision::Fp32;
    close(&got, &want, if strict { 1e-4 } else { 1e-2 })
}

/// Whether the convolution with its gradients on two streams runs on the
/// run's device (CUDA: elsewhere there is one stream) in its compute dtype
/// and layout, and gives the one-stream gradients (within 1e-3 of the
/// largest), checked once on a small batch of fixed values.
fn two_streams_work(numerics: &Numerics) -> bool {
    let (dev, kind) = (numerics.device, numerics.compute_kind());
    let opts = ConvOptions {
        two_streams: true,
        ..ConvOptions::default()
    };
    dev.is_cuda() && same_conv_grads(dev, kind, |t| numerics.input(t), opts)
}

/// Whether conv+bias+ReLU's backward with the ReLU's and the bias's
/// gradients in one kernel of vggctl's own runs here (CUDA, fp16,
/// channels-last) and gives the plain backward's gradients (within 1e-3 of
/// the largest), checked once on a small batch of fixed values.
fn relu_bias_grad_works(numerics: &Numerics) -> bool {
    let (dev, kind) = (numerics.device, numerics.compute_kind());
    let opts = ConvOptions {
        relu: true,
        fused_grad: true,
        ..ConvOptions::default()
    };
    dev.is_cuda()
        && kind == Kind::Half
        && numerics.channels_last
        && same_conv_grads(dev, kind, |t| numerics.input(t), opts)
}

/// Whether the shim's convolution run as `opts` gives the input, weight and
/// bias gradients it gives with only `opts.relu` (within 1e-3 of the
/// largest), in `kind` on `dev`, on fixed values that `layout` puts in the
/// run's layout.
fn same_conv_grads(
    dev: tch::Device,
    kind: Kind,
    layout: impl Fn(&Tensor) -> Tensor,
    opts: ConvOptions,
) -> bool {
    let x = layout(&fixed_values(&[2, 16, 8, 8], 1.0, dev));
    let w = layout(&fixed_values(&[16, 16, 3, 3], 0.1, dev));
    let b = fixed_values(&[16], 0.1, dev);
    let dy = layout(&fixed_values(&[2, 16, 8, 8], 1.0, dev).flip([0]));
    let grads = |opts: ConvOptions| {
        let leaves = [&x, &w, &b].map(|t| t.to_kind(kind).set_requires_grad(true));
        let [x, w, b] = &leaves;
        let y = conv3x3(x, w, Some(b), opts).ok()?;
        let loss = (y.to_kind(Kind::Float) * &dy).sum(Kind::Float);
        Some(Tensor::run_backward(&[loss], &leaves, false, false))
    };
    let plain = ConvOptions {
        relu: opts.relu,
        ..ConvOptions::default()
    };
    match (grads(opts), grads(plain)) {
        (Some(got), Some(want)) => got.iter().zip(&want).all(|(g, w)| close(g, w, 1e-3)),
        _ => false,
    }
}

/// Fixed values in `shape` on `dev` (sines of a ramp, times `scale`): the
/// start-up checks draw no random numbers, so the run's generator is left
/// as it was.
fn fixed_values(shape: &[i64], scale: f64, dev: tch::Device) -> Tensor {
    let n: i64 = shape.iter().product();
    (Tensor::arange(n, (Kind::Float, dev)) * 0.7)
        .sin()
        .view(shape)
        * scale
}

/// Whether `got` is within `tolerance` of `want`'s largest value of it.
fn close(got: &Tensor, want: &Tensor, tolerance: f64) -> bool {
    let want = want.to_kind(Kind::Float);
    let err = (got.to_kind(Kind::Float) - &want)
        .abs()
        .max()
        .double_value(&[]);
    err <= tolerance * want.abs().max().double_value(&[])
}

/// Whether the fused BatchNorm operation `op` runs here (CUDA, fp16,
/// channels-last) and computes what the plain ops compute in fp32 within
/// 1e-2 of the largest value: output, running statistics and the three
/// gradients, checked once on a small batch of fixed values.
fn bn_relu_works(numerics: &Numerics, op: FusedBn) -> bool {
    let dev = numerics.device;
    dev.is_cuda()
        && numerics.compute_kind() == Kind::Half
        && numerics.channels_last
        && fused_bn_agrees(dev, op, |t| numerics.input(t))
}

/// Whether the fused BatchNorm operation `op` on `dev` computes what the
/// plain ops compute in fp32 within 1e-2 of the largest value (see
/// [`bn_relu_works`]); `layout` puts a batch in the run's layout.
fn fused_bn_agrees(dev: tch::Device, op: FusedBn, layout: impl Fn(&Tensor) -> Tensor) -> bool {
    let shape = [4, 16, 8, 8];
    let pool = op == FusedBn::OwnPool;
    let x = layout(&untied_values(&shape, dev)).to_kind(Kind::Half);
    let out_shape = if pool { [4, 16, 4, 4] } else { shape };
    let dy = layout(&fixed_values(&out_shape, 1.0, dev).flip([0]));
    let weight = fixed_values(&[16], 0.5, dev) + 1.0;
    let bias = fixed_values(&[16], 0.1, dev).flip([0]);
    let run = |x: Tensor, fused: bool| {
        let leaves = [x, weight.copy(), bias.copy()].map(|t| t.set_requires_grad(true));
        let stats = [
            Tensor::zeros([16], (Kind::Float, dev)),
            Tensor::ones([16], (Kind::Float, dev)),
        ];
        let [x, w, b] = &leaves;
        let (mean, var) = (&stats[0], &stats[1]);
        let y = match fused {
            true => op.run(x, [w, b], [mean, var], BN_MOMENTUM, BN_EPS).ok()?,
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
        Some((y, stats, grads))
    };
    let (Some(got), Some(want)) = (run(x.copy(), true), run(x.to_kind(Kind::Float), false)) else {
        return false;
    };
    let pairs = [(&got.0, &want.0)]
        .into_iter()
        .chain(got.1.iter().zip(&want.1))
        .chain(got.2.iter().zip(&want.2));
    pairs.into_iter().all(|(g, w)| close(g, w, 1e-2))
}

/// Fixed values in `shape` (NCHW) without near-ties in any 2x2 window:
/// multiples of 0.5 (from [`fixed_values`]) plus 0.125 times the position in
/// the window (0 to 3), so that two values of a window differ by 0.125 or
/// more, and a max-pool picks the same position in fp16 as in fp32 (the
/// gradient of a near-tie could go to either).
fn untied_values(shape: &[i64; 4], dev: tch::Device) -> Tensor {
    let base = fixed_values(shape, 4.0, dev).round() * 0.5;
    let parity = |n: i64| Tensor::arange(n, (Kind::Float, dev)).remainder(2);
    let h = parity(shape[2]).view([1, 1, -1, 1]);
    let w = parity(shape[3]).view([1, 1, 1, -1]);
    base + (h * 2.0 + w) * 0.125
}

/// The optimizer the numerics ask for: the fused update over one flat
/// buffer (parameters in the run's layout; with the fused step in half
/// precision, autograd differentiates the weights' compute copy), or one
/// per parameter.
pub fn build_optimizer(model: &mut Vgg, numerics: &Numerics, config: &TrainConfig) -> Optimizer {
    let ocfg = config.optimizer.clone();
    let mut opt = if numerics.fused {
        let flat = model.flatten_trainable(numerics.channels_last, casts_once(numerics));
        let mut opt = Optimizer::fused(ocfg, model.trainable_parameters(), flat);
        opt.differentiate(model.compute_views());
        opt
    } else {
        if numerics.channels_last {
            model.to_channels_last();
        }
        Optimizer::new(ocfg, model.trainable_parameters())
    };
    let norms = model.norm_parameter_names();
    let ocfg = &config.optimizer;
    opt.decay_by(|name| ocfg.decay_of(name, norms.iter().any(|n| n == name)));
    opt.clip_grad_norm(config.clip_grad_norm);
    opt.clip_grad_value(config.clip_grad_value);
    opt
}

/// How a run's batches become the model's input: the dataset's
/// normalization, the run's augmentation.
pub(super) fn preprocess(config: &TrainConfig, data: &Dataset, device: Device) -> Preprocess {
    let mut pre = Preprocess::new(
        config.augment,
        config.input_size,
        Normalizer::new(data.mean, data.std, device),
    );
    pre.train_side = config.train_crop();
    pre.filter = config.interpolation;
    pre.crop = config.crop_range;
    pre.hflip = config.hflip;
    pre.plain_training = config.no_augment;
    pre.auto_augment = config.auto_augment.map(|policy| AutoAugment {
        policy,
        ra_magnitude: config.ra_magnitude,
        augmix_severity: config.augmix_severity,
        interpolation: config.augment_interpolation,
    });
    pre
}

/// The run's averages of the weights (`--model-ema`'s, `--swa-start`'s),
/// and with the optimizer's state, a resumed run's (`resumed`: where from,
/// and the resume point's tensors).
pub(super) fn averages(
    state: &TrainState,
    model: &Vgg,
    opt: &mut Optimizer,
    resumed: Option<(String, std::collections::BTreeMap<String, Tensor>)>,
) -> Result<(Option<Ema>, Option<Swa>)> {
    let mut ema = state.config.model_ema.map(|c| Ema::new(model, c));
    let mut swa = state.config.swa.map(|_| Swa::new(model));
    if let Some((source, mut tensors)) = resumed {
        opt.load_state(&source, &tensors, state.optimizer_steps)?;
        if let Some(ema) = &mut ema {
            ema.load(&source, model, &mut tensors)?;
            ema.n_averaged = state.ema_averaged.unwrap_or(0);
        }
        if let Some(swa) = &mut swa {
            let n = state.swa_averaged.unwrap_or(0);
            swa.load(&source, model, &mut tensors, n)?;
        }
    }
    Ok((ema, swa))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The start-up check of the fused conv+bias+ReLU passes where the
    /// operation is the plain ops (the CPU), in both layouts, and leaves
    /// libtorch's generator as it was.
    #[test]
    fn the_conv_relu_check_passes_where_it_is_the_plain_ops() {
        let _seeded = crate::seeded();
        let mut numerics = Numerics::plain_cpu();
        tch::manual_seed(1);
        let before = Tensor::randn([4], (tch::Kind::Float, tch::Device::Cpu));
        for channels_last in [false, true] {
            numerics.channels_last = channels_last;
            tch::manual_seed(1);
            assert!(conv_relu_works(&numerics), "channels_last {channels_last}");
            let after = Tensor::randn([4], (tch::Kind::Float, tch::Device::Cpu));
            assert!(after.equal(&before), "the check drew random numbers");
        }
    }

    /// The start-up checks of BatchNorm+ReLU (+max-pool) in vggctl's
    /// kernels pass on the kernels as the CPU runs them (the GPU's source,
    /// thread by thread), and the check of cuDNN's BatchNorm+ReLU fails
    /// there (only cuDNN runs it).
    #[test]
    fn the_batchnorm_checks_pass_on_the_kernels_run_on_the_cpu() {
        let _seeded = crate::seeded();
        let layout = |t: &Tensor| crate::model::to_channels_last(t);
        assert!(fused_bn_agrees(tch::Device::Cpu, FusedBn::OwnPool, layout));
        assert!(fused_bn_agrees(tch::Device::Cpu, FusedBn::Own, layout));
        assert!(!fused_bn_agrees(tch::Device::Cpu, FusedBn::Cudnn, layout));
    }

    /// The start-up check of the fused ReLU and bias gradients passes on the
    /// kernel as the CPU runs it (fp16, channels-last).
    #[test]
    fn the_relu_bias_grad_check_passes_on_the_kernel_run_on_the_cpu() {
        let _seeded = crate::seeded();
        let layout = |t: &Tensor| crate::model::to_channels_last(t);
        let opts = ConvOptions {
            relu: true,
            fused_grad: true,
            ..ConvOptions::default()
        };
        assert!(same_conv_grads(tch::Device::Cpu, Kind::Half, layout, opts));
    }

    /// The fused step uses the parts asked for that apply to the model and
    /// run here, and none that `--no-fused-step=PART` left out (the CPU:
    /// BatchNorm+ReLU refuses, the rest runs as plain ops).
    #[test]
    fn the_fused_step_uses_the_parts_asked_for_that_apply() {
        use crate::model::{Arch, Head, ModelSpec};
        let _seeded = crate::seeded();
        let numerics = |left_out: &[StepPart], channels_last: bool| Numerics {
            precision: crate::numerics::Precision::Bf16,
            channels_last,
            fused: true,
            fused_step: FusedStep::without(left_out),
            ..Numerics::plain_cpu()
        };
        let fused_as = |bn: bool, left_out: &[StepPart], channels_last: bool| {
            let spec = ModelSpec::new(Arch::Vgg11, bn, Head::Cifar, 10);
            let mut model = Vgg::new(spec, tch::Device::Cpu);
            let mut n = numerics(left_out, channels_last);
            fuse_step(&mut model, &mut n);
            let padded = model.features.pad_input == Some(Kind::BFloat16);
            assert_eq!(padded, n.fused_step.has(StepPart::PadInput));
            let f = &model.features;
            let bn_relu = |op| f.bn_relu == Some(op);
            assert_eq!(
                [
                    f.bias_free,
                    f.conv_relu,
                    bn_relu(FusedBn::Cudnn),
                    bn_relu(FusedBn::Own),
                    f.bn_relu_pool
                ],
                [
                    StepPart::NoBias,
                    StepPart::ConvRelu,
                    StepPart::BnRelu,
                    StepPart::BnReluOwn,
                    StepPart::BnReluPool
                ]
                .map(|p| n.fused_step.has(p)),
                "the layers do what the numerics say"
            );
            n.fused_step.names()
        };
        let fused = |bn: bool, left_out: &[StepPart]| fused_as(bn, left_out, false);
        assert_eq!(fused(true, &[]), "no-bias, cast-once");
        assert_eq!(fused_as(true, &[], true), "no-bias, cast-once, pad-input");
        assert_eq!(
            fused_as(false, &[StepPart::PadInput], true),
            "conv-relu, cast-once"
        );
        assert_eq!(fused(true, &[StepPart::NoBias]), "cast-once");
        assert_eq!(fused(false, &[]), "conv-relu, cast-once");
        assert_eq!(fused(false, &[StepPart::CastOnce]), "conv-relu");
        assert_eq!(fused(false, &[StepPart::ConvRelu, StepPart::CastOnce]), "");
    }
}
