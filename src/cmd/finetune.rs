//! `vggctl finetune`: torchvision's ImageNet weights (or any state dict),
//! `classifier.6` swapped for a new layer with `--classes` outputs, `features`
//! frozen by default, then the training loop of `vggctl train`.

use std::path::PathBuf;

use anyhow::{Result, bail};
use vggctl::checkpoint::Build;
use vggctl::data::augment::Augment;
use vggctl::data::is_image_folder;
use vggctl::model::{Head, SpecRequest};

use super::checks::warn_unused_options;
use super::data_opts::DataOpts;
use super::opts::{DeviceOpts, LoadOpts, ModelOpts};
use super::output::{usage, whole};
use super::resume::{Start, resume};
use super::training::{HyperOpts, execute};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// `imagenet` (torchvision's file for --arch/--bn: ./weights/, the torch hub
    /// cache, or a verified download), or a state dict: .pth/.pt (either
    /// torch.save format), .safetensors, or a vggctl checkpoint.
    #[arg(long, value_parser = clap::builder::NonEmptyStringValueParser::new(), default_value = "imagenet")]
    weights: String,
    /// Train all of `features` too (by default they are frozen).
    #[arg(long, conflicts_with = "freeze_until")]
    train_features: bool,
    /// Freeze only `features.0` .. `features.{INDEX-1}` (torchvision's module index).
    #[arg(long, value_parser = whole::<usize>)]
    freeze_until: Option<usize>,
    #[command(flatten)]
    model: ModelOpts,
    #[command(flatten)]
    load: LoadOpts,
    #[command(flatten)]
    device: DeviceOpts,
    #[command(flatten)]
    data: DataOpts,
    #[command(flatten)]
    pub hyper: HyperOpts,
}

pub fn run(args: Args) -> Result<()> {
    let h = &args.hyper;
    let Some((world, device, start)) = h.begin(&args.data, &args.device)? else {
        return Ok(());
    };
    if let Start::Resume(path) = &start {
        return resume(path, h, &args.data, device, args.model.json, &world, None);
    }
    let augment = match is_image_folder(args.data.dataset()) {
        true => Augment::ResizedCrop,
        false => Augment::CropFlip { padding: 4 },
    };
    h.recipe.check_sides(augment, 224, args.data.dataset())?;
    if args.model.head.is_some_and(|hd| hd != Head::Imagenet) {
        return Err(usage(
            "--head: fine-tuning starts from torchvision's imagenet head",
        ));
    }
    let request = args.model.request()?;
    let mut data = args.data.clone();
    let classes = data.class_count(args.model.classes)?;
    tch::manual_seed(h.seed as i64);
    // --classes is the new head's; the weights keep their own.
    let request = SpecRequest {
        classes: None,
        ..request
    };
    let (mut model, path) = args.model.load_weights(
        &args.weights,
        request,
        (device, args.load.values(), Build::Initialized),
        h.quiet,
    )?;
    if model.spec.head != Head::Imagenet {
        bail!(
            "{}: the weights have the {} head; fine-tuning starts from torchvision's imagenet head",
            path.display(),
            model.spec.head.name()
        );
    }
    model.replace_last_linear(classes);
    let n_features = model.features.layers.len();
    let freeze = if args.train_features {
        0
    } else {
        args.freeze_until.unwrap_or(n_features)
    };
    if freeze > n_features {
        return Err(usage(format!(
            "--freeze-until {freeze}: features has only {n_features} modules"
        )));
    }
    let mut config = h.config(model.spec, &data, device, 10);
    config.input_size = h.recipe.input.unwrap_or(224);
    config.augment = augment;
    config.imagenet_normalization = true;
    config.freeze_prefix = freeze;
    config.weights = Some(path.display().to_string());
    if h.out.is_none() {
        config.out = PathBuf::from(config.out.display().to_string().replacen(
            "runs/",
            "runs/finetune-",
            1,
        ));
    }
    if let Start::AutoResume(path) = &start {
        let json = args.model.json;
        return resume(path, h, &args.data, device, json, &world, Some(&config));
    }
    warn_unused_options(h, &config, &world);
    execute(config, h, &data, model, None, args.model.json, &world)
}
