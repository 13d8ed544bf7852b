//! `vggctl prepare`: an image folder (or ImageNet's layout) as one file
//! that training, eval and fine-tuning read (positioned reads, no mapping).

use std::path::PathBuf;

use anyhow::Result;
use vggctl::data::dtd;
use vggctl::data::imagenet;
use vggctl::data::pack::{Prepare, PrepareOptions, prepare, prepare_listed};

use super::listed::{check_fold, is_listed, open_listed, source_from_env};
use super::output::{usage, warn, whole};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// folder (one subfolder of images per class), imagenet (DIR/train/<wnid>/
    /// and DIR/val/<wnid>/), or imagenette (-320px, -160px), oxford-pets,
    /// flowers102, food101, dtd, fgvc-aircraft (-family, -manufacturer),
    /// stanford-cars, gtsrb, eurosat,
    /// caltech101, caltech256, sun397, country211, places365 or places365-256
    /// (their
    /// training and test images, as train reads them; downloaded first if
    /// missing, but Stanford Cars').
    #[arg(long, default_value = "folder")]
    dataset: String,
    /// folder: the class folders; imagenet: the directory holding train/ and
    /// val/; imagenette*, oxford-pets, flowers102, food101, dtd,
    /// fgvc-aircraft*, stanford-cars, gtsrb, eurosat, caltech101, caltech256,
    /// sun397, country211: the directory holding imagenette2/ (-320/, -160/),
    /// oxford-iiit-pet/, flowers-102/, food-101/, dtd/, fgvc-aircraft-2013b/,
    /// stanford_cars/, gtsrb/, eurosat/, caltech101/, caltech256/, SUN397/ or
    /// country211/; places365*: the directory holding Places365's lists and
    /// image folders.
    #[arg(long)]
    data_dir: PathBuf,
    /// dtd: the partition packed (1 to 10), as torchvision's
    /// DTD(partition=K) [default: 1].
    #[arg(long, value_name = "K", value_parser = whole::<usize>)]
    fold: Option<usize>,
    /// folder: validation images in their own class folders.
    #[arg(long)]
    val_dir: Option<PathBuf>,
    /// The file to write (replaced only once it is whole).
    #[arg(long, short)]
    out: PathBuf,
    /// Images whose shorter side is longer are resized to it (torchvision's
    /// Resize) and stored again; the others keep their own bytes, so they
    /// decode to exactly the folder's pixels.
    #[arg(long, default_value_t = 512, value_parser = whole::<i64>)]
    max_side: i64,
    /// JPEG quality of the resized JPEGs (other formats are stored as PNG).
    #[arg(long, default_value_t = 90, value_parser = whole::<u8>)]
    quality: u8,
    /// Store every image as decoded RGB pixels: nothing to decode when
    /// training reads it (faster), about ten times the size of JPEGs.
    #[arg(long)]
    raw: bool,
    /// Fail on an unreadable image instead of skipping it.
    #[arg(long)]
    strict: bool,
    /// The datasets read from lists: never download; fail if the
    /// dataset is not in --data-dir.
    #[arg(long)]
    no_download: bool,
    /// Overwrite an existing --out.
    #[arg(long)]
    force: bool,
}

pub fn run(args: Args) -> Result<()> {
    if args.max_side < 1 {
        return Err(usage(format!(
            "--max-side {} must be at least 1",
            args.max_side
        )));
    }
    if !(1..=100).contains(&args.quality) {
        return Err(usage(format!(
            "--quality {} must be between 1 and 100",
            args.quality
        )));
    }
    let opts = PrepareOptions {
        max_side: args.max_side,
        quality: args.quality,
        raw: args.raw,
        strict: args.strict,
    };
    if args.fold.is_some() && args.dataset != dtd::NAME {
        return Err(usage(
            "--fold: prepare packs a partition of --dataset dtd only",
        ));
    }
    check_fold(&args.dataset, args.fold)?;
    if is_listed(&args.dataset) {
        if args.val_dir.is_some() {
            return Err(usage(format!(
                "--val-dir: {} validates on its own test split",
                args.dataset
            )));
        }
        vggctl::fsutil::check_target(&args.out, args.force)?;
        let download = !args.no_download;
        let source = |name: &str, own| download.then(|| source_from_env(name, own));
        let (images, listed) =
            open_listed((&args.dataset, args.fold), &args.data_dir, &source, false)?;
        let done = prepare_listed((&images, Some(&images)), listed, &args.out, opts)?;
        return report(&args, &done);
    }
    let (dir, val_dir) = match args.dataset.as_str() {
        "folder" => (args.data_dir.clone(), args.val_dir.clone()),
        "imagenet" if args.val_dir.is_none() => (
            imagenet::split_dir(&args.data_dir, "train")?,
            Some(imagenet::split_dir(&args.data_dir, "val")?),
        ),
        "imagenet" => return Err(usage("--val-dir: imagenet's validation images are DIR/val")),
        other => {
            return Err(usage(format!(
                "--dataset {other}: prepare takes folder, imagenet, imagenette (-320px, -160px), oxford-pets, flowers102, food101, dtd, fgvc-aircraft (-family, -manufacturer), stanford-cars, gtsrb, eurosat, caltech101, caltech256, sun397, country211, places365 or places365-256"
            )));
        }
    };
    vggctl::fsutil::check_target(&args.out, args.force)?;
    let done = prepare(&dir, val_dir.as_deref(), &args.out, opts)?;
    report(&args, &done)
}

/// What `prepare` did, on stderr (skipped images) and stdout.
fn report(args: &Args, done: &Prepare) -> Result<()> {
    if let Some(first) = done.skipped.first() {
        warn(format!(
            "skipped {} unreadable image(s) (--strict makes this an error), e.g. {first}",
            done.skipped.len()
        ));
    }
    let bytes = std::fs::metadata(&args.out).map_or(0, |m| m.len());
    println!(
        "prepared {} images ({} resized to a shorter side of {}) into {} ({:.1} MB)",
        done.images,
        done.resized,
        args.max_side,
        args.out.display(),
        bytes as f64 / 1e6
    );
    Ok(())
}
