//! What `--help` shows after the options: each subcommand's examples, and
//! the environment and exit codes on the top-level page; and the
//! `completions` and `man` subcommands, generated from the same definitions.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap_complete::Shell;

pub const TOP: &str = "\
Environment:
  VGGCTL_WEIGHTS_DIR    a folder searched first for torchvision's weight files
  VGGCTL_WEIGHTS_URL    where to download them from [default: https://download.pytorch.org/models]
  TORCH_HOME            torch hub's cache: $TORCH_HOME/hub/checkpoints [default: ~/.cache/torch]
  VGGCTL_CIFAR10_URL, VGGCTL_CIFAR100_URL, VGGCTL_MNIST_URL, VGGCTL_FASHION_MNIST_URL,
  VGGCTL_KMNIST_URL, VGGCTL_QMNIST_URL, VGGCTL_EMNIST_URL, VGGCTL_SVHN_URL,
  VGGCTL_USPS_URL, VGGCTL_STL10_URL, VGGCTL_OXFORD_PETS_URL, VGGCTL_FLOWERS102_URL,
  VGGCTL_FOOD101_URL, VGGCTL_DTD_URL, VGGCTL_FGVC_AIRCRAFT_URL, VGGCTL_GTSRB_URL, VGGCTL_EUROSAT_URL,
  VGGCTL_CALTECH101_URL, VGGCTL_CALTECH256_URL, VGGCTL_SUN397_URL,
  VGGCTL_COUNTRY211_URL, VGGCTL_IMAGENETTE_URL, VGGCTL_IMAGENETTE_320PX_URL,
  VGGCTL_IMAGENETTE_160PX_URL, VGGCTL_PLACES365_URL, VGGCTL_PLACES365_256_URL
                        where to download each dataset from (also --data-url; mnist,
                        fashion-mnist, kmnist, qmnist, emnist-*, svhn, usps, oxford-pets,
                        flowers102, food101, dtd, fgvc-aircraft*, gtsrb, eurosat, caltech101,
                        caltech256, sun397, country211, imagenette*, places365*:
                        comma-separated mirrors, tried in turn)
                        [default: the dataset's own, as torchvision's]
  VGGCTL_<DATASET>_MD5  the MD5 its download must have (mnist, fashion-mnist, kmnist, qmnist: four,
                        comma-separated; oxford-pets, usps: two; svhn, flowers102, gtsrb,
                        places365*: three) [default: the official files'; fgvc-aircraft*:
                        none is published, so its download needs this]
  VGGCTL_CACHE_DIR      where image folders' decoded images are cached (also --cache-dir)
                        [default: $XDG_CACHE_HOME/vggctl/folders, i.e. ~/.cache/vggctl/folders]
  VGGCTL_HTTP_TIMEOUT   seconds a download may stall [default: 60]
  VGGCTL_LOG_INTERVAL   steps (50) or seconds (30s) between progress lines when stderr is
                        no terminal (also --log-interval) [default: 30s]
  RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
                        data-parallel ranks, as torchrun sets them (Slurm's SLURM_PROCID,
                        SLURM_NTASKS and SLURM_LOCALID too)

Exit status:
  0 success, 1 a failure while running, 2 a command line that cannot work,
  130/143 stopped by Ctrl-C/SIGTERM after saving a resume point

'vggctl <command> --help' shows a command's options and examples.";

pub const TRAIN: &str = "\
Examples:
  vggctl train                                     CIFAR-10's recipe (VGG16, 100 epochs; downloads to ./data)
  vggctl train --arch vgg11_bn --head cifar -e 30 -o runs/v11
  vggctl train --dataset cifar100 --arch vgg16_bn     CIFAR-100's 100 classes (downloads to ./data)
  vggctl train --dataset svhn --extra --arch vgg16_bn     SVHN's train and extra splits (604,388 digits)
  vggctl train --dataset emnist-balanced --arch vgg11_bn    EMNIST's 47 balanced classes
  vggctl train --dataset gtsrb --arch vgg11_bn -e 30     GTSRB's 43 traffic signs (never mirrored)
  vggctl train --dataset folder --data-dir photos --arch vgg11 --head gap
  vggctl train --dataset imagenet --data-dir /data/imagenet --arch vgg16    torchvision's recipe
  vggctl train --dataset imagenette-160px --arch vgg11_bn --input 128 --val-resize-size 146 -e 40
  vggctl train --dataset imagenet --data-dir /data/imagenet --train-crop-size 176 --val-resize-size 232
  vggctl train --dataset folder --data-dir icons --arch vgg11 --input 64     trained and evaluated at 64x64
  vggctl train --resume runs/v11 -e 60             continue a run (Ctrl-C saves), or extend it
  vggctl train --arch vgg11_bn --model-ema --mixup-alpha 0.2 --cutmix-alpha 1.0 --tensorboard
  vggctl train --auto-augment ta_wide --scheduler cosine --warmup-epochs 5 --warmup-method linear
  vggctl train --scheduler cosine-restarts --restart-epochs 10 --restart-mult 2 -e 70     SGDR: cycles of 10, 20, 40
  vggctl train --arch vgg11_bn --scheduler cosine --swa-start 76 --swa-lr 0.005 -e 100     SWA: average epochs 76-100
  torchrun --no-python --nproc-per-node 8 vggctl train -o runs/big --resume auto
  vggctl train --nproc-per-node 4 -o runs/dp --resume auto --max-restarts 3    restarted after a failure";

pub const EVAL: &str = "\
Examples:
  vggctl eval --checkpoint runs/v11/best.safetensors        the run's own data and split
  vggctl eval --checkpoint model.safetensors --dataset folder --val-dir test --json   every image of test/
  vggctl eval --checkpoint runs/v11/best.safetensors --predictions - | grep ',0$'   the images it got wrong
  vggctl eval --weights imagenet --arch vgg16 --data-dir ~/imagenet    torchvision's VGG16 on ImageNet's val/
  vggctl eval --weights imagenet --arch vgg16 --dataset imagenette-320px    on Imagenette's ten classes
  vggctl eval --checkpoint vgg16-397923af.pth --dataset imagenet --val-dir imagenet-r --only-data-classes";

pub const FINETUNE: &str = "\
Examples:
  vggctl finetune --dataset folder --data-dir photos --arch vgg16
  vggctl finetune --dataset oxford-pets --arch vgg16 -e 10     37 breeds, downloaded on first use
  vggctl finetune --dataset dtd --fold 3 --val-on val --arch vgg16    DTD's partition 3, chosen on its val split
  vggctl finetune --dataset eurosat --val-split 0.2 --arch vgg16 -e 5    EuroSAT, validated on a held-out 20 %
  vggctl finetune --weights mine.pth --dataset folder --data-dir photos --train-features -e 20";

pub const EXPORT: &str = "\
Examples:
  vggctl export --checkpoint runs/v11/best.safetensors --out v11.onnx
  vggctl export --weights imagenet --arch vgg16_bn --out vgg16_bn.pt2
  vggctl export --weights vgg11.pth --out vgg11.safetensors          (the model is inferred)
  vggctl export --weights imagenet --arch vgg16 --layer classifier.4 --out fc7.onnx    an embedding model";

pub const PREDICT: &str = "\
Examples:
  vggctl predict --weights imagenet --arch vgg16 cat.jpg dog.jpg
  vggctl predict --checkpoint runs/v11/best.safetensors --topk 3 photos/";

pub const FEATURES: &str = "\
Examples:
  vggctl features --weights imagenet --arch vgg16 photos/ -o fc7.npy > rows.txt     4096 values an image
  vggctl features --checkpoint runs/v11 --layer features.20 --pool avg photos/ -o conv.npy
  vggctl features --weights imagenet --arch vgg16 --layer classifier.1,classifier.4 photos/ -o fc.safetensors
  vggctl features --checkpoint runs/v11 --dataset cifar10 --split train -o train.safetensors   rows and labels";

pub const PREPARE: &str = "\
Examples:
  vggctl prepare --dataset imagenet --data-dir /data/imagenet --out imagenet.vggdata
  vggctl train --dataset imagenet --data-dir imagenet.vggdata      (the same flags as the folder)";

pub const PARAMS: &str = "\
Examples:
  vggctl params --arch vgg16_bn
  vggctl params --arch vgg11 --head cifar --input 32 --json";

#[derive(clap::Args, Debug)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    shell: Shell,
}

pub const COMPLETIONS: &str = "\
Examples:
  vggctl completions bash > ~/.local/share/bash-completion/completions/vggctl
  vggctl completions zsh > ~/.zfunc/_vggctl
  vggctl completions fish > ~/.config/fish/completions/vggctl.fish";

/// Writes the completion script for `args.shell` to stdout.
pub fn completions(args: CompletionsArgs, mut command: clap::Command) -> Result<()> {
    let mut out = Vec::new();
    clap_complete::generate(args.shell, &mut command, "vggctl", &mut out);
    super::output::print_out(&String::from_utf8_lossy(&out))
}

#[derive(clap::Args, Debug)]
pub struct ManArgs {
    /// Write vggctl.1 and one page per command (vggctl-train.1, ...) into
    /// this folder, instead of vggctl.1 to stdout.
    #[arg(long)]
    dir: Option<PathBuf>,
}

pub const MAN: &str = "\
Examples:
  vggctl man | man -l -
  vggctl man --dir ~/.local/share/man/man1";

/// The man pages, from the same definitions as `--help`.
pub fn man(args: ManArgs, command: clap::Command) -> Result<()> {
    let Some(dir) = args.dir else {
        return super::output::print_out(&String::from_utf8_lossy(&page(command)?));
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("{}", dir.display()))?;
    // Each page is written whole or not at all; subcommands' pages are
    // named as man(1) looks them up.
    let mut pages = vec![(String::from("vggctl"), command.clone())];
    for sub in command.get_subcommands().filter(|c| c.get_name() != "help") {
        let name = format!("vggctl-{}", sub.get_name());
        pages.push((name.clone(), sub.clone().name(name)));
    }
    for (name, page_command) in pages {
        let path = dir.join(format!("{name}.1"));
        vggctl::fsutil::write_atomic_bytes(&path, &page(page_command)?)?;
    }
    Ok(())
}

/// One man page: clap_mangen's sections, then the text `--help` shows after
/// the options (examples, environment, exit status) as sections of their
/// own, each line kept as written.
fn page(command: clap::Command) -> Result<Vec<u8>> {
    let extra = command.get_after_help().map(|t| t.to_string());
    let man = clap_mangen::Man::new(command.clone());
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;
    man.render_description_section(&mut out)?;
    man.render_options_section(&mut out)?;
    if command.has_subcommands() {
        man.render_subcommands_section(&mut out)?;
    }
    for line in extra.as_deref().unwrap_or("").lines() {
        let roff = match line.strip_suffix(':') {
            Some(heading) if !line.starts_with(' ') => {
                format!(".SH {}\n.nf", heading.to_uppercase())
            }
            _ if line.is_empty() => ".fi".to_string(),
            _ => format!("\\&{}", line.replace('\\', "\\e").replace('-', "\\-")),
        };
        writeln!(out, "{roff}")?;
    }
    writeln!(out, ".fi")?;
    Ok(out)
}
