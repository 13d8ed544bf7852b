//! vggctl's models against torchvision: identical state-dict keys and shapes,
//! eval-mode logits within 1e-4 (fp32, max abs error) on the same weights and
//! input, exact parameter counts, and torchvision's initialization scheme.

mod common;

use std::collections::BTreeMap;

use tch::{Device, Kind, Tensor};
use vggctl::formats::pth::read_pth;
use vggctl::formats::safetensors::read_safetensors;
use vggctl::model::{Arch, Head, Layer, ModelSpec, Vgg};

fn spec_from_meta(meta: &std::collections::HashMap<String, String>) -> ModelSpec {
    let (arch, _) = Arch::parse_with_bn(&meta["arch"]).unwrap();
    ModelSpec::new(
        arch,
        meta["bn"] == "true",
        meta["head"].parse().unwrap(),
        meta["classes"].parse().unwrap(),
    )
}

/// Same keys and shapes as torchvision, logits within 1e-4, and the state
/// dict comes back out bit-identical (num_batches_tracked included).
fn check_parity(
    source: &str,
    spec: ModelSpec,
    weights: &BTreeMap<String, Tensor>,
    io: &BTreeMap<String, Tensor>,
) {
    let mut model = Vgg::new(spec, Device::Cpu);
    let ours: BTreeMap<String, Vec<i64>> = model
        .state_dict()
        .into_iter()
        .map(|(k, t)| (k, t.size()))
        .collect();
    let theirs: BTreeMap<String, Vec<i64>> =
        weights.iter().map(|(k, t)| (k.clone(), t.size())).collect();
    assert_eq!(ours, theirs, "{source}: state-dict keys/shapes");

    model
        .load_state_dict(source, weights, vggctl::model::Values::FiniteOnly)
        .unwrap();
    let logits = tch::no_grad(|| model.forward_t(&io["input"], false));
    let err = (&logits - &io["logits"]).abs().max().double_value(&[]);
    assert!(err <= 1e-4, "{source}: max abs error {err}");

    for (name, t) in model.state_dict() {
        assert!(t.equal(&weights[&name]), "{source}: {name} round trip");
    }
}

#[test]
fn small_heads_match_torchvision_for_every_arch() {
    let dir = common::fixtures().join("models");
    let mut cases: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(".io.safetensors"))
        .collect();
    cases.sort();
    // vgg11/13/16/19 with and without BatchNorm, cifar and gap heads.
    assert_eq!(cases.len(), 8, "fixtures in {}", dir.display());
    for io_path in cases {
        let weights_path = io_path
            .to_string_lossy()
            .replace(".io.safetensors", ".safetensors");
        let weights = read_safetensors(weights_path.as_ref()).unwrap();
        let io = read_safetensors(&io_path).unwrap();
        let spec = spec_from_meta(&weights.metadata);
        check_parity(&weights_path, spec, &weights.tensors, &io.tensors);
    }
}

#[test]
fn imagenet_head_matches_torchvision() {
    // Full-size torchvision models, stored once as .pth (see tests/make_pth.py).
    let dir = common::fixtures().join("pth");
    for (file, io, arch, bn) in [
        ("vgg11.legacy.pth", "vgg11", Arch::Vgg11, false),
        ("vgg16_bn.zip.pth", "vgg16_bn", Arch::Vgg16, true),
    ] {
        let path = dir.join(file);
        let weights = read_pth(&path).unwrap();
        let io = read_safetensors(&dir.join(format!("{io}.io.safetensors"))).unwrap();
        let spec = ModelSpec::new(arch, bn, Head::Imagenet, 1000);
        check_parity(&path.display().to_string(), spec, &weights, &io.tensors);
    }
}

#[test]
fn parameter_counts_match_torchvision() {
    // REFERENCE.md: torchvision's models with 1000 classes.
    let expected = [
        ("vgg11", 132_863_336),
        ("vgg11_bn", 132_868_840),
        ("vgg13", 133_047_848),
        ("vgg13_bn", 133_053_736),
        ("vgg16", 138_357_544),
        ("vgg16_bn", 138_365_992),
        ("vgg19", 143_667_240),
        ("vgg19_bn", 143_678_248),
    ];
    for (name, count) in expected {
        let (arch, bn) = Arch::parse_with_bn(name).unwrap();
        assert_eq!(
            ModelSpec::new(arch, bn, Head::Imagenet, 1000).param_count(),
            count,
            "{name}"
        );
    }
}

#[test]
fn spec_counts_equal_real_tensor_counts() {
    for head in [Head::Cifar, Head::Gap] {
        for arch in Arch::ALL {
            for bn in [false, true] {
                let spec = ModelSpec::new(arch, bn, head, 10);
                let model = Vgg::new(spec, Device::Cpu);
                let real: i64 = model
                    .parameters()
                    .iter()
                    .map(|(_, t)| t.numel() as i64)
                    .sum();
                assert_eq!(real, spec.param_count(), "{spec:?}");
            }
        }
    }
}

fn std_of(t: &Tensor) -> f64 {
    t.to_kind(Kind::Double).std(true).double_value(&[])
}

#[test]
fn initialization_follows_torchvision() {
    tch::manual_seed(0);
    let model = Vgg::new(
        ModelSpec::new(Arch::Vgg16, true, Head::Imagenet, 1000),
        Device::Cpu,
    );
    for (name, layer) in model.features.layers.iter().chain(&model.classifier.layers) {
        match layer {
            Layer::Conv { weight, bias } => {
                let fan_out = (weight.size()[0] * 9) as f64;
                let want = (2.0 / fan_out).sqrt();
                let got = std_of(weight);
                assert!(
                    (got / want - 1.0).abs() < 0.05,
                    "{name}: std {got} vs {want}"
                );
                assert!(
                    weight.mean(Kind::Double).double_value(&[]).abs() < want * 0.05,
                    "{name} mean"
                );
                assert_eq!(bias.abs().max().double_value(&[]), 0.0, "{name} bias");
            }
            Layer::BatchNorm {
                weight,
                bias,
                running_mean,
                running_var,
                ..
            } => {
                assert!(weight.eq(1.0).all().int64_value(&[]) == 1, "{name} weight");
                assert_eq!(bias.abs().max().double_value(&[]), 0.0);
                assert_eq!(running_mean.abs().max().double_value(&[]), 0.0);
                assert!(running_var.eq(1.0).all().int64_value(&[]) == 1);
            }
            Layer::Linear { weight, bias } => {
                let got = std_of(weight);
                assert!((got / 0.01 - 1.0).abs() < 0.05, "{name}: std {got} vs 0.01");
                assert_eq!(bias.abs().max().double_value(&[]), 0.0, "{name} bias");
            }
            _ => {}
        }
    }
}

#[test]
fn bn_mismatch_is_named() {
    let plain = Vgg::new(
        ModelSpec::new(Arch::Vgg11, false, Head::Cifar, 10),
        Device::Cpu,
    );
    let dict: BTreeMap<String, Tensor> = plain.state_dict().into_iter().collect();
    let mut bn = Vgg::new(
        ModelSpec::new(Arch::Vgg11, true, Head::Cifar, 10),
        Device::Cpu,
    );
    let err = format!(
        "{:#}",
        bn.load_state_dict(
            "plain.safetensors",
            &dict,
            vggctl::model::Values::FiniteOnly
        )
        .unwrap_err()
    );
    assert!(
        err.contains("without BatchNorm") && err.contains("plain.safetensors"),
        "{err}"
    );
}
