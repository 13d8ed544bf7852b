//! What fixes a VGG's structure: torchvision's cfg table, the heads, the
//! per-layer list that builds the model (and the parameter report), the
//! state dict's names and shapes, and the smallest input the network takes.

use std::fmt;
use std::str::FromStr;

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

use crate::choice::Choice;

/// VGG's five 2x2/stride-2 poolings need at least this many pixels per side.
pub const MIN_INPUT: i64 = 32;

/// The largest input side a model file may record (and training takes).
pub const MAX_INPUT: i64 = 4096;

/// The most classes a head may have: 1,000,000 (ImageNet-21k has 21,841;
/// a million already makes VGG's last layer 16 GB in fp32).
pub const MAX_CLASSES: i64 = 1_000_000;

/// The one check of a class count (`--classes`, a file's metadata).
pub fn check_classes(classes: i64) -> Result<()> {
    if !(1..=MAX_CLASSES).contains(&classes) {
        bail!("--classes {classes}: a classifier needs between 1 and {MAX_CLASSES} classes");
    }
    Ok(())
}

/// The one check of a model input side (`--input`), for every subcommand.
pub fn check_input(input: i64) -> Result<()> {
    check_side("--input", input)
}

/// The check of an image side the model is given, by the option (`flag`)
/// that sets it (any side from 32 up: `params` counts for huge ones;
/// training takes up to [`MAX_INPUT`], what its checkpoints may record).
pub fn check_side(flag: &str, side: i64) -> Result<()> {
    if side < MIN_INPUT {
        bail!(
            "{flag} {side} is too small: {flag} must be at least {MIN_INPUT} for VGG's five 2x2 poolings"
        );
    }
    Ok(())
}

/// The check of a side images are read at to run the model (training's
/// crops and resizes, eval's and predict's input): [`check_side`], and at
/// most [`MAX_INPUT`], what a checkpoint records.
pub fn check_run_side(flag: &str, side: i64) -> Result<()> {
    check_side(flag, side)?;
    if side > MAX_INPUT {
        bail!("{flag} {side} is too large: sides go up to {MAX_INPUT}, what a checkpoint records");
    }
    Ok(())
}

/// One entry of a cfg: a 3x3 convolution with this many output channels, or a
/// 2x2/stride-2 max pooling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cfg {
    Conv(i64),
    Pool,
}

use Cfg::{Conv as C, Pool as M};

/// torchvision's cfgs "A", "B", "D", "E": convolutions of N channels, 2x2 max pools.
#[rustfmt::skip]
const CFG_A: &[Cfg] = &[
    C(64), M,
    C(128), M,
    C(256), C(256), M,
    C(512), C(512), M,
    C(512), C(512), M,
];
#[rustfmt::skip]
const CFG_B: &[Cfg] = &[
    C(64), C(64), M,
    C(128), C(128), M,
    C(256), C(256), M,
    C(512), C(512), M,
    C(512), C(512), M,
];
#[rustfmt::skip]
const CFG_D: &[Cfg] = &[
    C(64), C(64), M,
    C(128), C(128), M,
    C(256), C(256), C(256), M,
    C(512), C(512), C(512), M,
    C(512), C(512), C(512), M,
];
#[rustfmt::skip]
const CFG_E: &[Cfg] = &[
    C(64), C(64), M,
    C(128), C(128), M,
    C(256), C(256), C(256), C(256), M,
    C(512), C(512), C(512), C(512), M,
    C(512), C(512), C(512), C(512), M,
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Vgg11,
    Vgg13,
    Vgg16,
    Vgg19,
}

impl Arch {
    pub const ALL: [Arch; 4] = [Arch::Vgg11, Arch::Vgg13, Arch::Vgg16, Arch::Vgg19];

    pub fn cfg(self) -> &'static [Cfg] {
        match self {
            Arch::Vgg11 => CFG_A,
            Arch::Vgg13 => CFG_B,
            Arch::Vgg16 => CFG_D,
            Arch::Vgg19 => CFG_E,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Arch::Vgg11 => "vgg11",
            Arch::Vgg13 => "vgg13",
            Arch::Vgg16 => "vgg16",
            Arch::Vgg19 => "vgg19",
        }
    }

    /// Parses `vgg16` or `vgg16_bn`; the flag says whether `_bn` was given.
    pub fn parse_with_bn(s: &str) -> Result<(Arch, bool)> {
        let lower = s.to_ascii_lowercase();
        let (base, bn) = match lower.strip_suffix("_bn") {
            Some(base) => (base, true),
            None => (lower.as_str(), false),
        };
        match Arch::ALL.iter().find(|a| a.name() == base) {
            Some(a) => Ok((*a, bn)),
            None => bail!(
                "unknown architecture '{s}'{} (expected vgg11, vgg13, vgg16 or vgg19, optionally with _bn)",
                Arch::meant(&lower).map_or(String::new(), |m| format!(": did you mean {m}?"))
            ),
        }
    }

    /// The architecture `lower` spells otherwise (`vgg-16`, `vgg16bn`,
    /// `vgg 16-bn`): the same letters and digits as one of the names.
    fn meant(lower: &str) -> Option<String> {
        let key: String = lower.chars().filter(char::is_ascii_alphanumeric).collect();
        let names = Arch::ALL.iter().map(|a| a.name());
        names
            .flat_map(|n| [n.to_string(), format!("{n}_bn")])
            .find(|n| n.replace('_', "") == key)
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What follows `features`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Head {
    /// torchvision's: AdaptiveAvgPool2d(7x7), 25088 -> 4096 -> 4096 -> N.
    Imagenet,
    /// The CIFAR recipe's: AdaptiveAvgPool2d(1x1), 512 -> 512 -> N.
    Cifar,
    /// Global average pooling, then Linear(512, N).
    Gap,
}

impl Head {
    pub fn name(self) -> &'static str {
        match self {
            Head::Imagenet => "imagenet",
            Head::Cifar => "cifar",
            Head::Gap => "gap",
        }
    }

    /// Output size of the head's adaptive average pooling.
    pub fn pool_size(self) -> i64 {
        match self {
            Head::Imagenet => 7,
            Head::Cifar | Head::Gap => 1,
        }
    }

    pub fn default_classes(self) -> i64 {
        match self {
            Head::Imagenet => 1000,
            Head::Cifar | Head::Gap => 10,
        }
    }
}

impl Choice for Head {
    const ALL: &'static [Self] = &[Head::Imagenet, Head::Cifar, Head::Gap];
    fn name(self) -> &'static str {
        Head::name(self)
    }
    fn help(self) -> &'static str {
        match self {
            Head::Imagenet => "torchvision's: AdaptiveAvgPool2d(7x7), 25088 -> 4096 -> 4096 -> N",
            Head::Cifar => "the CIFAR recipe's: AdaptiveAvgPool2d(1x1), 512 -> 512 -> N",
            Head::Gap => "global average pooling, then Linear(512, N)",
        }
    }
}

impl FromStr for Head {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        crate::choice::parse("head", s)
    }
}

/// Everything that fixes a model's structure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelSpec {
    pub arch: Arch,
    pub bn: bool,
    pub head: Head,
    pub classes: i64,
}

/// One module of the network, as torchvision would list it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LayerKind {
    Conv { cin: i64, cout: i64 },
    BatchNorm { channels: i64 },
    Relu,
    MaxPool,
    AdaptiveAvgPool { size: i64 },
    Flatten,
    Dropout { p: f64 },
    Linear { fin: i64, fout: i64 },
}

impl LayerKind {
    /// Learnable parameters (buffers such as running statistics excluded).
    pub fn param_count(&self) -> i64 {
        match *self {
            LayerKind::Conv { cin, cout } => cin * cout * 9 + cout,
            LayerKind::BatchNorm { channels } => 2 * channels,
            LayerKind::Linear { fin, fout } => fin * fout + fout,
            _ => 0,
        }
    }

    /// The name torchvision's `repr` gives the module.
    pub fn describe(&self) -> String {
        match *self {
            LayerKind::Conv { cin, cout } => format!("Conv2d({cin}, {cout}, 3x3, pad 1)"),
            LayerKind::BatchNorm { channels } => format!("BatchNorm2d({channels})"),
            LayerKind::Relu => "ReLU".into(),
            LayerKind::MaxPool => "MaxPool2d(2x2, stride 2)".into(),
            LayerKind::AdaptiveAvgPool { size } => format!("AdaptiveAvgPool2d({size}x{size})"),
            LayerKind::Flatten => "Flatten".into(),
            LayerKind::Dropout { p } => format!("Dropout({p})"),
            LayerKind::Linear { fin, fout } => format!("Linear({fin}, {fout})"),
        }
    }
}

/// A layer's module path (`features.0`, `avgpool`, `classifier.6`) and kind.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerSpec {
    pub name: String,
    pub kind: LayerKind,
}

impl ModelSpec {
    pub fn new(arch: Arch, bn: bool, head: Head, classes: i64) -> Self {
        ModelSpec {
            arch,
            bn,
            head,
            classes,
        }
    }

    /// torchvision's name for this model: `vgg16`, `vgg16_bn`.
    pub fn model_name(&self) -> String {
        format!("{}{}", self.arch.name(), if self.bn { "_bn" } else { "" })
    }

    /// torchvision's `make_layers(cfg, batch_norm)`: the index counts every
    /// module, so the parameter names fall out of the position.
    pub fn feature_layers(&self) -> Vec<LayerSpec> {
        let mut kinds = Vec::new();
        let mut cin = 3;
        for item in self.arch.cfg() {
            match *item {
                Cfg::Pool => kinds.push(LayerKind::MaxPool),
                Cfg::Conv(cout) => {
                    kinds.push(LayerKind::Conv { cin, cout });
                    if self.bn {
                        kinds.push(LayerKind::BatchNorm { channels: cout });
                    }
                    kinds.push(LayerKind::Relu);
                    cin = cout;
                }
            }
        }
        kinds
            .into_iter()
            .enumerate()
            .map(|(i, kind)| LayerSpec {
                name: format!("features.{i}"),
                kind,
            })
            .collect()
    }

    /// The pooling, flattening and classifier that follow `features`.
    pub fn head_layers(&self) -> Vec<LayerSpec> {
        let c = self.classes;
        let size = self.head.pool_size();
        let mut layers = vec![
            LayerSpec {
                name: "avgpool".into(),
                kind: LayerKind::AdaptiveAvgPool { size },
            },
            LayerSpec {
                name: "flatten".into(),
                kind: LayerKind::Flatten,
            },
        ];
        let classifier: Vec<LayerKind> = match self.head {
            Head::Imagenet => vec![
                LayerKind::Linear {
                    fin: 512 * 7 * 7,
                    fout: 4096,
                },
                LayerKind::Relu,
                LayerKind::Dropout { p: 0.5 },
                LayerKind::Linear {
                    fin: 4096,
                    fout: 4096,
                },
                LayerKind::Relu,
                LayerKind::Dropout { p: 0.5 },
                LayerKind::Linear { fin: 4096, fout: c },
            ],
            Head::Cifar => vec![
                LayerKind::Linear {
                    fin: 512,
                    fout: 512,
                },
                LayerKind::Relu,
                LayerKind::Dropout { p: 0.5 },
                LayerKind::Linear { fin: 512, fout: c },
            ],
            Head::Gap => {
                // A single Linear module, so its keys are `classifier.weight`.
                layers.push(LayerSpec {
                    name: "classifier".into(),
                    kind: LayerKind::Linear { fin: 512, fout: c },
                });
                return layers;
            }
        };
        layers.extend(
            classifier
                .into_iter()
                .enumerate()
                .map(|(i, kind)| LayerSpec {
                    name: format!("classifier.{i}"),
                    kind,
                }),
        );
        layers
    }

    /// The position in [`ModelSpec::layers`] of the module named `name`.
    pub fn position(&self, name: &str) -> Option<usize> {
        self.layers().iter().position(|l| l.name == name)
    }

    /// The module whose output the last linear layer classifies: the
    /// classifier's last ReLU (`classifier.4`, VGG's fc7), or `flatten`.
    pub fn penultimate(&self) -> String {
        let head = self.head_layers();
        let relu = head.iter().rev().find(|l| l.kind == LayerKind::Relu);
        relu.map_or("flatten".into(), |l| l.name.clone())
    }

    pub fn layers(&self) -> Vec<LayerSpec> {
        let mut all = self.feature_layers();
        all.extend(self.head_layers());
        all
    }

    pub fn param_count(&self) -> i64 {
        self.layers().iter().map(|l| l.kind.param_count()).sum()
    }

    /// Names and shapes of the state dict, in torchvision's order.
    pub fn state_dict_shapes(&self) -> Vec<(String, Vec<i64>)> {
        let mut out = Vec::new();
        for l in self.layers() {
            let n = &l.name;
            match l.kind {
                LayerKind::Conv { cin, cout } => {
                    out.push((format!("{n}.weight"), vec![cout, cin, 3, 3]));
                    out.push((format!("{n}.bias"), vec![cout]));
                }
                LayerKind::BatchNorm { channels } => {
                    for p in ["weight", "bias", "running_mean", "running_var"] {
                        out.push((format!("{n}.{p}"), vec![channels]));
                    }
                    out.push((format!("{n}.num_batches_tracked"), vec![]));
                }
                LayerKind::Linear { fin, fout } => {
                    out.push((format!("{n}.weight"), vec![fout, fin]));
                    out.push((format!("{n}.bias"), vec![fout]));
                }
                _ => {}
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn another_spelling_of_an_architecture_is_named() {
        for (typed, meant) in [
            ("vgg-16", Some("vgg16")),
            ("VGG16BN", Some("vgg16_bn")),
            ("vgg 19-bn", Some("vgg19_bn")),
            ("vgg15", None),
        ] {
            let err = Arch::parse_with_bn(typed).unwrap_err().to_string();
            let guess = meant.map_or(String::new(), |m| format!(": did you mean {m}?"));
            assert!(
                err.starts_with(&format!("unknown architecture '{typed}'{guess} (expected")),
                "{err}"
            );
        }
    }

    #[test]
    fn input_check_takes_32_and_refuses_31_with_one_wording() {
        assert!(check_input(MIN_INPUT).is_ok());
        assert!(check_input(224).is_ok());
        let err = check_input(31).unwrap_err().to_string();
        assert_eq!(
            err,
            "--input 31 is too small: --input must be at least 32 for VGG's five 2x2 poolings"
        );
    }

    #[test]
    fn head_names_parse_back() {
        for h in Head::ALL {
            assert_eq!(h.name().parse::<Head>().unwrap(), *h);
        }
        let err = "big".parse::<Head>().unwrap_err().to_string();
        assert_eq!(err, "unknown head 'big' (expected imagenet, cifar or gap)");
    }
}
