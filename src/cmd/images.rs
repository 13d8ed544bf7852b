//! What `predict` and `features` share: image arguments (files, or
//! directories standing for their images), the model from --checkpoint or
//! --weights, and batches of images read as the model's evaluation reads
//! them (torchvision's eval transform, or a CIFAR-style model's squares;
//! gray for a model of gray images).

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use rayon::prelude::*;
use tch::{Device, Tensor};
use vggctl::checkpoint::ModelMeta;
use vggctl::data::augment::{Augment, Normalizer, Preprocess};
use vggctl::data::folder_scan::{extension_list, image_files, is_class_layout, scan};
use vggctl::data::image::{decode_rgb, eval_crop, to_luma};
use vggctl::data::resize::Filter;
use vggctl::model::{Head, Vgg, check_input};
use vggctl::numerics::{Activity, Numerics};

use super::opts::{DeviceOpts, LoadOpts, ModelOpts, NumericsOpts, ReadOpts, checkpoint_in};
use super::output::{usage, warn, whole};

#[derive(clap::Args, Debug)]
pub struct ImagesIn {
    /// Images (JPEG, PNG, BMP, PPM/PGM, TIFF or WebP), or directories: the
    /// images in them and their subfolders, in ImageFolder's order.
    pub images: Vec<PathBuf>,
    /// A vggctl checkpoint (architecture, class names and preprocessing from
    /// its metadata; a run directory means its best.safetensors).
    #[arg(long, conflicts_with = "weights")]
    pub checkpoint: Option<PathBuf>,
    /// `imagenet` (torchvision's weights for --arch/--bn) or a state dict file
    /// (.pth/.pt/.safetensors; its architecture, head and classes inferred).
    #[arg(long, value_parser = clap::builder::NonEmptyStringValueParser::new())]
    pub weights: Option<String>,
    #[command(flatten)]
    pub read: ReadOpts,
    /// Images read and run through the model at a time.
    #[arg(short, long, default_value_t = 64, value_parser = whole::<usize>)]
    pub batch_size: usize,
    #[command(flatten)]
    pub model: ModelOpts,
    #[command(flatten)]
    pub load: LoadOpts,
    #[command(flatten)]
    pub device: DeviceOpts,
    #[command(flatten)]
    pub numerics: NumericsOpts,
}

/// The images, model and reading that [`ImagesIn`] asked for.
pub struct Opened {
    /// The image files, in order.
    pub files: Vec<PathBuf>,
    /// What the one directory argument says of the files' classes.
    pub classes: ClassFolders,
    pub model: Vgg,
    pub meta: ModelMeta,
    pub numerics: Numerics,
    pub reader: Reader,
}

/// The classes of the images where the only argument is a directory laid
/// out as ImageFolder reads it (class folders, no images of its own).
pub enum ClassFolders {
    /// Not that layout: files, several arguments, or a plain directory.
    None,
    /// The folders (sorted) and each file's index in them.
    Labeled {
        classes: Vec<String>,
        labels: Vec<i64>,
    },
    /// That layout, but no classes ImageFolder takes (a folder without
    /// images): the files are all the images in it, and this is why.
    Unlabeled(anyhow::Error),
}

/// How images are read for the model: its evaluation transform.
pub struct Reader {
    /// The host's resize and crop sides, and the resize's filter.
    host_crop: (Option<i64>, i64),
    interpolation: Filter,
    /// Each image made gray first (a model of gray images).
    gray: bool,
    pre: Preprocess,
    device: Device,
}

/// The model [`ImagesIn`] names, and how it computes.
pub struct Loaded {
    pub model: Vgg,
    pub meta: ModelMeta,
    /// Whether `meta` is the model's own description (a checkpoint's, or
    /// torchvision's for the ImageNet head), not the defaults for a plain
    /// state dict's head.
    pub described: bool,
    /// The weights file: --checkpoint's (a run directory's), or --weights'
    /// (None for `imagenet`).
    pub file: Option<PathBuf>,
    pub numerics: Numerics,
    pub device: Device,
}

impl ImagesIn {
    /// Checks the options, lists the images and loads the model.
    pub fn open(&self) -> Result<Opened> {
        let (checkpoint, device) = self.checked()?;
        let (files, classes) = expand_dirs(&self.images)?;
        let Loaded {
            model,
            meta,
            numerics,
            ..
        } = self.load(checkpoint.as_deref(), device)?;
        let meta = self.read.apply(meta)?;
        check_input(meta.input_size)?;
        // The images arrive resized and cropped (torchvision's eval
        // transform), or, for CIFAR-style models, as the squares their
        // evaluation read, which the device then resizes to the input as
        // it did.
        let augment = match meta.host_crop().1 == meta.input_size {
            true => Augment::ResizedCrop,
            false => Augment::CropFlip { padding: 0 },
        };
        let normalizer = Normalizer::new(meta.mean, meta.std, device);
        let pre = Preprocess::new(augment, meta.input_size, normalizer);
        let reader = Reader {
            host_crop: meta.host_crop(),
            interpolation: meta.interpolation,
            gray: meta.gray(),
            pre,
            device,
        };
        Ok(Opened {
            files,
            classes,
            model,
            meta,
            numerics,
            reader,
        })
    }

    /// Checks the options and loads the model, for data other than image
    /// files (its description as the file gives it, before --input and
    /// the other reading options).
    pub fn open_model(&self) -> Result<Loaded> {
        let (checkpoint, device) = self.checked()?;
        self.load(checkpoint.as_deref(), device)
    }

    /// The options' own checks; the checkpoint file (a run directory's)
    /// and the device.
    fn checked(&self) -> Result<(Option<PathBuf>, Device)> {
        let checkpoint = self.checkpoint.as_deref().map(checkpoint_in).transpose()?;
        let device = self.device.get()?;
        if self.batch_size < 1 {
            return Err(usage("--batch-size must be at least 1"));
        }
        self.read.check()?;
        Ok((checkpoint, device))
    }

    fn load(&self, checkpoint: Option<&Path>, device: Device) -> Result<Loaded> {
        let source = (checkpoint, self.weights.as_deref());
        let (model, meta) = self.model.load_either(source, &self.load, device)?;
        let request = self.numerics.request(None, false);
        let numerics = Numerics::decide(&request, device, Activity::Predicting, &mut warn)?;
        let weights = self.weights.as_deref().filter(|w| *w != "imagenet");
        Ok(Loaded {
            described: checkpoint.is_some() || model.spec.head == Head::Imagenet,
            file: checkpoint
                .map(Path::to_path_buf)
                .or(weights.map(PathBuf::from)),
            model,
            meta,
            numerics,
            device,
        })
    }
}

impl Reader {
    /// `chunk`'s images decoded, resized, cropped and normalized on the
    /// device: the model's fp32 input. The first unreadable file (in
    /// order) is the error.
    pub fn read(&self, chunk: &[PathBuf]) -> Result<Tensor> {
        // Decoding and resizing dominate on the CPU: all cores, one image each.
        let ((resize, crop), interpolation) = (self.host_crop, self.interpolation);
        let gray = self.gray;
        let batch: Vec<Tensor> = chunk
            .par_iter()
            .map(|p| {
                decode_rgb(p).map(|mut img| {
                    if gray {
                        to_luma(&mut img);
                    }
                    let size = (img.height() as usize, img.width() as usize);
                    eval_crop(img.as_raw(), size, (resize, crop), interpolation)
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .collect::<Result<_>>()?;
        let x = Tensor::stack(&batch, 0).to_device(self.device);
        Ok(self.pre.eval(&x, None))
    }
}

/// The image files `paths` name: files as given, directories as their
/// images (a directory of class folders in ImageFolder's order: class by
/// class, where sorted paths could interleave `cat/sub/` with `cat-2/`),
/// and, for one such directory alone, the files' classes.
fn expand_dirs(paths: &[PathBuf]) -> Result<(Vec<PathBuf>, ClassFolders)> {
    let mut files = Vec::new();
    let mut classes = ClassFolders::None;
    for p in paths {
        let scanned = match p.is_dir() && is_class_layout(p)? {
            true => Some(scan(p)),
            false => None,
        };
        match scanned {
            Some(Ok((names, labeled))) => {
                let (found, labels): (Vec<_>, _) = labeled.into_iter().unzip();
                files.extend(found);
                if paths.len() == 1 {
                    classes = ClassFolders::Labeled {
                        classes: names,
                        labels,
                    };
                }
            }
            Some(Err(e)) => {
                files.extend(dir_images(p)?);
                if paths.len() == 1 {
                    classes = ClassFolders::Unlabeled(e);
                }
            }
            None if p.is_dir() => files.extend(dir_images(p)?),
            None => files.push(p.clone()),
        }
    }
    Ok((files, classes))
}

/// The images in `dir` and its subfolders, sorted by path; none is an error.
fn dir_images(dir: &Path) -> Result<Vec<PathBuf>> {
    let found = image_files(dir)?;
    if found.is_empty() {
        bail!(
            "{}: no images in this directory or its subfolders (images are {})",
            dir.display(),
            extension_list()
        );
    }
    Ok(found)
}
