"""PyTorch's own data-parallel training of the run test_dist.py gives vggctl,
launched by torchrun like vggctl: DistributedDataParallel over Gloo, each
epoch's order split by torch.utils.data.DistributedSampler, SGD with
momentum and weight decay (or --optimizer adam|adamw: torch.optim.Adam or
AdamW with --betas B1,B2, --eps and --amsgrad; rmsprop: torch.optim.RMSprop
with --alpha, --eps, --momentum and --centered; nadam: torch.optim.NAdam with
--betas, --eps and --momentum-decay; radam: torch.optim.RAdam with --betas
and --eps; both with --decoupled-weight-decay; adamax: torch.optim.Adamax
with --betas and --eps; adagrad: torch.optim.Adagrad with --lr-decay,
--initial-accumulator-value and --eps; adadelta: torch.optim.Adadelta with
--rho and --eps), and the same per-rank random draws (dropout)
because every step seeds the generator as vggctl does. Rank 0 writes the
final state dict.

    torchrun --nproc-per-node 2 tests/ddp_reference.py --data DIR --init FILE --out FILE ...

--dropout P builds the model with that dropout probability
(torchvision's `vgg11(dropout=P)`), --bn-momentum M sets every
BatchNorm2d's momentum.

With --ra-reps K each epoch's order is split by timm's RepeatAugSampler
(num_repeats=K; repeated augmentation, torchvision train.py's
--ra-sampler) instead.

With --as-one-process N it is instead one process that trains on what N
ranks would see together: each step's batch is the concatenation of the N
ranks' batches (what SyncBatchNorm over N ranks computes, for a model
without dropout); with N = 1, vggctl's one-process run. --clip-grad-norm
clips with torch.nn.utils.clip_grad_norm_ before each step,
--clip-grad-value with torch.nn.utils.clip_grad_value_.

The options of torchvision's reference recipe, as its train.py applies
them: --auto-augment POLICY (transforms.AutoAugment on each uint8 image,
before normalization; `ra`: transforms.RandAugment(magnitude=--ra-magnitude),
`ta_wide`: transforms.TrivialAugmentWide(), `augmix`: transforms.AugMix(severity=--augmix-severity)), --random-erase P (transforms.RandomErasing(P) on
each normalized image), then
--mixup-alpha/--cutmix-alpha (v2.RandomChoice of v2.MixUp and v2.CutMix on
the batch), --accum-steps K (the gradients of K batches, each loss / K, per
optimizer step) and --model-ema-steps N (torchvision's
ExponentialMovingAverage updated after every N-th optimizer step of an
epoch, its decay adjusted as train.py does, reset during --warmup-epochs;
written to --ema-out); --norm-weight-decay and --bias-weight-decay group
the parameters as train.py's utils.set_weight_decay does (below);
--scheduler onecycle steps torch.optim.lr_scheduler.OneCycleLR (max_lr
--lr, its --pct-start, --div-factor, --final-div-factor, --anneal-strategy,
--three-phase, --cycle-momentum BASE,MAX or `off`) after every optimizer
step, over a rank's updates per epoch; --scheduler cyclic steps CyclicLR
(base_lr --lr-min, max_lr --lr, --cycle-steps UP,DOWN, --cyclic-mode,
--gamma, --cycle-momentum) likewise.

--epoch-scheduler cosine steps CosineAnnealingLR(T_max=--epochs) after
every epoch. --swa-start E is PyTorch's documented SWA loop
(torch.optim.swa_utils): from the end of epoch E (1-based) on, the weights
join an AveragedModel and SWALR(swa_lr=--swa-lr, --swa-anneal-epochs,
--swa-anneal-strategy) is stepped in place of the epoch scheduler; after
the last epoch update_bn runs over the training images in order, in
batches of --batch-size, and the average is written to --swa-out.

--cifar100 reads --data (the directory holding cifar-100-python/) through
torchvision.datasets.CIFAR100 itself (its fine labels and class names; its
integrity check against the files' own MD5s, since the fixtures are made
here), for a model of 100 classes, normalized with CIFAR-100's mean and
deviation.

--mnist mnist|fashion-mnist|kmnist|qmnist|emnist-SPLIT reads --data (the directory holding
MNIST/raw/, FashionMNIST/raw/, KMNIST/raw/, QMNIST/raw/ or EMNIST/raw/) through
torchvision.datasets.MNIST, FashionMNIST, KMNIST, QMNIST (its labels' first column) or EMNIST(split=SPLIT)
itself: each 28x28 image (EMNIST's
transposed, turned upright) resized to 32x32 by torchvision's
`F.resize(antialias=True)` on the uint8 tensor, repeated in three channels,
normalized with the dataset's usual mean and deviation (KMNIST's and
EMNIST's, which have none, from their training images), for a model of
the dataset's classes (EMNIST letters: 27).

--usps reads --data (the directory holding usps.bz2) through
torchvision.datasets.USPS itself: each 16x16 image resized to 32x32 and
made three channels as MNIST's are, normalized with the training images'
own mean and deviation (USPS has no usual one).

--fer2013 reads --data (the directory holding fer2013/) through
torchvision.datasets.FER2013 itself (its integrity check fed the file's own
MD5): each 48x48 face read at 48x48 in three channels, normalized with the
training faces' own mean and deviation, for a model of 7 emotions.

--svhn reads --data (the directory holding train_32x32.mat) through
torchvision.datasets.SVHN itself (its integrity check fed the files' own
MD5s), normalized with SVHN's usual mean and deviation.

--stl10 reads --data (the directory holding stl10_binary/) through
torchvision.datasets.STL10 itself (its integrity check fed the files' own
MD5s), 96x96, normalized with the training images' own mean and deviation
per channel (over every pixel of the whole split, the population's);
--stl10-fold K trains on torchvision's `STL10(folds=K)`.

--crop-flip P is the CIFAR recipe's augmentation of each training image,
RandomCrop(side, padding=4) then RandomHorizontalFlip(P), made by
torchvision's F.pad, F.crop and F.hflip with vggctl's draws (drawn from the
step's seed before anything else: row offsets, column offsets, then one
uniform per image, below P mirrors).
"""
import argparse
import hashlib
import importlib.util
import math
import os

import numpy as np
import torch
import torch.distributed as dist
import torchvision
import torchvision.transforms as transforms
import torchvision.transforms.v2 as v2
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

import vgg_reference

MASK = (1 << 64) - 1
PERMUTATION_STEP = MASK  # usize::MAX: the position whose seed draws an epoch's order


def position_seed(seed, epoch, step):
    """vggctl's seed for (seed, epoch, step) (train::position_seed, splitmix64)."""
    z = seed ^ ((epoch * 0x9E3779B97F4A7C15) & MASK) ^ ((step * 0xD1B54A32D192ED03) & MASK)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return (z ^ (z >> 31)) >> 1


def rank_seed(seed, rank):
    """vggctl's seed for a rank's own draws (dist::World::seed_for)."""
    return seed ^ ((rank * 0xA24BAED4963EE407) & MASK)


class ExponentialMovingAverage(torch.optim.swa_utils.AveragedModel):
    """torchvision's references/classification/utils.py, verbatim in effect."""

    def __init__(self, model, decay, device="cpu"):
        def ema_avg(avg_model_param, model_param, num_averaged):
            return decay * avg_model_param + (1 - decay) * model_param

        super().__init__(model, device, ema_avg, use_buffers=True)


def repeat_aug_sampler():
    """timm's RepeatAugSampler, from its own file: importing the timm
    package would load all of its models (seconds per rank)."""
    timm = importlib.util.find_spec("timm")
    path = os.path.join(os.path.dirname(timm.origin), "data", "distributed_sampler.py")
    spec = importlib.util.spec_from_file_location("timm_distributed_sampler", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.RepeatAugSampler


def read_cifar_bin(path):
    raw = open(path, "rb").read()
    t = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(-1, 3073)
    return t[:, 1:].reshape(-1, 3, 32, 32).clone(), t[:, 0].long().clone()


def train_split(data_dir, limit):
    parts = [read_cifar_bin(os.path.join(data_dir, f"data_batch_{i}.bin")) for i in range(1, 6)]
    images = torch.cat([p[0] for p in parts])[:limit]
    labels = torch.cat([p[1] for p in parts])[:limit]
    return images, labels


CIFAR10_NORM = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_NORM = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
SVHN_NORM = ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970))


def svhn(root, split="train"):
    """torchvision's SVHN over `root`, its MD5s the files' own."""
    def md5(name):
        with open(os.path.join(root, name), "rb") as f:
            return hashlib.md5(f.read()).hexdigest()

    class Local(torchvision.datasets.SVHN):
        split_list = {k: [u, f, md5(f)] for k, (u, f, _) in torchvision.datasets.SVHN.split_list.items()
                      if os.path.exists(os.path.join(root, f))}

    return Local(root, split=split, download=False)


MNIST_NORM = {"mnist": ((0.1307,) * 3, (0.3081,) * 3), "fashion-mnist": ((0.2860,) * 3, (0.3530,) * 3),
              "qmnist": ((0.1307,) * 3, (0.3081,) * 3)}


EMNIST_SPLITS = [f"emnist-{s}" for s in torchvision.datasets.EMNIST.splits]


def mnist(root, name, train=True):
    """torchvision's MNIST, FashionMNIST, KMNIST, QMNIST or EMNIST
    (`emnist-SPLIT`) over `root`."""
    if name in EMNIST_SPLITS:
        return torchvision.datasets.EMNIST(root, name.removeprefix("emnist-"), train=train, download=False)
    cls = {"mnist": torchvision.datasets.MNIST, "fashion-mnist": torchvision.datasets.FashionMNIST,
           "kmnist": torchvision.datasets.KMNIST, "qmnist": torchvision.datasets.QMNIST}[name]
    return cls(root, train=train, download=False)


def mnist_targets(ds):
    """Each image's class: QMNIST's first column (its `compat=True`)."""
    return ds.targets[:, 0] if ds.targets.ndim == 2 else ds.targets


def mnist_norm(ds, name):
    """The dataset's usual normalization; KMNIST's, which has none, from
    its training images as stored (28x28, value / 255, the population's),
    by numpy in float64 (torch's float64 reduction moves by 1e-12 with its
    thread count; numpy's pairwise sums do not)."""
    if name in MNIST_NORM:
        return MNIST_NORM[name]
    x = ds.data.numpy().astype(np.float64) / 255
    return (float(x.mean()),) * 3, (float(x.std()),) * 3


def mnist_images(ds):
    """The dataset's images as the model reads them: 32x32, three channels,
    uint8; EMNIST's, which it stores transposed, turned upright first."""
    x = ds.data.transpose(1, 2) if isinstance(ds, torchvision.datasets.EMNIST) else ds.data
    return gray32(x)


def gray32(x):
    """`N x H x W` uint8 gray images as the model reads them: resized to
    32x32 by torchvision's antialiased `F.resize`, in three channels."""
    x = torchvision.transforms.functional.resize(x[:, None], [32, 32], antialias=True)
    return x.repeat(1, 3, 1, 1).contiguous()


def usps(root, train=True):
    """torchvision's USPS over `root`, its images as the model reads them
    (`N x 3 x 32 x 32` uint8), its targets, and its normalization: the
    training images' own mean and deviation as stored (16x16, value / 255,
    the population's), by numpy in float64."""
    ds = torchvision.datasets.USPS(root, train=train, download=False)
    stored = torchvision.datasets.USPS(root, train=True, download=False).data.astype(np.float64) / 255
    norm = (float(stored.mean()),) * 3, (float(stored.std()),) * 3
    return gray32(torch.from_numpy(ds.data)), torch.tensor(ds.targets), norm


def fer2013(root, train=True):
    """torchvision's FER2013 over `root` (its integrity check fed the
    files' own MD5s), its faces as the model reads them (`N x 3 x 48 x 48`
    uint8, the gray in each channel), its targets, and its normalization:
    the training faces' own mean and deviation (value / 255, the
    population's), by numpy in float64."""
    def md5(name):
        path = os.path.join(root, "fer2013", name)
        if not os.path.exists(path):
            return None
        with open(path, "rb") as f:
            return hashlib.md5(f.read()).hexdigest()

    class Local(torchvision.datasets.FER2013):
        _RESOURCES = {k: (f, md5(f)) for k, (f, _) in torchvision.datasets.FER2013._RESOURCES.items()}

    def faces(split):
        pairs = list(Local(root, split=split))
        gray = torch.from_numpy(np.stack([np.asarray(img) for img, _ in pairs]))
        return gray, torch.tensor([t for _, t in pairs])

    stored, _ = faces("train")
    gray, targets = faces("train" if train else "test")
    x = stored.numpy().astype(np.float64) / 255
    norm = (float(x.mean()),) * 3, (float(x.std()),) * 3
    return gray[:, None].repeat(1, 3, 1, 1).contiguous(), targets, norm


def stl10(root, split="train", folds=None):
    """torchvision's STL10 over `root` (`folds`: one training fold), its MD5s the files' own."""
    def md5(name):
        with open(os.path.join(root, "stl10_binary", name), "rb") as f:
            return hashlib.md5(f.read()).hexdigest()

    class Local(torchvision.datasets.STL10):
        train_list = [[f, md5(f)] for f, _ in torchvision.datasets.STL10.train_list]
        test_list = [[f, md5(f)] for f, _ in torchvision.datasets.STL10.test_list]

    return Local(root, split=split, folds=folds, download=False)


def stl10_norm(ds):
    """The training images' mean and deviation per channel (of value / 255)."""
    x = torch.from_numpy(ds.data).double() / 255
    return tuple(x.mean((0, 2, 3)).tolist()), tuple(x.std((0, 2, 3), correction=0).tolist())


def crop_flip(images, p):
    """RandomCrop(side, padding=4) + RandomHorizontalFlip(p) with vggctl's draws."""
    n, side = len(images), images.shape[-1]
    oy, ox, flip = torch.randint(9, (n,)), torch.randint(9, (n,)), torch.rand(n) < p
    F = torchvision.transforms.functional
    out = [F.crop(F.pad(img, 4, fill=0), int(a), int(b), side, side) for img, a, b in zip(images, oy, ox)]
    return torch.stack([F.hflip(o) if f else o for o, f in zip(out, flip)])


def cifar100(root, train=True):
    """torchvision's CIFAR100 over the Python layout in `root`, its MD5s the files' own."""
    def md5(name):
        with open(os.path.join(root, "cifar-100-python", name), "rb") as f:
            return hashlib.md5(f.read()).hexdigest()

    class Local(torchvision.datasets.CIFAR100):
        train_list = [["train", md5("train")]]
        test_list = [["test", md5("test")]]
        meta = {"filename": "meta", "key": "fine_label_names", "md5": md5("meta")}

    return Local(root, train=train, download=False)


def cifar100_train_split(root, limit):
    ds = cifar100(root)
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()[:limit]
    return images, torch.tensor(ds.targets)[:limit]


def normalize(images, mean, std):
    """vggctl's Normalizer: x * (1 / (255 std)) + (-mean / std), in fp32."""
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float64).float()
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=torch.float64).float()
    return images.float() * scale.view(1, 3, 1, 1) + shift.view(1, 3, 1, 1)


def set_weight_decay(model, weight_decay, norm_weight_decay=None, custom_keys_weight_decay=None):
    """The parameter groups of torchvision's references/classification/utils.py
    (which pip's torchvision does not ship), as its train.py calls it: a
    parameter named by a custom key ("bias") takes that key's decay, a norm
    layer's the norm decay where given, any other `weight_decay`."""
    norm_classes = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm, torch.nn.GroupNorm,
                    torch.nn.modules.instancenorm._InstanceNorm, torch.nn.LocalResponseNorm)
    params = {"other": [], "norm": []}
    decays = {"other": weight_decay, "norm": norm_weight_decay}
    keys = []
    for key, decay in custom_keys_weight_decay or []:
        params[key], decays[key] = [], decay
        keys.append(key)

    def add(module, prefix=""):
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            for key in keys:
                target = f"{prefix}.{name}" if prefix != "" and "." in key else name
                if key == target:
                    params[key].append(p)
                    break
            else:
                if norm_weight_decay is not None and isinstance(module, norm_classes):
                    params["norm"].append(p)
                else:
                    params["other"].append(p)
        for child_name, child in module.named_children():
            add(child, f"{prefix}.{child_name}" if prefix != "" else child_name)

    add(model)
    return [{"params": params[k], "weight_decay": decays[k]} for k in params if params[k]]


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--init", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--arch", default="vgg11")
    p.add_argument("--bn", action="store_true")
    p.add_argument("--bn-momentum", type=float, default=0.1)
    p.add_argument("--limit-train", type=int, required=True)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--head", default="cifar")
    p.add_argument("--as-one-process", type=int, default=0, metavar="N")
    p.add_argument("--clip-grad-norm", type=float, default=None)
    p.add_argument("--clip-grad-value", type=float, default=None)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--auto-augment", default=None)
    p.add_argument("--ra-magnitude", type=int, default=9)
    p.add_argument("--interpolation", default=None)
    p.add_argument("--augmix-severity", type=int, default=3)
    p.add_argument("--random-erase", type=float, default=0.0)
    p.add_argument("--mixup-alpha", type=float, default=0.0)
    p.add_argument("--cutmix-alpha", type=float, default=0.0)
    p.add_argument("--accum-steps", type=int, default=1)
    p.add_argument("--model-ema-steps", type=int, default=0)
    p.add_argument("--model-ema-decay", type=float, default=0.99998)
    p.add_argument("--warmup-epochs", type=int, default=0)
    p.add_argument("--ema-out")
    p.add_argument("--norm-weight-decay", type=float, default=None)
    p.add_argument("--bias-weight-decay", type=float, default=None)
    p.add_argument("--ra-reps", type=int, default=0)
    p.add_argument("--dropout", type=float, default=0.5)
    p.add_argument("--optimizer", choices=["sgd", "adam", "adamw", "rmsprop", "nadam", "radam", "adamax", "adagrad", "adadelta"], default="sgd")
    p.add_argument("--momentum-decay", type=float, default=4e-3)
    p.add_argument("--decoupled-weight-decay", action="store_true")
    p.add_argument("--alpha", type=float, default=0.99)
    p.add_argument("--betas", default="0.9,0.999")
    p.add_argument("--eps", type=float, default=1e-8)
    p.add_argument("--lr-decay", type=float, default=0.0)
    p.add_argument("--rho", type=float, default=0.9)
    p.add_argument("--initial-accumulator-value", type=float, default=0.0)
    p.add_argument("--amsgrad", action="store_true")
    p.add_argument("--centered", action="store_true")
    p.add_argument("--scheduler", choices=["none", "onecycle", "cyclic"], default="none")
    p.add_argument("--lr-min", type=float, default=0.0)
    p.add_argument("--cycle-steps", default="2000,2000")
    p.add_argument("--cyclic-mode", default="triangular")
    p.add_argument("--gamma", type=float, default=1.0)
    p.add_argument("--pct-start", type=float, default=0.3)
    p.add_argument("--div-factor", type=float, default=25.0)
    p.add_argument("--final-div-factor", type=float, default=1e4)
    p.add_argument("--anneal-strategy", default="cos")
    p.add_argument("--three-phase", action="store_true")
    p.add_argument("--cycle-momentum", default=None, help="BASE,MAX or off [0.85,0.95; cyclic 0.8,0.9]")
    p.add_argument("--epoch-scheduler", choices=["none", "cosine"], default="none")
    p.add_argument("--swa-start", type=int, default=0)
    p.add_argument("--swa-lr", type=float, default=None)
    p.add_argument("--swa-anneal-epochs", type=int, default=10)
    p.add_argument("--swa-anneal-strategy", default="cos")
    p.add_argument("--swa-out")
    p.add_argument("--cifar100", action="store_true")
    p.add_argument("--mnist", choices=["mnist", "fashion-mnist", "kmnist", "qmnist", *EMNIST_SPLITS])
    p.add_argument("--svhn", action="store_true")
    p.add_argument("--usps", action="store_true")
    p.add_argument("--fer2013", action="store_true")
    p.add_argument("--stl10", action="store_true")
    p.add_argument("--stl10-fold", type=int, default=None)
    p.add_argument("--crop-flip", type=float, default=None, metavar="P")
    a = p.parse_args(argv)

    one = a.as_one_process > 0
    if one:
        ranks, world = list(range(a.as_one_process)), a.as_one_process
    else:
        dist.init_process_group("gloo")
        ranks, world = [dist.get_rank()], dist.get_world_size()
    classes = 100 if a.cifar100 else len(mnist(a.data, a.mnist).classes) if a.mnist else 7 if a.fer2013 else 10
    model = vgg_reference.build(a.arch, a.bn, a.head, classes, dropout=a.dropout)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = a.bn_momentum
    model.load_state_dict(load_file(a.init))
    ddp = model if one else DistributedDataParallel(model)
    custom = [("bias", a.bias_weight_decay)] if a.bias_weight_decay is not None else None
    groups = set_weight_decay(model, a.weight_decay, a.norm_weight_decay, custom)
    if a.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=a.lr, momentum=a.momentum, weight_decay=a.weight_decay)
    elif a.optimizer == "rmsprop":
        opt = torch.optim.RMSprop(groups, lr=a.lr, alpha=a.alpha, eps=a.eps, momentum=a.momentum,
                                  weight_decay=a.weight_decay, centered=a.centered)
    elif a.optimizer == "nadam":
        opt = torch.optim.NAdam(groups, lr=a.lr, betas=tuple(float(b) for b in a.betas.split(",")), eps=a.eps,
                                weight_decay=a.weight_decay, momentum_decay=a.momentum_decay,
                                decoupled_weight_decay=a.decoupled_weight_decay)
    elif a.optimizer == "radam":
        opt = torch.optim.RAdam(groups, lr=a.lr, betas=tuple(float(b) for b in a.betas.split(",")), eps=a.eps,
                                weight_decay=a.weight_decay, decoupled_weight_decay=a.decoupled_weight_decay)
    elif a.optimizer == "adagrad":
        opt = torch.optim.Adagrad(groups, lr=a.lr, lr_decay=a.lr_decay, weight_decay=a.weight_decay, eps=a.eps,
                                  initial_accumulator_value=a.initial_accumulator_value)
    elif a.optimizer == "adadelta":
        opt = torch.optim.Adadelta(groups, lr=a.lr, rho=a.rho, eps=a.eps, weight_decay=a.weight_decay)
    elif a.optimizer == "adamax":
        opt = torch.optim.Adamax(groups, lr=a.lr, betas=tuple(float(b) for b in a.betas.split(",")), eps=a.eps,
                                 weight_decay=a.weight_decay)
    else:
        adam = torch.optim.Adam if a.optimizer == "adam" else torch.optim.AdamW
        betas = tuple(float(b) for b in a.betas.split(","))
        opt = adam(groups, lr=a.lr, betas=betas, eps=a.eps, weight_decay=a.weight_decay, amsgrad=a.amsgrad)
    if a.cifar100:
        images, labels = cifar100_train_split(a.data, a.limit_train)
        norm = CIFAR100_NORM
    elif a.svhn:
        ds = svhn(a.data)
        images, labels = torch.from_numpy(ds.data)[:a.limit_train], torch.from_numpy(ds.labels)[:a.limit_train]
        norm = SVHN_NORM
    elif a.usps:
        images, labels, norm = usps(a.data)
        images, labels = images[:a.limit_train], labels[:a.limit_train]
    elif a.fer2013:
        images, labels, norm = fer2013(a.data)
        images, labels = images[:a.limit_train], labels[:a.limit_train]
    elif a.stl10:
        # Normalized by the whole training split's statistics, fold or not.
        norm = stl10_norm(stl10(a.data))
        ds = stl10(a.data, folds=a.stl10_fold)
        images, labels = torch.from_numpy(ds.data)[:a.limit_train], torch.from_numpy(ds.labels).long()[:a.limit_train]
    elif a.mnist:
        ds = mnist(a.data, a.mnist)
        images, labels = mnist_images(ds)[:a.limit_train], mnist_targets(ds)[:a.limit_train]
        norm = mnist_norm(ds, a.mnist)
    else:
        images, labels = train_split(a.data, a.limit_train)
        norm = CIFAR10_NORM
    x_all = normalize(images, *norm)
    n = len(labels)
    erase = transforms.RandomErasing(p=a.random_erase) if a.random_erase > 0 else None
    auto = None
    # Each transform's own default interpolation unless one is given.
    interp = {} if a.interpolation is None else {"interpolation": transforms.InterpolationMode(a.interpolation)}
    if a.auto_augment == "ra":
        auto = transforms.RandAugment(magnitude=a.ra_magnitude, **interp)
    elif a.auto_augment == "ta_wide":
        auto = transforms.TrivialAugmentWide(**interp)
    elif a.auto_augment == "augmix":
        auto = transforms.AugMix(severity=a.augmix_severity, **interp)
    elif a.auto_augment:
        auto = transforms.AutoAugment(transforms.AutoAugmentPolicy(a.auto_augment), **interp)
    mixes = [v2.MixUp(alpha=a.mixup_alpha, num_classes=classes)] if a.mixup_alpha > 0 else []
    mixes += [v2.CutMix(alpha=a.cutmix_alpha, num_classes=classes)] if a.cutmix_alpha > 0 else []
    mix = v2.RandomChoice(mixes) if mixes else None
    ema = None
    if a.model_ema_steps:
        # train.py: adjust = world_size * batch_size * model_ema_steps / epochs
        # (the batch here is what one optimizer step sees per rank).
        adjust = world * a.batch_size * a.accum_steps * a.model_ema_steps / a.epochs
        alpha = min(1.0, (1.0 - a.model_ema_decay) * adjust)
        ema = ExponentialMovingAverage(model, decay=1.0 - alpha)
    if a.ra_reps:
        ra = repeat_aug_sampler()

        def sampler(data, size, rank):
            return ra(data, num_replicas=size, rank=rank, shuffle=False, num_repeats=a.ra_reps)
    else:
        def sampler(data, size, rank):
            return DistributedSampler(data, num_replicas=size, rank=rank, shuffle=False)
    k = a.accum_steps
    sched = None
    if a.scheduler == "onecycle":
        # OneCycleLR stepped after every optimizer step, over the updates
        # one rank takes per epoch.
        steps = math.ceil(len(list(sampler(range(n), world, ranks[0]))) / a.batch_size)
        cycle = a.cycle_momentum != "off"
        base, top = (float(v) for v in (a.cycle_momentum if cycle and a.cycle_momentum else "0.85,0.95").split(","))
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=a.lr, epochs=a.epochs, steps_per_epoch=math.ceil(steps / k), pct_start=a.pct_start,
            anneal_strategy=a.anneal_strategy, cycle_momentum=cycle, base_momentum=base, max_momentum=top,
            div_factor=a.div_factor, final_div_factor=a.final_div_factor, three_phase=a.three_phase)
    if a.scheduler == "cyclic":
        cycle = a.cycle_momentum != "off"
        base, top = (float(v) for v in (a.cycle_momentum if cycle and a.cycle_momentum else "0.8,0.9").split(","))
        up, down = (int(v) for v in a.cycle_steps.split(","))
        sched = torch.optim.lr_scheduler.CyclicLR(
            opt, base_lr=a.lr_min, max_lr=a.lr, step_size_up=up, step_size_down=down, mode=a.cyclic_mode,
            gamma=a.gamma, cycle_momentum=cycle, base_momentum=base, max_momentum=top)
    epoch_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=a.epochs) \
        if a.epoch_scheduler == "cosine" else None
    swa_model = swa_sched = None
    if a.swa_start:
        swa_model = torch.optim.swa_utils.AveragedModel(model)
        swa_sched = torch.optim.swa_utils.SWALR(opt, swa_lr=a.swa_lr, anneal_epochs=a.swa_anneal_epochs,
                                                anneal_strategy=a.swa_anneal_strategy)
    for epoch in range(a.epochs):
        torch.manual_seed(position_seed(a.seed, epoch, PERMUTATION_STEP))
        perm = torch.randperm(n)
        shards = [perm[list(sampler(range(n), world, r))] for r in ranks]
        model.train()
        starts = list(range(0, len(shards[0]), a.batch_size))
        opt.zero_grad()
        for step, start in enumerate(starts):
            idx = torch.cat([mine[start : start + a.batch_size] for mine in shards])
            torch.manual_seed(position_seed(rank_seed(a.seed, ranks[0]), epoch, step))
            x, y = x_all[idx], labels[idx]
            if a.crop_flip is not None:
                x = normalize(crop_flip(images[idx], a.crop_flip), *norm)
            if auto is not None:
                augmented = torch.stack([auto(img) for img in images[idx]])
                x = normalize(augmented, *norm)
            if erase is not None:
                x = torch.stack([erase(img) for img in x])
            if mix is not None:
                x, y = mix(x, y)
            loss = torch.nn.functional.cross_entropy(ddp(x), y, label_smoothing=a.label_smoothing)
            (loss / k if k > 1 else loss).backward()
            if (step + 1) % k and step + 1 < len(starts):
                continue
            if a.clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), a.clip_grad_norm)
            if a.clip_grad_value is not None:
                torch.nn.utils.clip_grad_value_(model.parameters(), a.clip_grad_value)
            opt.step()
            opt.zero_grad()
            if sched is not None:
                sched.step()
            if ema is not None and (step // k) % a.model_ema_steps == 0:
                ema.update_parameters(model)
                if epoch < a.warmup_epochs:
                    ema.n_averaged.fill_(0)
        if swa_model is not None and epoch >= a.swa_start - 1:
            swa_model.update_parameters(model)
            swa_sched.step()
        elif epoch_sched is not None:
            epoch_sched.step()
    if swa_model is not None and ranks[0] == 0:
        loader = [x_all[i:i + a.batch_size] for i in range(0, n, a.batch_size)]
        torch.optim.swa_utils.update_bn(loader, swa_model)
        save_file({k: v.contiguous() for k, v in swa_model.module.state_dict().items()}, a.swa_out)
    if ema is not None and ranks[0] == 0:
        save_file({k: v.contiguous() for k, v in ema.module.state_dict().items()}, a.ema_out)
    if ranks[0] == 0:
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, a.out)
    if not one:
        dist.destroy_process_group()


def in_process(*argv):
    """Runs an `--as-one-process` reference in the test's own process, as a
    subprocess under OMP_NUM_THREADS=1 would run it (one intra-op thread),
    leaving the caller's thread count and random state as they were: the
    tests call this dozens of times, and each new Python process would
    spend about 2.5 s importing torch and torchvision."""
    assert "--as-one-process" in argv, "distributed references run under torchrun"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            main([str(a) for a in argv])
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
