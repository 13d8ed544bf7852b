//! Which VGG a state dict is, from its names and shapes alone (torchvision's
//! files carry no metadata), and the model a request leaves open resolved
//! from it: the number of convolutions names the architecture,
//! `running_mean` BatchNorm, the classifier's keys and shapes the head and
//! the class count.

use std::collections::BTreeMap;

use anyhow::{Result, bail};
use tch::Tensor;

use super::spec::{Arch, Cfg, Head, ModelSpec, check_classes};

/// What the user said about the model; `None` where they said nothing
/// (`bn` is said by `--bn`, and by `--arch` with or without `_bn`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpecRequest {
    pub arch: Option<Arch>,
    pub bn: Option<bool>,
    pub head: Option<Head>,
    pub classes: Option<i64>,
}

/// A resolved model and, where the weights made it another model than the
/// request and the defaults alone would, a line saying what was inferred.
pub struct Resolved {
    pub spec: ModelSpec,
    pub inferred: Option<String>,
}

/// The 2-D weight `key` names, if there is one: its shape.
fn matrix(dict: &BTreeMap<String, Tensor>, key: &str) -> Option<[i64; 2]> {
    match dict.get(key)?.size()[..] {
        [rows, cols] => Some([rows, cols]),
        _ => None,
    }
}

/// The VGG whose state dict `dict` looks like: the architecture with as
/// many 3x3 convolutions in `features`, BatchNorm when `features` holds
/// running statistics, the head whose last Linear is present with the input
/// width it takes. `None` when it is no VGG state dict.
pub fn recognize(dict: &BTreeMap<String, Tensor>) -> Option<ModelSpec> {
    let convs = dict
        .iter()
        .filter(|(k, t)| k.starts_with("features.") && k.ends_with(".weight") && t.dim() == 4)
        .count();
    let arch = Arch::ALL
        .into_iter()
        .find(|a| a.cfg().iter().filter(|c| matches!(c, Cfg::Conv(_))).count() == convs)?;
    let bn = dict
        .keys()
        .any(|k| k.starts_with("features.") && k.ends_with(".running_mean"));
    let (head, [classes, fin]) = if let Some(shape) = matrix(dict, "classifier.weight") {
        (Head::Gap, shape)
    } else if let Some(shape) = matrix(dict, "classifier.6.weight") {
        (Head::Imagenet, shape)
    } else {
        (Head::Cifar, matrix(dict, "classifier.3.weight")?)
    };
    let width = if head == Head::Imagenet { 4096 } else { 512 };
    (fin == width && check_classes(classes).is_ok())
        .then(|| ModelSpec::new(arch, bn, head, classes))
}

/// A model as the messages name it: "vgg11_bn with the cifar head and 10
/// classes".
fn described(spec: &ModelSpec) -> String {
    format!(
        "{} with the {} head and {} classes",
        spec.model_name(),
        spec.head.name(),
        spec.classes
    )
}

impl SpecRequest {
    /// The model the request names, `default_head` and its class count
    /// where it names none (no weights to look at).
    pub fn spec(self, default_head: Head) -> Result<ModelSpec> {
        let head = self.head.unwrap_or(default_head);
        let classes = self.classes.unwrap_or(head.default_classes());
        check_classes(classes)?;
        Ok(ModelSpec::new(
            self.arch.unwrap_or(Arch::Vgg16),
            self.bn.unwrap_or(false),
            head,
            classes,
        ))
    }

    /// The model for the state dict `dict` read from `source`: what the
    /// request says, the rest recognized from the weights (and named in
    /// `inferred` where that is not what the defaults give). A request that contradicts a recognized dict is an
    /// error naming both; an unrecognized dict falls back to
    /// [`SpecRequest::spec`], so loading lists what does not match.
    pub fn resolve(
        self,
        source: &str,
        dict: &BTreeMap<String, Tensor>,
        default_head: Head,
    ) -> Result<Resolved> {
        let Some(found) = recognize(dict) else {
            return Ok(Resolved {
                spec: self.spec(default_head)?,
                inferred: None,
            });
        };
        self.check_against(source, found)?;
        // Said only where the weights gave another model than the flags
        // and defaults alone would have.
        let by_default = self.spec(default_head).ok();
        Ok(Resolved {
            spec: found,
            inferred: (by_default != Some(found))
                .then(|| format!("{source}: inferred {} from its weights", described(&found))),
        })
    }

    /// An error naming both where the request contradicts `found`, the
    /// model the weights read from `source` are (by their vggctl metadata,
    /// or recognized from their names and shapes).
    pub fn check_against(self, source: &str, found: ModelSpec) -> Result<()> {
        let (flag, said) = match self {
            SpecRequest { arch: Some(a), .. } if a != found.arch => {
                ("--arch", format!("says {}", a.name()))
            }
            // BatchNorm is said by --bn or by --arch with or without `_bn`.
            SpecRequest { bn: Some(true), .. } if !found.bn => {
                ("--arch/--bn", format!("ask for {}_bn", found.arch.name()))
            }
            SpecRequest {
                bn: Some(false), ..
            } if found.bn => (
                "--arch",
                format!("says {} (no BatchNorm)", found.arch.name()),
            ),
            SpecRequest { head: Some(h), .. } if h != found.head => {
                ("--head", format!("says {}", h.name()))
            }
            SpecRequest {
                classes: Some(c), ..
            } if c != found.classes => ("--classes", format!("says {c}")),
            _ => return Ok(()),
        };
        bail!(
            "{source}: the weights are a {}, but {flag} {said}",
            described(&found)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn dict(spec: &ModelSpec) -> BTreeMap<String, Tensor> {
        spec.state_dict_shapes()
            .into_iter()
            .map(|(n, s)| (n, Tensor::zeros(s.as_slice(), (Kind::Float, Device::Cpu))))
            .collect()
    }

    #[test]
    fn every_arch_bn_and_head_is_recognized() {
        for arch in Arch::ALL {
            for bn in [false, true] {
                for (head, classes) in [(Head::Imagenet, 1000), (Head::Cifar, 10), (Head::Gap, 7)] {
                    let spec = ModelSpec::new(arch, bn, head, classes);
                    assert_eq!(recognize(&dict(&spec)), Some(spec));
                }
            }
        }
        let mut d = dict(&ModelSpec::new(Arch::Vgg11, false, Head::Cifar, 10));
        d.remove("features.0.weight");
        assert_eq!(recognize(&d), None, "7 convolutions are no VGG");
    }

    #[test]
    fn the_request_fills_in_or_contradicts() {
        let spec = ModelSpec::new(Arch::Vgg13, true, Head::Cifar, 10);
        let d = dict(&spec);
        let r = SpecRequest::default()
            .resolve("w.pth", &d, Head::Imagenet)
            .unwrap();
        assert_eq!(r.spec, spec);
        assert_eq!(
            r.inferred.as_deref(),
            Some("w.pth: inferred vgg13_bn with the cifar head and 10 classes from its weights")
        );
        let all = SpecRequest {
            arch: Some(Arch::Vgg13),
            bn: Some(true),
            head: Some(Head::Cifar),
            classes: Some(10),
        };
        assert!(
            all.resolve("w.pth", &d, Head::Imagenet)
                .unwrap()
                .inferred
                .is_none()
        );
        let wrong = SpecRequest {
            arch: Some(Arch::Vgg16),
            ..SpecRequest::default()
        };
        let err = wrong.resolve("w.pth", &d, Head::Imagenet).err().unwrap();
        assert_eq!(
            err.to_string(),
            "w.pth: the weights are a vgg13_bn with the cifar head and 10 classes, but --arch says vgg16"
        );
        let wrong = SpecRequest {
            classes: Some(100),
            ..SpecRequest::default()
        };
        let err = wrong.resolve("w.pth", &d, Head::Imagenet).err().unwrap();
        assert!(err.to_string().ends_with("but --classes says 100"), "{err}");
        let no_bn = SpecRequest {
            arch: Some(Arch::Vgg13),
            bn: Some(false),
            ..SpecRequest::default()
        };
        let err = no_bn.resolve("w.pth", &d, Head::Imagenet).err().unwrap();
        assert!(
            err.to_string()
                .ends_with("but --arch says vgg13 (no BatchNorm)"),
            "{err}"
        );
    }
}
