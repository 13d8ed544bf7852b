//! The dataset options shared by train, eval and finetune.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use vggctl::data::cifar;
use vggctl::data::download::DownloadSource;
use vggctl::data::folder;
use vggctl::data::folder_scan;
use vggctl::data::imagenet;
use vggctl::data::mnist;
use vggctl::data::prepared::{self, Prepared};
use vggctl::data::{DOWNLOADED_ONLY, fer2013, is_downloaded, is_unsplit, usps};

use super::listed::{check_fold, listed_classes, source_from_env, unknown_dataset};
use super::output::{http_urls, parse_size, started, usage, whole};

#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Data")]
pub struct DataOpts {
    /// Dataset: cifar10, cifar100 (its 100 fine classes), mnist,
    /// fashion-mnist, kmnist, qmnist (its 60,000 training and 60,000 test
    /// digits), emnist-byclass, emnist-bymerge,
    /// emnist-balanced, emnist-letters, emnist-digits, emnist-mnist (EMNIST's
    /// splits, their characters turned upright; their 28x28 gray images read
    /// as 32x32 RGB), svhn
    /// (its train and test splits), usps (USPS's 7,291 training and 2,007
    /// test digits, 16x16 gray read as 32x32 RGB), stl10 (its 5,000 labelled training and
    /// 8,000 test images, 96x96), fer2013 (FER2013's 28,709 training and
    /// 7,178 test faces, 48x48 gray, 7 emotions; never downloaded, its file
    /// put in place by hand), digits
    /// (scikit-learn's handwritten digits, built
    /// into vggctl: no download), folder (one subfolder of images per
    /// class, read as torchvision's ImageFolder reads it) or imagenet
    /// (DIR/train/<wnid>/ and DIR/val/<wnid>/, torchvision's ImageFolder
    /// layout, classes named by their WordNet ids), imagenette,
    /// imagenette-320px, imagenette-160px (Imagenette's ten ImageNet
    /// classes in ImageNet's layout, as published or resized to a shorter
    /// side of 320 or 160: its train and val splits), oxford-pets (Oxford-IIIT
    /// Pet's 37 breeds: its trainval split to train on, its test split to
    /// validate on), flowers102 (Oxford 102 Flowers: its train and val
    /// splits to train on, its test split to validate on), food101
    /// (Food-101: its train and test splits), dtd (the Describable
    /// Textures Dataset's 47 classes: a partition's train and val lists to
    /// train on, its test list to validate on), fgvc-aircraft,
    /// fgvc-aircraft-family, fgvc-aircraft-manufacturer (FGVC-Aircraft's
    /// 100 variants, 70 families or 30 manufacturers, torchvision's
    /// annotation levels: its train and val splits to train on, its test
    /// split to validate on), stanford-cars (Stanford Cars' 196
    /// models: its train and test splits; never downloaded, its files put
    /// in place by hand), gtsrb (the German Traffic Sign
    /// Recognition Benchmark's 43 signs: its train and test splits, not
    /// mirrored in training), eurosat (EuroSAT's 27,000 satellite images
    /// of 10 land uses), caltech101 (Caltech-101's 101 objects),
    /// caltech256 (Caltech-256's 256 objects and clutter), sun397
    /// (SUN397's 397 scenes; these four have
    /// no splits: the part --val-split holds out is validated on, as a
    /// folder's), country211 (Country211's 211 countries: its train and
    /// valid splits to train on, its test split to validate on) or
    /// places365, places365-256 (Places365-Standard's 365 scenes, as
    /// published or at 256x256: its train-standard split to train on, its
    /// val split to validate on; trained as ImageNet is); their
    /// photographs
    /// are read as a folder's [default: cifar10; eval: the
    /// checkpoint's; features: none, the images given instead].
    #[arg(long)]
    pub dataset: Option<String>,
    /// cifar10: the directory holding cifar-10-batches-py/ (torchvision's) or
    /// cifar-10-batches-bin/; cifar100: cifar-100-python/ or
    /// cifar-100-binary/; mnist, fashion-mnist, kmnist, qmnist, emnist-*:
    /// the directory holding MNIST/raw/, FashionMNIST/raw/, KMNIST/raw/,
    /// QMNIST/raw/ or EMNIST/raw/ (torchvision's); svhn: the
    /// directory holding train_32x32.mat and test_32x32.mat; usps: the
    /// directory holding usps.bz2 and usps.t.bz2; stl10: the
    /// directory holding stl10_binary/; fer2013: the directory holding
    /// fer2013/ (fer2013.csv or icml_face_data.csv in it, torchvision's);
    /// folder: the class folders; imagenet: the
    /// directory holding train/ and val/; folder, imagenet: or the file
    /// `vggctl prepare` made of them; imagenette*, oxford-pets, flowers102,
    /// food101, dtd, fgvc-aircraft*, stanford-cars, gtsrb, eurosat, caltech101,
    /// caltech256, sun397, country211: the directory holding imagenette2/
    /// (-320/, -160/), oxford-iiit-pet/, flowers-102/, food-101/, dtd/,
    /// fgvc-aircraft-2013b/, stanford_cars/, gtsrb/, eurosat/, caltech101/,
    /// caltech256/, SUN397/ or country211/ (torchvision's); places365*: the
    /// directory holding its lists and image folders (torchvision's root);
    /// or the file
    /// `vggctl prepare` made of it
    /// [default: ./data].
    #[arg(long, alias = "data-path")]
    pub data_dir: Option<PathBuf>,
    /// Where to download the binary CIFAR-10 or CIFAR-100 archive (or
    /// STL-10's) from
    /// when it is missing; mnist, fashion-mnist, kmnist, qmnist, svhn, usps, oxford-pets,
    /// flowers102, food101, dtd, fgvc-aircraft*, gtsrb, eurosat, caltech101, caltech256, sun397, country211, imagenette*, places365*: the mirror (or comma-separated mirrors) serving
    /// their files (emnist-*: gzip.zip, every split's) [default:
    /// $VGGCTL_<DATASET>_URL (e.g. $VGGCTL_FASHION_MNIST_URL), else the
    /// dataset's own, as torchvision's].
    #[arg(long, value_parser = http_urls)]
    pub data_url: Option<String>,
    /// MD5 the downloaded archive must have (emnist-*: gzip.zip's;
    /// mnist, fashion-mnist, kmnist, qmnist: four,
    /// comma-separated, for train-images, train-labels, t10k-images,
    /// t10k-labels; svhn: three, train, test and extra; usps: two, usps.bz2
    /// and usps.t.bz2; oxford-pets: two, images.tar.gz
    /// and annotations.tar.gz; flowers102: three, 102flowers.tgz,
    /// imagelabels.mat and setid.mat; places365*: three, the lists', the
    /// training images' and the val images' archives; gtsrb: three, the training images',
    /// the test images' and their classes' zips; food101, dtd, fgvc-aircraft*,
    /// eurosat, caltech101, caltech256, sun397, country211, imagenette*: one, which
    /// for fgvc-aircraft* must be given: its publisher gives none) [default:
    /// $VGGCTL_<DATASET>_MD5, else the official files'].
    #[arg(long, hide = true)]
    pub data_md5: Option<String>,
    /// stl10: train on its predefined training fold K (0 to 9: 1,000 of the
    /// 5,000 labelled images, line K of fold_indices.txt), as torchvision's
    /// STL10(folds=K) and STL-10's protocol [default: all 5,000]; dtd: read
    /// its partition K (1 to 10: labels/train<K>.txt, val<K>.txt and
    /// test<K>.txt), as torchvision's DTD(partition=K) [default: 1; eval:
    /// the run's].
    #[arg(long, value_name = "K", value_parser = whole::<usize>)]
    pub fold: Option<usize>,
    /// svhn: train on its extra split too (531,131 images more, after the
    /// 73,257 of train; a 1.3 GB file, about 1.6 GB in memory), as most SVHN
    /// results do (torchvision's SVHN(split="extra")) [eval: the run's, for
    /// --val-on val].
    #[arg(long)]
    pub extra: bool,
    /// The split validated on after each epoch (and best.safetensors chosen
    /// on): test, or val, leaving the test split unseen until eval: for
    /// flowers102, dtd, fgvc-aircraft* and country211 their own val split (training on train alone
    /// instead of train and val, as benchmarks do), for the others but
    /// folder, imagenet, eurosat, caltech101, caltech256 and sun397 (which hold out
    /// --val-dir, DIR/val or a --val-split part already)
    /// the part --val-split (0.1) of the training split drawn by --seed;
    /// eval: the split evaluated [default: test].
    #[arg(long, value_name = "SPLIT", value_parser = ["test", "val"])]
    pub val_on: Option<String>,
    /// Never download; fail if the data is not in --data-dir.
    #[arg(long)]
    pub no_download: bool,
    /// folder: validation images in their own class folders; eval (folder,
    /// imagenet): the class folders to evaluate on, every image of them
    /// (no --data-dir needed).
    #[arg(long)]
    pub val_dir: Option<PathBuf>,
    /// folder without --val-dir: the fraction of images held out (seeded by
    /// --seed) [default: 0.1; eval: the run's].
    #[arg(long)]
    pub val_split: Option<f64>,
    /// folder: fail on an unreadable image instead of skipping it.
    #[arg(long)]
    pub strict: bool,
    /// folder: where the decoded images are cached for the next run
    /// [default: $XDG_CACHE_HOME/vggctl/folders, i.e. ~/.cache/vggctl/folders].
    #[arg(long, env = "VGGCTL_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// folder, imagenet: the memory decoded images may take (bytes, or with
    /// K, M, G); a folder needing more is read from its files as training
    /// goes, by --workers threads, instead of decoded into memory first
    /// (0 always streams) [default: half of the available memory].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub cache_mem: Option<u64>,
    /// folder, imagenet: threads decoding streamed images [default: the cores,
    /// shared among the machine's ranks].
    #[arg(long, short_alias = 'j', value_name = "N", value_parser = started)]
    pub workers: Option<usize>,
}

impl DataOpts {
    /// Where the dataset `name` is downloaded from: --data-url, else its
    /// environment variable (`VGGCTL_CIFAR100_URL`, `VGGCTL_FASHION_MNIST_URL`),
    /// else `own`; the MD5 alike. None with --no-download.
    pub(super) fn download_source(
        &self,
        name: &str,
        own: DownloadSource,
    ) -> Option<DownloadSource> {
        let env = source_from_env(name, own);
        (!self.no_download).then(|| DownloadSource {
            url: self.data_url.clone().unwrap_or(env.url),
            md5: self.data_md5.clone().unwrap_or(env.md5),
        })
    }

    /// The warnings that --data-url and --data-md5 are ignored, where they
    /// are given and the dataset `name` is never downloaded.
    pub fn unused_source(&self, name: &str) -> Vec<String> {
        let given = [
            ("--data-url", self.data_url.is_some()),
            ("--data-md5", self.data_md5.is_some()),
        ];
        given
            .into_iter()
            .filter(|&(_, given)| given && !is_downloaded(name))
            .map(|(flag, _)| format!("{flag} is ignored: it {DOWNLOADED_ONLY}"))
            .collect()
    }

    /// --val-dir as a run records it: only a folder's training reads it
    /// (elsewhere it is ignored, with a warning).
    pub fn training_val_dir(&self) -> Option<&Path> {
        self.val_dir
            .as_deref()
            .filter(|_| self.dataset() == "folder")
    }

    /// The fraction of a folder held out (`--val-split`, 0.1 if none).
    pub fn held_fraction(&self) -> f64 {
        self.val_split.unwrap_or(folder::DEFAULT_VAL_SPLIT)
    }

    /// The dataset named, cifar10 if none.
    pub fn dataset(&self) -> &str {
        self.dataset.as_deref().unwrap_or("cifar10")
    }

    pub fn dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("./data"))
    }

    /// The number of classes to train for: the dataset's (a folder's class
    /// folders, or 10), which `--classes` may repeat but not change. Fills in
    /// the default data directory.
    pub fn class_count(&mut self, asked: Option<i64>) -> Result<i64> {
        let dataset = self.dataset().to_string();
        if dataset == "folder" && self.data_dir.is_none() {
            return Err(usage(
                "--dataset folder needs --data-dir DIR (one subfolder of images per class)",
            ));
        }
        self.check_fold()?;
        self.check_val_on()?;
        self.check_val_split()?;
        self.data_dir.get_or_insert_with(|| PathBuf::from("./data"));
        let found = match dataset.as_str() {
            "folder" | "imagenet" if prepared::is_prepared(&self.dir()) => {
                Prepared::open(&self.dir())?.index.classes.len() as i64
            }
            "folder" => folder_scan::scan(&self.dir())?.0.len() as i64,
            "imagenet" => folder_scan::scan(&imagenet::split_dir(&self.dir(), "train")?)?
                .0
                .len() as i64,
            "digits" | "svhn" | "stl10" | usps::NAME => 10,
            fer2013::NAME => fer2013::CLASSES.len() as i64,
            other => match (
                cifar::named(other),
                mnist::named(other),
                listed_classes(other),
            ) {
                (Some(c), _, _) => c.classes,
                (_, Some(m), _) => m.classes.len() as i64,
                (_, _, Some(n)) => n,
                _ => return Err(usage(unknown_dataset(other))),
            },
        };
        if found < 2 {
            bail!(
                "{}: only {found} class folder; a classifier needs at least two",
                self.dir().display()
            );
        }
        let classes = asked.unwrap_or(found);
        if classes != found {
            let data = match dataset.as_str() {
                "digits" => "the built-in digits".to_string(),
                _ => format!("{} ({dataset})", self.dir().display()),
            };
            bail!("--classes {classes} does not match {data}, which has {found} classes");
        }
        Ok(classes)
    }

    /// `--val-on val`: a listed dataset's own val split, not its test split.
    pub fn own_val(&self) -> bool {
        self.val_on.as_deref() == Some("val")
    }

    /// `--val-on val` names a dataset whose validation images are its test
    /// split (not a folder's held-out part or ImageNet's DIR/val).
    pub(super) fn check_val_on(&self) -> Result<()> {
        let already = match self.dataset() {
            "folder" => "--val-dir, or the part --val-split holds out",
            "imagenet" => "DIR/val (ImageNet's val split)",
            other if is_unsplit(other) => "the part --val-split holds out (it has no test split)",
            _ => return Ok(()),
        };
        match self.own_val() {
            true => Err(usage(format!(
                "--val-on val: --dataset {} validates on {already}; leave --val-on out",
                self.dataset()
            ))),
            false => Ok(()),
        }
    }

    /// `--val-split` is a fraction a part can be held out by (checked even
    /// where it is ignored).
    pub(super) fn check_val_split(&self) -> Result<()> {
        match self.val_split.and_then(folder::val_split_problem) {
            Some(problem) => {
                let hint = if self.dataset() == "folder" {
                    " (or give --val-dir)"
                } else {
                    ""
                };
                Err(usage(format!("--val-split {problem}{hint}")))
            }
            None => Ok(()),
        }
    }

    /// `--fold` names one of STL-10's folds, or of DTD's partitions.
    pub fn check_fold(&self) -> Result<()> {
        check_fold(self.dataset(), self.fold)
    }
}
