//! The check of a state dict against a model spec: torchvision's names and
//! shapes, one error listing every problem (and naming a BatchNorm mix-up).

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Result, bail};
use tch::{Kind, Tensor};

use super::spec::{Arch, ModelSpec};

/// Which weight values loading accepts: finite ones only (the default), or
/// any (`--allow-nonfinite`, to inspect a diverged model).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Values {
    FiniteOnly,
    Any,
}

fn is_float(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
    )
}

/// Refuses NaN or infinite values in a state dict's floating-point tensors,
/// naming the first tensor that holds them.
pub fn check_finite(source: &str, dict: &BTreeMap<String, Tensor>) -> Result<()> {
    for (name, t) in dict {
        if !is_float(t.kind()) || t.numel() == 0 {
            continue;
        }
        // The least and largest values are finite only if every value is
        // (a NaN makes both NaN): no tensor-sized temporaries, unlike
        // `isfinite`, which is only counted with when one is not.
        let (least, most) = t.aminmax(None, false);
        let ends = Tensor::stack(&[least, most], 0).to_kind(Kind::Double);
        if Vec::<f64>::try_from(&ends).is_ok_and(|v| v.iter().all(|x| x.is_finite())) {
            continue;
        }
        let bad = t.numel() as i64 - t.isfinite().sum(Kind::Int64).int64_value(&[]);
        if bad > 0 {
            bail!(
                "{source}: {name} holds {bad} NaN or infinite values (of {}); pass --allow-nonfinite to load it anyway",
                t.numel()
            );
        }
    }
    Ok(())
}

/// Whether `dict`'s `features.*` tensors are exactly those of `spec`
/// (names and shapes).
fn features_match(spec: &ModelSpec, dict: &BTreeMap<String, Tensor>) -> bool {
    let want: Vec<(String, Vec<i64>)> = spec
        .state_dict_shapes()
        .into_iter()
        .filter(|(n, _)| n.starts_with("features.") && !n.ends_with(".num_batches_tracked"))
        .collect();
    let have = dict
        .keys()
        .filter(|k| k.starts_with("features.") && !k.ends_with(".num_batches_tracked"))
        .count();
    have == want.len()
        && want
            .iter()
            .all(|(n, shape)| dict.get(n).is_some_and(|t| &t.size() == shape))
}

/// A state dict for another VGG than `spec` is named as such, with the
/// flag that fixes it: another architecture (predict and export default to
/// vgg16), or BatchNorm with or without.
fn name_the_mix_up(spec: &ModelSpec, source: &str, dict: &BTreeMap<String, Tensor>) -> Result<()> {
    let model = spec.model_name();
    // Weights of another VGG given without --arch (predict and export
    // default to vgg16): name the one whose feature layers they are.
    let other = Arch::ALL
        .iter()
        .flat_map(|&a| [false, true].map(|bn| ModelSpec::new(a, bn, spec.head, spec.classes)))
        .find(|s| s.arch != spec.arch && features_match(s, dict));
    if let Some(other) = other {
        let name = other.model_name();
        bail!("{source}: the weights are a {name}'s, but the model is {model}; use --arch {name}");
    }
    let has_bn_keys = dict.keys().any(|k| k.ends_with(".running_mean"));
    if has_bn_keys != spec.bn && dict.keys().any(|k| k.starts_with("features.")) {
        let (theirs, ours) = if has_bn_keys {
            ("with", "without")
        } else {
            ("without", "with")
        };
        bail!(
            "{source}: weights are for a model {theirs} BatchNorm, but the model is {model} ({ours} BatchNorm); {}",
            if has_bn_keys { "add --bn" } else { "drop --bn" }
        );
    }
    Ok(())
}

/// Checks a state dict's names, shapes and kinds (floating point, but
/// integer `num_batches_tracked`) against a model spec; one error lists
/// every problem.
pub fn check_state_dict(
    spec: &ModelSpec,
    source: &str,
    dict: &BTreeMap<String, Tensor>,
) -> Result<()> {
    let expected = spec.state_dict_shapes();
    let expected_names: BTreeSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    let mut missing = Vec::new();
    let mut misshaped = Vec::new();
    let mut wrong_kinds = Vec::new();
    for (name, shape) in &expected {
        match dict.get(name) {
            None if name.ends_with(".num_batches_tracked") => {}
            None => missing.push(name.clone()),
            Some(t) if name.ends_with(".num_batches_tracked") => {
                if t.numel() != 1 {
                    misshaped.push(format!("{name} {:?} (expected a scalar)", t.size()));
                }
            }
            Some(t) if &t.size() != shape => {
                misshaped.push(format!("{name} {:?} (expected {:?})", t.size(), shape))
            }
            Some(t) if !is_float(t.kind()) => {
                wrong_kinds.push(format!("{name} {:?} (expected floating point)", t.kind()))
            }
            Some(_) => {}
        }
    }
    let unexpected: Vec<&String> = dict
        .keys()
        .filter(|k| !expected_names.contains(k.as_str()))
        .collect();
    if missing.is_empty() && misshaped.is_empty() && unexpected.is_empty() && wrong_kinds.is_empty()
    {
        return Ok(());
    }
    name_the_mix_up(spec, source, dict)?;
    let model = spec.model_name();
    let mut parts = Vec::new();
    let list = |v: Vec<String>| -> String {
        let n = v.len();
        let mut shown: Vec<String> = v.into_iter().take(8).collect();
        if n > 8 {
            shown.push(format!("... ({n} in all)"));
        }
        shown.join(", ")
    };
    if !missing.is_empty() {
        parts.push(format!("missing keys: {}", list(missing)));
    }
    if !unexpected.is_empty() {
        parts.push(format!(
            "unexpected keys: {}",
            list(unexpected.into_iter().cloned().collect())
        ));
    }
    if !misshaped.is_empty() {
        parts.push(format!("wrong shapes: {}", list(misshaped)));
    }
    if !wrong_kinds.is_empty() {
        parts.push(format!("wrong kinds: {}", list(wrong_kinds)));
    }
    bail!(
        "{source}: state dict does not match {model} with the {} head and {} classes: {}",
        spec.head.name(),
        spec.classes,
        parts.join("; ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Arch, Head};
    use tch::{Device, Kind};

    fn dict(spec: &ModelSpec) -> BTreeMap<String, Tensor> {
        spec.state_dict_shapes()
            .into_iter()
            .map(|(n, s)| {
                let t = if s.is_empty() {
                    Tensor::from(0i64)
                } else {
                    Tensor::zeros(s.as_slice(), (Kind::Float, Device::Cpu))
                };
                (n, t)
            })
            .collect()
    }

    #[test]
    fn a_matching_dict_passes_and_every_problem_is_listed_once() {
        let spec = ModelSpec::new(Arch::Vgg11, false, Head::Cifar, 10);
        let mut d = dict(&spec);
        check_state_dict(&spec, "f.pth", &d).unwrap();
        d.remove("features.0.bias");
        d.insert(
            "classifier.3.weight".into(),
            Tensor::zeros([7, 512], (Kind::Float, Device::Cpu)),
        );
        d.insert("extra.weight".into(), Tensor::from(1.0));
        let err = check_state_dict(&spec, "f.pth", &d)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "f.pth: state dict does not match vgg11 with the cifar head and 10 classes: \
             missing keys: features.0.bias; unexpected keys: extra.weight; \
             wrong shapes: classifier.3.weight [7, 512] (expected [10, 512])"
        );
    }

    /// Integer weights are refused by kind; NaN or infinite values by
    /// `check_finite`, naming the tensor and the count.
    #[test]
    fn integer_and_nonfinite_weights_are_named() {
        let spec = ModelSpec::new(Arch::Vgg11, false, Head::Cifar, 10);
        let mut d = dict(&spec);
        d.insert(
            "features.0.bias".into(),
            Tensor::zeros([64], (Kind::Int64, Device::Cpu)),
        );
        let err = check_state_dict(&spec, "f.pth", &d)
            .unwrap_err()
            .to_string();
        assert!(
            err.ends_with("wrong kinds: features.0.bias Int64 (expected floating point)"),
            "{err}"
        );
        let mut d = dict(&spec);
        check_finite("f.pth", &d).unwrap();
        let w = Tensor::zeros([64], (Kind::Float, Device::Cpu));
        let _ = w.get(3).fill_(f64::NAN);
        let _ = w.get(7).fill_(f64::INFINITY);
        d.insert("features.0.bias".into(), w);
        let err = check_finite("f.pth", &d).unwrap_err().to_string();
        assert_eq!(
            err,
            "f.pth: features.0.bias holds 2 NaN or infinite values (of 64); pass --allow-nonfinite to load it anyway"
        );
        // One NaN alone, one -inf alone, in every floating-point kind; an
        // empty tensor has nothing to refuse.
        for kind in [Kind::Float, Kind::Double, Kind::Half, Kind::BFloat16] {
            for bad in [f64::NAN, f64::NEG_INFINITY] {
                let w = Tensor::ones([64], (kind, Device::Cpu));
                let _ = w.get(63).fill_(bad);
                let d = BTreeMap::from([("w".to_string(), w)]);
                let err = check_finite("f", &d).unwrap_err().to_string();
                assert!(err.starts_with("f: w holds 1 NaN"), "{kind:?} {bad}: {err}");
            }
            let d = BTreeMap::from([("w".to_string(), Tensor::zeros([0], (kind, Device::Cpu)))]);
            check_finite("f", &d).unwrap();
        }
    }

    /// Another VGG's weights are named as that VGG, with the flag to give.
    #[test]
    fn another_arch_is_named() {
        let vgg16 = ModelSpec::new(Arch::Vgg16, false, Head::Imagenet, 1000);
        let vgg11 = ModelSpec::new(Arch::Vgg11, false, Head::Imagenet, 1000);
        let err = check_state_dict(&vgg16, "vgg11.pth", &dict(&vgg11))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "vgg11.pth: the weights are a vgg11's, but the model is vgg16; use --arch vgg11"
        );
        let bn19 = ModelSpec::new(Arch::Vgg19, true, Head::Imagenet, 1000);
        let err = check_state_dict(&vgg16, "v.pth", &dict(&bn19))
            .unwrap_err()
            .to_string();
        assert!(err.ends_with("use --arch vgg19_bn"), "{err}");
    }

    #[test]
    fn batchnorm_mix_ups_are_named_with_the_fix() {
        let bn = ModelSpec::new(Arch::Vgg11, true, Head::Cifar, 10);
        let plain = ModelSpec::new(Arch::Vgg11, false, Head::Cifar, 10);
        let err = check_state_dict(&plain, "bn.pth", &dict(&bn))
            .unwrap_err()
            .to_string();
        assert!(err.ends_with("add --bn"), "{err}");
        let err = check_state_dict(&bn, "plain.pth", &dict(&plain))
            .unwrap_err()
            .to_string();
        assert!(err.ends_with("drop --bn"), "{err}");
        // num_batches_tracked may be absent (older files), never misshaped.
        let mut d = dict(&bn);
        d.retain(|k, _| !k.ends_with("num_batches_tracked"));
        check_state_dict(&bn, "old.pth", &d).unwrap();
        d.insert(
            "features.1.num_batches_tracked".into(),
            Tensor::from_slice(&[1i64, 2]),
        );
        let err = check_state_dict(&bn, "odd.pth", &d)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("features.1.num_batches_tracked [2] (expected a scalar)"),
            "{err}"
        );
    }
}
