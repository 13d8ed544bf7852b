//! Weights into models, for every subcommand: vggctl's checkpoint files
//! (torchvision-named weights in safetensors, with string metadata that
//! says how to rebuild and feed the model), plain state dicts in any format
//! a user hands over, and torchvision's pretrained files.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use crate::choice::Choice;
use crate::data::resize::Filter;
use crate::formats::Sniffed;
use crate::formats::safetensors::{read_safetensors, write_safetensors};
use crate::model::{Arch, Head, ModelSpec, SpecRequest, Values, Vgg};

/// What a model file says about itself.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ModelMeta {
    pub arch: Arch,
    pub bn: bool,
    pub head: Head,
    pub classes: i64,
    pub class_names: Vec<String>,
    pub mean: [f64; 3],
    pub std: [f64; 3],
    pub input_size: i64,
    pub dataset: String,
    /// Evaluation preprocessing: resize the shorter side to this, then take the
    /// central `input_size` square (torchvision's eval transform); `None`
    /// means a CIFAR-style model (see `host_crop`).
    pub resize: Option<i64>,
    /// The filter of those resizes (`--interpolation`; recorded only when
    /// not bilinear, which files without it were).
    #[serde(default)]
    pub interpolation: Filter,
    /// Epochs completed when written (0 for weights that were never trained here).
    pub epoch: usize,
    /// Test top-1 accuracy (percent) at that epoch, if evaluated.
    pub accuracy: Option<f64>,
}

pub use crate::model::MAX_INPUT;

const FORMAT_KEY: &str = "format";
const FORMAT: &str = "vggctl-1";

impl ModelMeta {
    pub fn spec(&self) -> ModelSpec {
        ModelSpec::new(self.arch, self.bn, self.head, self.classes)
    }

    /// What an image becomes on the host before the device resizes it to
    /// the input, as this model's evaluation saw its images: the shorter
    /// side's resize (None: the whole image squeezed) and the centre crop's
    /// side. ImageNet-style models: torchvision's `Resize` + `CenterCrop` at
    /// the input. CIFAR-style training on an image folder (`train --dataset
    /// folder`): the centre square at the input's default resize (the side
    /// its images are kept at). CIFAR's, MNIST's and the digits' models:
    /// the whole image at their 32x32, upsampled to the input as their
    /// training images were.
    pub fn host_crop(&self) -> (Option<i64>, i64) {
        use crate::data::{digits, image::default_resize, native_side};
        match (self.resize, self.dataset.as_str()) {
            (Some(r), _) => (Some(r), self.input_size),
            (None, dataset) if crate::data::is_image_folder(dataset) => {
                let side = default_resize(self.input_size);
                (Some(side), side)
            }
            (None, "digits") => (None, digits::SIDE),
            (None, dataset) => (None, native_side(dataset)),
        }
    }

    /// Whether the model was trained on gray images and reads every image
    /// as gray (see [`crate::data::is_gray`]).
    pub fn gray(&self) -> bool {
        crate::data::is_gray(&self.dataset)
    }

    /// The evaluation transform scaled to the input side `input`
    /// (`--input` of eval and predict): the resize keeps its ratio to the
    /// crop (256/224 stays 256/224: 342 for a 300 crop), so the crop always
    /// fits in it.
    pub fn at_input(self, input: i64) -> ModelMeta {
        let resize = self.resize.map(|r| input * r / self.input_size);
        ModelMeta {
            input_size: input,
            resize,
            ..self
        }
    }

    /// Flat string pairs, as safetensors metadata must be.
    pub fn to_metadata(&self) -> HashMap<String, String> {
        let mut m = HashMap::new();
        m.insert(FORMAT_KEY.into(), FORMAT.into());
        m.insert("arch".into(), self.arch.name().into());
        m.insert("bn".into(), self.bn.to_string());
        m.insert("head".into(), self.head.name().into());
        m.insert("classes".into(), self.classes.to_string());
        m.insert(
            "class_names".into(),
            serde_json::to_string(&self.class_names).unwrap_or_default(),
        );
        m.insert(
            "mean".into(),
            serde_json::to_string(&self.mean).unwrap_or_default(),
        );
        m.insert(
            "std".into(),
            serde_json::to_string(&self.std).unwrap_or_default(),
        );
        m.insert("input_size".into(), self.input_size.to_string());
        m.insert("dataset".into(), self.dataset.clone());
        if let Some(r) = self.resize {
            m.insert("resize".into(), r.to_string());
        }
        if self.interpolation != Filter::Bilinear {
            m.insert("interpolation".into(), self.interpolation.name().into());
        }
        m.insert("epoch".into(), self.epoch.to_string());
        if let Some(a) = self.accuracy {
            m.insert("accuracy".into(), format!("{a}"));
        }
        m
    }

    /// `None` when the file has no vggctl metadata (a plain state dict).
    pub fn from_metadata(m: &HashMap<String, String>) -> Result<Option<ModelMeta>> {
        if m.get(FORMAT_KEY).map(String::as_str) != Some(FORMAT) {
            return Ok(None);
        }
        let get = |k: &str| m.get(k).ok_or_else(|| anyhow!("metadata lacks '{k}'"));
        let json = |k: &str| -> Result<serde_json::Value> {
            serde_json::from_str(get(k)?).with_context(|| format!("metadata '{k}' is not JSON"))
        };
        let num = |k: &str| -> Result<i64> {
            get(k)?
                .parse()
                .with_context(|| format!("metadata '{k}' is not a number"))
        };
        let meta = ModelMeta {
            arch: Arch::parse_with_bn(get("arch")?)?.0,
            bn: get("bn")? == "true",
            head: get("head")?.parse()?,
            classes: num("classes")?,
            class_names: serde_json::from_value(json("class_names")?)?,
            mean: serde_json::from_value(json("mean")?)?,
            std: serde_json::from_value(json("std")?)?,
            input_size: num("input_size")?,
            dataset: get("dataset")?.clone(),
            resize: m.get("resize").and_then(|r| r.parse().ok()),
            interpolation: match m.get("interpolation") {
                Some(f) => crate::choice::parse("metadata 'interpolation'", f)?,
                None => Filter::Bilinear,
            },
            epoch: num("epoch")? as usize,
            accuracy: m.get("accuracy").and_then(|a| a.parse().ok()),
        };
        meta.check()?;
        Ok(Some(meta))
    }

    /// What a model file must say to be used: a class count a head can
    /// have and one name per class, an input side VGG can take (and a
    /// resize that leaves room for it), finite means and positive finite
    /// standard deviations.
    pub fn check(&self) -> Result<()> {
        crate::model::check_classes(self.classes).map_err(|_| {
            anyhow!(
                "metadata 'classes' is {}, not 1 to {}",
                self.classes,
                crate::model::MAX_CLASSES
            )
        })?;
        if self.class_names.len() as i64 != self.classes {
            bail!(
                "metadata names {} classes but 'classes' is {}",
                self.class_names.len(),
                self.classes
            );
        }
        if !(crate::model::MIN_INPUT..=MAX_INPUT).contains(&self.input_size) {
            bail!(
                "metadata 'input_size' is {}, not {} to {MAX_INPUT}",
                self.input_size,
                crate::model::MIN_INPUT
            );
        }
        if let Some(r) = self.resize
            && !(self.input_size..=MAX_INPUT).contains(&r)
        {
            bail!(
                "metadata 'resize' is {r}, not {} (the input size) to {MAX_INPUT}",
                self.input_size
            );
        }
        if self.mean.iter().any(|m| !m.is_finite()) {
            bail!("metadata 'mean' {:?} is not finite", self.mean);
        }
        if self.std.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            bail!(
                "metadata 'std' {:?} must be positive and finite (inputs are divided by it)",
                self.std
            );
        }
        Ok(())
    }
}

/// Writes the model's state dict (torchvision names, `num_batches_tracked`
/// included) with `meta`, atomically.
pub fn save_model(path: &Path, model: &Vgg, meta: &ModelMeta) -> Result<()> {
    write_safetensors(path, &model.state_dict(), &meta.to_metadata())
}

/// A model file: its metadata (if vggctl wrote it) and tensors.
pub struct ModelFile {
    pub meta: Option<ModelMeta>,
    pub tensors: BTreeMap<String, Tensor>,
}

pub fn read_model_file(path: &Path) -> Result<ModelFile> {
    let sd = read_safetensors(path)?;
    let meta = ModelMeta::from_metadata(&sd.metadata)
        .with_context(|| format!("{}: bad vggctl metadata", path.display()))?;
    Ok(ModelFile {
        meta,
        tensors: sd.tensors,
    })
}

/// Any state dict a user may hand over, told apart by its content rather
/// than its name: a vggctl checkpoint or plain safetensors file, or a
/// `torch.save` file in either format (`.pth`, `.pt`), read natively.
pub fn read_weights(path: &Path) -> Result<ModelFile> {
    match Sniffed::of_file(path) {
        Sniffed::Safetensors => return read_model_file(path),
        Sniffed::Png | Sniffed::Jpeg | Sniffed::Json | Sniffed::Empty => bail!(
            "{}: not a state dict (safetensors or torch.save): it is {}",
            path.display(),
            Sniffed::of_file(path).describe()
        ),
        _ => {}
    }
    let tensors = crate::formats::pth::read_pth(path)?;
    Ok(ModelFile {
        meta: None,
        tensors,
    })
}

/// A vggctl checkpoint's model, loaded, and its metadata; a file without
/// vggctl metadata is an error that points to `--weights`, and so is a
/// `request` (the model flags) that contradicts the metadata.
pub fn load_checkpoint(
    path: &Path,
    request: SpecRequest,
    device: Device,
    values: Values,
) -> Result<(Vgg, ModelMeta)> {
    if Sniffed::of_file(path).is_torch_save() {
        bail!(
            "{}: a torch.save file, not a vggctl checkpoint (safetensors); pass it as --weights {}",
            path.display(),
            path.display()
        );
    }
    let file = read_model_file(path)?;
    let Some(meta) = file.meta else {
        bail!(
            "{}: no vggctl metadata; for a plain state dict use --weights {} with --arch/--bn/--head/--classes",
            path.display(),
            path.display()
        );
    };
    let source = path.display().to_string();
    request.check_against(&source, meta.spec())?;
    let model = Vgg::from_state_dict(meta.spec(), device, &source, &file.tensors, values)?;
    Ok((model, meta))
}

/// A model of `spec` with the state dict in `path` (any format
/// [`read_weights`] takes).
pub fn load_weights(path: &Path, spec: ModelSpec, device: Device, values: Values) -> Result<Vgg> {
    let file = read_weights(path)?;
    let source = path.display().to_string();
    Build::Initialized.model(spec, device, &source, &file.tensors, values)
}

/// The model for the state dict in `path` (any format [`read_weights`]
/// takes): what `request` says, the rest recognized from the weights' names
/// and shapes; with the line saying what was inferred, if anything.
pub fn load_resolved(
    path: &Path,
    request: SpecRequest,
    default_head: Head,
    (device, values, build): (Device, Values, Build),
) -> Result<(Vgg, Option<String>)> {
    let file = read_weights(path)?;
    let source = path.display().to_string();
    let resolved = request.resolve(&source, &file.tensors, default_head)?;
    let model = build.model(resolved.spec, device, &source, &file.tensors, values)?;
    Ok((model, resolved.inferred))
}

/// How a model that loads a state dict is built: initialized first, as a
/// fresh model (drawing from the global generator, so that what training
/// draws next, such as fine-tuning's new head, is what it was before), or
/// blank (no initialization nor copy: eval, predict, export).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Build {
    Initialized,
    Blank,
}

impl Build {
    /// The model of `spec` on `device` holding `dict`.
    pub fn model(
        self,
        spec: ModelSpec,
        device: Device,
        source: &str,
        dict: &BTreeMap<String, Tensor>,
        values: Values,
    ) -> Result<Vgg> {
        match self {
            Build::Blank => Vgg::from_state_dict(spec, device, source, dict, values),
            Build::Initialized => {
                let mut model = Vgg::new(spec, device);
                model.load_state_dict(source, dict, values)?;
                Ok(model)
            }
        }
    }
}

/// What a model loaded from a plain state dict is taken to be: torchvision's
/// ImageNet preprocessing and class names for the imagenet head with 1,000
/// classes, the CIFAR recipe's normalization for the small heads.
pub fn meta_for_weights(spec: ModelSpec) -> ModelMeta {
    let imagenet = spec.head == Head::Imagenet;
    ModelMeta {
        arch: spec.arch,
        bn: spec.bn,
        head: spec.head,
        classes: spec.classes,
        class_names: if imagenet && spec.classes == 1000 {
            crate::data::imagenet::classes()
        } else {
            (0..spec.classes).map(|i| format!("class {i}")).collect()
        },
        mean: if imagenet {
            crate::data::imagenet::MEAN
        } else {
            crate::data::cifar::MEAN
        },
        std: if imagenet {
            crate::data::imagenet::STD
        } else {
            crate::data::cifar::STD
        },
        input_size: if imagenet { 224 } else { 32 },
        dataset: if imagenet { "imagenet" } else { "cifar10" }.into(),
        resize: imagenet.then_some(256),
        interpolation: Filter::Bilinear,
        epoch: 0,
        accuracy: None,
    }
}
