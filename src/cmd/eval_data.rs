//! The data a model is evaluated on and how it is read: `--dataset` (else
//! the checkpoint's, from its run directory where it has one) and the
//! model's evaluation transform. `eval` scores it; `features` saves a
//! split's rows.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use tch::Device;
use vggctl::checkpoint::ModelMeta;
use vggctl::data::augment::{Augment, Normalizer, Preprocess};
use vggctl::data::image::default_resize;
use vggctl::data::resize::Filter;
use vggctl::data::{Dataset, dtd, folder, is_image_folder, native_side};
use vggctl::train::run_dir::config_beside;

use super::data_opts::DataOpts;
use super::opts::ReadOpts;
use super::output::usage;

/// What a dataset is read for a model by: the data options, the reading
/// options, the weights file (a run directory's data is found from it;
/// None for torchvision's published weights),
/// the seed of a folder's split (None: the run's, else 0), whether the
/// training split is read too
/// (features of it), and STL-10's training fold (DTD's partition is
/// `data.fold`, else the run's).
pub struct EvalData<'a> {
    pub data: &'a DataOpts,
    pub read: &'a ReadOpts,
    pub file: Option<&'a Path>,
    pub seed: Option<u64>,
    pub train: bool,
    pub fold: Option<usize>,
}

/// The dataset to evaluate on (`--dataset`, else the checkpoint's), and its
/// evaluation transform at the model's input size (`meta`: the model's
/// own description; None for a plain state dict, read with the data's own
/// normalization).
pub fn load_data(
    how: &EvalData,
    meta: Option<&ModelMeta>,
    device: Device,
) -> Result<(Dataset, Preprocess)> {
    let EvalData { read: opts, .. } = *how;
    let mut data = how.data.clone();
    if data.dataset.is_none() {
        data.dataset = meta.map(|m| m.dataset.clone());
    }
    let mut seed = how.seed;
    if let Some(file) = how.file {
        from_run_dir(file, &mut data, &mut seed)?;
    }
    opts.check()?;
    // The checkpoint's evaluation transform as this command line reads.
    let read = meta.map(|m| opts.apply(m.clone())).transpose()?;
    if read.is_none() && opts.val_resize_size.is_some() {
        return Err(usage(
            "--val-resize-size: this model (a state dict without vggctl's metadata, not torchvision's ImageNet head) reads its images whole, with no resize before a crop",
        ));
    }
    let input = read
        .as_ref()
        .map_or(opts.input.unwrap_or(native_side(data.dataset())), |m| {
            m.input_size
        });
    // CIFAR's, MNIST's, SVHN's and the digits' images are read whole and
    // resized to the input, as their own models read them: a resize before
    // a centre crop (an ImageNet head's, a folder run's) is for image files.
    let whole = !is_image_folder(data.dataset());
    if whole && opts.val_resize_size.is_some() {
        return Err(usage(format!(
            "--val-resize-size: {}'s images are read whole, resized to the input, with no resize before a crop",
            data.dataset()
        )));
    }
    let resize = read.as_ref().and_then(|m| m.resize).filter(|_| !whole);
    // A CIFAR-10 or digits model on an image folder reads each image as
    // predict does, squeezed whole to its 32x32: only streaming can.
    let squeeze = match meta.map(ModelMeta::host_crop) {
        Some((None, side)) if is_image_folder(data.dataset()) => Some(side),
        _ => None,
    };
    if squeeze.is_some() {
        data.cache_mem = Some(0);
    }
    let filter = read
        .as_ref()
        .map_or(opts.interpolation.unwrap_or(Filter::Bilinear), |m| {
            m.interpolation
        });
    let cache = (resize.unwrap_or(default_resize(input)), filter);
    let fold = match data.dataset() {
        dtd::NAME => data.fold,
        _ => how.fold,
    };
    let dataset = data.load_test(seed.unwrap_or(0), cache, (how.train, fold))?;
    let (mean, std) = meta.map_or((dataset.mean, dataset.std), |m| (m.mean, m.std));
    let augment = match resize {
        Some(_) => Augment::ResizedCrop,
        None => Augment::CropFlip { padding: 4 },
    };
    let mut pre = Preprocess::new(augment, input, Normalizer::new(mean, std, device));
    pre.eval_squeeze = squeeze;
    pre.eval_gray = meta.is_some_and(ModelMeta::gray);
    Ok((dataset, pre))
}

/// A checkpoint in its run directory: the data the run trained on (its
/// directory, validation folder or held-out fraction, DTD's partition,
/// SVHN's extra split)
/// and the seed that drew a held-out part, from wherever eval is started,
/// where the command line does not say otherwise.
fn from_run_dir(file: &Path, data: &mut DataOpts, seed: &mut Option<u64>) -> Result<()> {
    let Some(run) = config_beside(file).filter(|r| r.dataset == data.dataset()) else {
        return Ok(());
    };
    seed.get_or_insert(run.seed);
    if run.dataset == dtd::NAME && data.fold.is_none() {
        data.fold = run.fold;
    }
    // The images a run held out of SVHN's train + extra (--val-on val).
    data.extra |= run.extra;
    if data.data_dir.is_none() {
        data.data_dir = Some(PathBuf::from(run.data_dir));
        if data.val_dir.is_none() {
            data.val_dir = run.val_dir.map(PathBuf::from);
        }
    }
    if data.val_split.is_none() {
        data.val_split = Some(run.val_split);
        // The fraction the run held out, as its file records it.
        if let Some(problem) = folder::val_split_problem(run.val_split) {
            let config = file.with_file_name("config.json");
            bail!("{}: val_split {problem}", config.display());
        }
    }
    Ok(())
}
