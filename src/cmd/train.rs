//! `vggctl train`: the CIFAR-10 recipe (torchvision's ImageNet recipe with
//! `--dataset imagenet`), with resumable checkpoints.

use std::path::PathBuf;

use anyhow::Result;
use vggctl::checkpoint::load_weights;
use vggctl::data::augment::Augment;
use vggctl::data::{native_side, trains_by_imagenet_recipe};
use vggctl::model::{Head, ModelSpec, Vgg};

use super::checks::warn_unused_options;
use super::data_opts::DataOpts;
use super::opts::{DeviceOpts, LoadOpts, ModelOpts, checkpoint_in};
use super::output::usage;
use super::recipe::imagenet_recipe;
use super::resume::{Start, resume};
use super::training::{HyperOpts, execute};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelOpts,
    #[command(flatten)]
    pub load: LoadOpts,
    #[command(flatten)]
    pub device: DeviceOpts,
    #[command(flatten)]
    pub data: DataOpts,
    /// Start from these weights instead of a fresh initialization (a state
    /// dict of the same model: .safetensors, .pth/.pt or a vggctl checkpoint).
    #[arg(long, help_heading = "Model")]
    pub initial_checkpoint: Option<PathBuf>,
    /// torchvision's train.py --weights (hidden: one line points to
    /// --initial-checkpoint and finetune).
    #[arg(long, hide = true)]
    weights: Option<String>,
    #[command(flatten)]
    pub hyper: HyperOpts,
}

pub fn run(args: Args) -> Result<()> {
    let h = &args.hyper;
    if args.weights.is_some() {
        return Err(usage(
            "--weights: train starts from weights with --initial-checkpoint FILE; vggctl finetune --weights imagenet fine-tunes torchvision's",
        ));
    }
    let Some((world, device, start)) = h.begin(&args.data, &args.device)? else {
        return Ok(());
    };
    if let Start::Resume(path) = &start {
        if args.initial_checkpoint.is_some() {
            return Err(usage(
                "--initial-checkpoint starts a new run; --resume continues one",
            ));
        }
        return resume(path, h, &args.data, device, args.model.json, &world, None);
    }
    let initial = args
        .initial_checkpoint
        .as_deref()
        .map(checkpoint_in)
        .transpose()?;
    // The classes are the dataset's (a folder's class folders): --classes
    // may repeat them.
    let imagenet = trains_by_imagenet_recipe(args.data.dataset());
    // torchvision's RandomResizedCrop at 224 for ImageNet, else the CIFAR
    // recipe's padded crop at 32 (STL-10's 96; --input may give another side).
    let (augment, input) = match imagenet {
        true => (Augment::ResizedCrop, 224),
        false => (
            Augment::CropFlip { padding: 4 },
            native_side(args.data.dataset()),
        ),
    };
    h.recipe.check_sides(augment, input, args.data.dataset())?;
    let spec = args.model.spec(match imagenet {
        true => Head::Imagenet,
        false => Head::Cifar,
    })?;
    let mut data = args.data.clone();
    let classes = data.class_count(args.model.classes)?;
    let spec = ModelSpec { classes, ..spec };
    let mut config = h.config(spec, &data, device, 100);
    if imagenet {
        imagenet_recipe(&h.typed, &mut config);
    }
    config.augment = augment;
    config.input_size = h.recipe.input.unwrap_or(input);
    if let Start::AutoResume(path) = &start {
        config.weights = initial.as_ref().map(|p| p.display().to_string());
        let json = args.model.json;
        return resume(path, h, &data, device, json, &world, Some(&config));
    }
    tch::manual_seed(config.seed as i64);
    let model = match &initial {
        Some(path) => {
            config.weights = Some(path.display().to_string());
            load_weights(path, config.model, device, args.load.values())?
        }
        None => Vgg::new(config.model, device),
    };
    warn_unused_options(h, &config, &world);
    execute(config, h, &data, model, None, args.model.json, &world)
}
