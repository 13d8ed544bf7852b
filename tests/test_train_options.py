"""Training options PyTorch users reach for, against PyTorch itself on the
same data, initial weights, order and dropout draws (tests/ddp_reference.py
as one process): `--clip-grad-norm` equals `torch.nn.utils.clip_grad_norm_`
and `--clip-grad-value` `torch.nn.utils.clip_grad_value_`
before each SGD step, with the fused flat-buffer update and with the
per-parameter one, within 1e-5 relative after 2 epochs; the clipping binds
(the unclipped reference ends 5e-3 and 1.8e-2 away): measured 7e-9 and
3e-11 fused, 1.3e-8 per-parameter. A bound that is not positive, or both, is a usage error.

The recipe's other options against torchvision's own code with the same
draws (vggctl draws on the generator state torchvision would see):
`--auto-augment cifar10` is transforms.AutoAugment per uint8 image (`ra`
transforms.RandAugment, `ta_wide` transforms.TrivialAugmentWide, `augmix`
transforms.AugMix),
`--random-erase` is transforms.RandomErasing per image, `--mixup-alpha` /
`--cutmix-alpha` are v2.RandomChoice([v2.MixUp, v2.CutMix]) on the batch
(with label smoothing on the soft labels); `--model-ema` is torchvision's
ExponentialMovingAverage (an AveragedModel over parameters and buffers)
within 1e-6, here with `--accum-steps 2` (PyTorch's summed `.grad`s of
loss / 2) and a warm-up epoch (the average restarts after each update)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ddp_reference  # noqa: E402
import vgg_reference  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("VGGCTL_BIN", os.path.join(ROOT, "target", "release", "vggctl"))
DATA = os.path.join(ROOT, "tests", "fixtures", "digits-bin")
LIMIT, BATCH, EPOCHS = 64, 16, 2
CLIPS = {"norm": 0.25, "value": 2e-3}
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def reference(tmp_path, init, out, *extra, epochs=EPOCHS):
    if "--batch-size" not in extra:
        extra = ("--batch-size", str(BATCH), *extra)
    ddp_reference.in_process(
        "--as-one-process", "1", "--data", os.path.join(DATA, "cifar-10-batches-bin"), "--init", init, "--out", out,
        "--limit-train", LIMIT, "--epochs", epochs, *extra)
    return load_file(out)


def apart(a, b):
    return max(((a[k].double() - b[k].double()).abs() / (1 + b[k].double().abs())).max().item() for k in b)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clip")
    init = str(tmp / "init.safetensors")
    torch.manual_seed(0)
    model = vgg_reference.build("vgg11", False, "cifar", 10)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, init)
    clipped = {mode: reference(tmp, init, str(tmp / f"clipped-{mode}.safetensors"), f"--clip-grad-{mode}", str(v))
               for mode, v in CLIPS.items()}
    free = reference(tmp, init, str(tmp / "free.safetensors"))
    return tmp, init, clipped, free


@pytest.mark.parametrize("mode", CLIPS)
@pytest.mark.parametrize("update", ["fused", "per-parameter"])
def test_clip_grad_norm_and_value_equal_pytorch(runs, update, mode):
    tmp, init, clipped, free = runs
    clipped = clipped[mode]
    out = tmp / f"{update}-{mode}"
    extra = ["--no-fused"] if update == "per-parameter" else []
    r = subprocess.run(
        [BIN, "train", "--dataset", "cifar10", "--data-dir", DATA, "--no-download", "--arch", "vgg11",
         "--head", "cifar", "--initial-checkpoint", init, "--no-augment", "--limit-train", str(LIMIT),
         "--limit-test", "16", "--epochs", str(EPOCHS), "--batch-size", str(BATCH), "--device", "cpu",
         f"--clip-grad-{mode}", str(CLIPS[mode]), "--quiet", "--out", str(out), *extra],
        capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr
    ours = load_file(str(out / "last.safetensors"))
    assert set(ours) == set(clipped)
    assert apart(ours, clipped) < 1e-5
    assert apart(free, clipped) > 1e-3, "the clipping never bound: the comparison proves nothing"


def vggctl_train(out, init, *extra, bn=False, epochs=EPOCHS):
    r = subprocess.run(
        [BIN, "train", "--dataset", "cifar10", "--data-dir", DATA, "--no-download", "--arch", "vgg11",
         "--head", "cifar", "--initial-checkpoint", init, "--no-augment", "--limit-train", str(LIMIT),
         "--limit-test", "16", "--epochs", str(epochs), "--device", "cpu", "--quiet", "--out", str(out),
         *(["--bn"] if bn else []), *extra],
        capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr
    return load_file(str(out / "last.safetensors"))


@pytest.fixture(scope="module")
def grouped(tmp_path_factory):
    """VGG11-BN trained by the reference with torchvision's parameter
    groups (BatchNorm's weights undecayed, every bias at 0.2, the rest at
    0.05), and without them."""
    tmp = tmp_path_factory.mktemp("groups")
    init = str(tmp / "init.safetensors")
    torch.manual_seed(2)
    model = vgg_reference.build("vgg11", True, "cifar", 10)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, init)
    groups = ["--weight-decay", "0.05", "--norm-weight-decay", "0", "--bias-weight-decay", "0.2"]
    want = reference(tmp, init, str(tmp / "groups.safetensors"), "--bn", *groups)
    plain = reference(tmp, init, str(tmp / "plain.safetensors"), "--bn", "--weight-decay", "0.05")
    return tmp, init, groups, want, plain


def test_norm_and_bias_weight_decay_equal_torchvisions_parameter_groups(grouped):
    """--norm-weight-decay and --bias-weight-decay group the parameters as
    torchvision's set_weight_decay does, one fused kernel per group over
    runs of the flat buffer: the weights after 2 epochs equal PyTorch's SGD
    over those groups within 1e-5 (measured: bit for bit; the fused update
    given the base decay for every group is 1.9e-2 away). The per-parameter
    update's groups are checked against the fused ones in
    tests/speed_parts.rs: here its rounding, not PyTorch's, cannot be
    compared at 1e-5, since this BatchNorm run is ill-conditioned (1e-7 more
    on every initial weight moves PyTorch's own result by 2.4e-3)."""
    tmp, init, groups, want, plain = grouped
    ours = vggctl_train(tmp / "grouped", init, "--batch-size", str(BATCH), *groups, bn=True)
    assert set(ours) == set(want)
    assert apart(ours, want) < 1e-5, apart(ours, want)
    assert apart(plain, want) > 1e-3, "the groups changed nothing: the comparison proves nothing"


# Two steps of 32: Adam's normalized steps make longer runs of these digits
# ill-conditioned (a tie in a max-pool decided the other way moves the
# weights it feeds by a step of --lr): at 8 steps and --lr 0.01, 1e-7 of
# noise on the initial weights moves PyTorch's own AdamW result by 1e-2.
ADAM = ["--lr", "0.001", "--betas", "0.8,0.99", "--eps", "1e-6", "--weight-decay", "0.5", "--batch-size", "32"]


@pytest.fixture(scope="module")
def adams(runs):
    """torch.optim.Adam and AdamW over the same run, with betas, eps and a
    weight decay of their own (not the defaults)."""
    tmp, init, _, _ = runs
    return {kind: reference(tmp, init, str(tmp / f"{kind}-ref.safetensors"), "--optimizer", kind, *ADAM, epochs=1)
            for kind in ["adam", "adamw"]}


# Each path once per rule, as below for AMSGrad/centered and NAdam/RAdam:
# tests/speed_parts.rs checks the fused update against the per-parameter
# one on a VGG11-BN for every rule (within 1e-6), so the other pairs added
# 4 runs to the suite's budget and no check.
@pytest.mark.parametrize("kind, update", [("adam", "fused"), ("adamw", "per-parameter")])
def test_adam_and_adamw_equal_torch_optim(runs, adams, kind, update):
    """--optimizer adam is torch.optim.Adam (the weight decay an L2 term
    added to the gradient), adamw torch.optim.AdamW (decoupled), with
    --betas and --eps, Adam fused (libtorch's `_fused_adam_`) and AdamW per
    parameter: the weights after two steps within 1e-5 relative
    (measured: Adam 4e-8, AdamW 2e-6, either way; 1e-7 of noise on the initial weights
    moves PyTorch's own results by 5e-6 and 1.2e-6). The two rules end
    4e-3 apart, so each comparison tells them apart."""
    tmp, init, _, _ = runs
    extra = ["--no-fused"] if update == "per-parameter" else []
    ours = vggctl_train(tmp / f"{kind}-{update}", init, "--optimizer", kind, *ADAM, *extra, epochs=1)
    assert set(ours) == set(adams[kind])
    assert apart(ours, adams[kind]) < 1e-5, apart(ours, adams[kind])
    assert apart(adams["adam"], adams["adamw"]) > 1e-3, "L2 and decoupled decay agree: the test proves nothing"


RMSPROP = ["--optimizer", "rmsprop", "--lr", "0.001", "--alpha", "0.9", "--eps", "1e-6", "--weight-decay", "0.5",
           "--batch-size", "32"]


@pytest.fixture(scope="module")
def rmsprops(runs):
    """torch.optim.RMSprop over the same run, with and without momentum."""
    tmp, init, _, _ = runs
    return {m: reference(tmp, init, str(tmp / f"rmsprop-{m}-ref.safetensors"), *RMSPROP, "--momentum", m, epochs=1)
            for m in ["0.9", "0"]}


@pytest.mark.parametrize("momentum, update", [("0.9", "fused"), ("0.9", "per-parameter"), ("0", "fused")])
def test_rmsprop_equals_torch_optim(runs, rmsprops, momentum, update):
    """--optimizer rmsprop is torch.optim.RMSprop (not centered; the weight
    decay an L2 term) with --alpha, --eps and --momentum; libtorch has no
    fused kernel for it, so the fused update is a few kernels over the flat
    buffers, each weight-decay group's term added to its runs first: the
    weights after two steps within 5e-5 relative (measured 1.7e-7 with
    momentum, 8e-8 without on one CPU, 1.1e-5 without on an AMD EPYC:
    RMSprop divides a gradient by its own root mean square, so a gradient
    that is rounding noise, of a unit the batch leaves nearly dead, still
    moves its weight by about lr; 1e-7 of noise on the initial weights
    moves PyTorch's own by 1e-5 and 2e-6). With and without momentum they
    end 2.8e-3 apart."""
    tmp, init, _, _ = runs
    extra = ["--no-fused"] if update == "per-parameter" else []
    ours = vggctl_train(tmp / f"rmsprop-{momentum}-{update}", init, *RMSPROP, "--momentum", momentum, *extra,
                        epochs=1)
    assert set(ours) == set(rmsprops[momentum])
    assert apart(ours, rmsprops[momentum]) < 5e-5, apart(ours, rmsprops[momentum])
    assert apart(rmsprops["0.9"], rmsprops["0"]) > 1e-3, "the momentum changed nothing: the test proves nothing"


# NAdam over 2 steps of 32 with a momentum decay of its own; RAdam over 8
# steps of 8, of which the last two are rectified (rho_t > 5 from the 7th
# step at beta2 0.95). An eps of 1e-3 keeps their normalized steps of
# gradients that are rounding noise from deciding the result: at 1e-6, 1e-7
# of noise on the initial weights moves PyTorch's own NAdam by 2e-3, at
# 1e-3 by 5.6e-6 (RAdam 1.8e-4 and 6.9e-6).
ADAM_FAMILY = ["--lr", "0.001", "--betas", "0.8,0.95", "--eps", "1e-3", "--weight-decay", "0.5"]
NADAM = ["--optimizer", "nadam", *ADAM_FAMILY, "--momentum-decay", "0.01", "--batch-size", "32"]
RADAM = ["--optimizer", "radam", *ADAM_FAMILY, "--batch-size", "8"]
ADAMAX = ["--optimizer", "adamax", *ADAM_FAMILY, "--batch-size", "32"]


@pytest.fixture(scope="module")
def adam_family(runs):
    """torch.optim.NAdam and RAdam over the same run, with the weight decay
    an L2 term and decoupled (`decoupled_weight_decay=True`), and
    torch.optim.Adamax."""
    tmp, init, _, _ = runs
    rules = [("nadam", NADAM), ("radam", RADAM), ("adamax", ADAMAX)]
    rules += [(f"{kind}w", [*flags, "--decoupled-weight-decay"]) for kind, flags in rules[:2]]
    return {kind: reference(tmp, init, str(tmp / f"{kind}-ref.safetensors"), *flags, epochs=1) for kind, flags in rules}


# Each path once per rule (tests/speed_parts.rs checks the fused update
# against the per-parameter one for every form).
@pytest.mark.parametrize("kind, update", [("nadam", "fused"), ("radam", "per-parameter"), ("nadamw", "per-parameter"),
                                          ("radamw", "fused"), ("adamax", "fused")])
def test_nadam_radam_and_adamax_equal_torch_optim(runs, adam_family, kind, update):
    """--optimizer nadam is torch.optim.NAdam (--momentum-decay its
    momentum_decay), radam torch.optim.RAdam, both with --betas, --eps and
    the weight decay an L2 term, or decoupled with --decoupled-weight-decay
    (`nadamw`, `radamw` here); adamax is torch.optim.Adamax (its second
    moment the infinity norm). libtorch has no fused kernel for any,
    so the fused update is a few kernels over the flat buffers: the weights
    within 1e-5 relative (measured 1.3e-8 NAdam, 7e-9 RAdam and both
    decoupled, fused and per parameter alike, 1.4e-8 Adamax; 1e-7 of noise on the initial weights moves
    PyTorch's own by 5.6e-6 and 6.9e-6, decoupled by 3e-5 and 2.5e-5).
    RAdam's run reaches its rectified steps (rho_t > 5; checked below from
    its step count). NAdam and RAdam end 1.9e-3 apart, Adamax 5.9e-4 from
    NAdam, each decoupled form 3.3e-3 and 9.3e-4 from its L2 form."""
    tmp, init, _, _ = runs
    flags = {"nadam": NADAM, "radam": RADAM, "adamax": ADAMAX}[kind.rstrip("w")]
    decoupled = ["--decoupled-weight-decay"] if kind.endswith("w") else []
    extra = ["--no-fused"] if update == "per-parameter" else []
    ours = vggctl_train(tmp / f"{kind}-{update}", init, *flags, *decoupled, *extra, epochs=1)
    want = adam_family[kind]
    assert set(ours) == set(want)
    assert apart(ours, want) < 1e-5, apart(ours, want)
    beta2, steps = 0.95, LIMIT // 8
    rho_inf = 2 / (1 - beta2) - 1
    assert rho_inf - 2 * steps * beta2**steps / (1 - beta2**steps) > 5, "RAdam's run never rectifies"
    assert apart(adam_family["nadam"], adam_family["radam"]) > 1e-3, "the rules agree: the test proves nothing"
    assert apart(adam_family["adamax"], adam_family["nadam"]) > 1e-4, "the rules agree: the test proves nothing"
    if decoupled:
        assert apart(want, adam_family[kind.rstrip("w")]) > 5e-4, "decoupling changed nothing"


# Adagrad over 4 steps of 16, its LR halving and more (lr_decay 0.5: update
# t's LR is lr / (1 + (t - 1)/2)), its sums starting at 0.1, which bounds
# each normalized step as RMSprop's eps does not.
ADAGRAD = ["--optimizer", "adagrad", "--lr", "0.01", "--lr-decay", "0.5", "--initial-accumulator-value", "0.1",
           "--eps", "1e-6", "--weight-decay", "0.5", "--batch-size", "16"]
# Adadelta at torch's LR of 1, a rho of its own, an eps of 0.1: at 1e-5
# its steps are normalized as Adam's are, and 1e-7 of noise on the initial
# weights moves PyTorch's own result by 2e-4; at 0.1, by 6.6e-6.
ADADELTA = ["--optimizer", "adadelta", "--lr", "1", "--rho", "0.8", "--eps", "0.1", "--weight-decay", "0.5",
            "--batch-size", "16"]


@pytest.mark.parametrize("kind", ["adagrad", "adadelta"])
def test_adagrad_and_adadelta_equal_torch_optim(runs, kind):
    """--optimizer adagrad is torch.optim.Adagrad with --lr-decay,
    --initial-accumulator-value, --eps and the weight decay an L2 term,
    adadelta torch.optim.Adadelta with --rho, --eps and the L2 term;
    libtorch's fused Adagrad kernel is CPU-only and Adadelta has none, so
    the fused update is a few kernels over the flat buffers
    (tests/speed_parts.rs checks it against the per-parameter one): the
    weights after four steps within 1e-5 relative (Adagrad: measured
    1.4e-8, fused and per parameter alike; without the LR decay or the
    starting sums PyTorch's own ends 3.3e-3 and 1.8e-2 away, with 1e-7 of
    noise on the initial weights 1.6e-6. Adadelta: measured 1.4e-9, fused
    and per parameter alike; at rho 0.9 PyTorch's own ends 2.6e-3 away)."""
    tmp, init, _, _ = runs
    flags = ADAGRAD if kind == "adagrad" else ADADELTA
    want = reference(tmp, init, str(tmp / f"{kind}-ref.safetensors"), *flags, epochs=1)
    ours = vggctl_train(tmp / kind, init, *flags, epochs=1)
    assert set(ours) == set(want)
    assert apart(ours, want) < 1e-5, apart(ours, want)


# AdamW over 4 steps (AMSGrad's largest second moment takes a few to
# differ from the last); RMSprop with momentum, centered.
AMSGRAD = ["--optimizer", "adamw", "--lr", "0.001", "--betas", "0.8,0.99", "--eps", "1e-6", "--weight-decay", "0.5",
           "--batch-size", "16"]
CENTERED = [*RMSPROP, "--momentum", "0.9", "--centered"]


@pytest.fixture(scope="module")
def variants(runs):
    """torch.optim.AdamW(amsgrad=True) and without, and
    torch.optim.RMSprop(centered=True), on the same run."""
    tmp, init, _, _ = runs
    return {"amsgrad": reference(tmp, init, str(tmp / "amsgrad-ref.safetensors"), *AMSGRAD, "--amsgrad", epochs=1),
            "adamw": reference(tmp, init, str(tmp / "adamw16-ref.safetensors"), *AMSGRAD, epochs=1),
            "centered": reference(tmp, init, str(tmp / "centered-ref.safetensors"), *CENTERED, epochs=1)}


@pytest.mark.parametrize("variant, update", [("amsgrad", "fused"), ("centered", "per-parameter")])
def test_amsgrad_and_centered_rmsprop_equal_torch_optim(runs, rmsprops, variants, variant, update):
    """--amsgrad is torch.optim's amsgrad (AdamW here: libtorch's fused
    kernel with its largest second moments), --centered RMSprop's centered
    form (the squared average less the square of the gradients' average;
    per parameter here): the weights within 1e-5 relative, each variant
    more than 1e-4 from the plain rule."""
    tmp, init, _, _ = runs
    flags = [*AMSGRAD, "--amsgrad"] if variant == "amsgrad" else CENTERED
    extra = ["--no-fused"] if update == "per-parameter" else []
    ours = vggctl_train(tmp / f"{variant}-{update}", init, *flags, *extra, epochs=1)
    assert set(ours) == set(variants[variant])
    assert apart(ours, variants[variant]) < 1e-5, apart(ours, variants[variant])
    plain = variants["adamw"] if variant == "amsgrad" else rmsprops["0.9"]
    assert apart(variants[variant], plain) > 1e-4, "the variant changed nothing: the test proves nothing"


# name: (vggctl's flags, the reference's, epochs). SGD over 2 epochs of 4
# updates with the momentum cycled (OneCycleLR's defaults); three linear
# phases without cycling, 2 updates an epoch through accumulation; Adam
# with beta1 cycled over 4 updates.
ONECYCLE = {
    "sgd": (["--lr", "0.05", "--batch-size", "16"], [], 2),
    "sgd-three-linear": (["--lr", "0.05", "--batch-size", "16", "--accum-steps", "2", "--three-phase",
                          "--anneal-strategy", "linear", "--pct-start", "0.4", "--div-factor", "10",
                          "--final-div-factor", "100", "--no-cycle-momentum"], ["--cycle-momentum", "off"], 2),
    "adam": (["--optimizer", "adam", "--lr", "0.001", "--batch-size", "16", "--cycle-momentum", "0.5,0.9"], [], 1),
}


@pytest.fixture(scope="module")
def onecycles(runs):
    """PyTorch's OneCycleLR over the runs of ONECYCLE, and over the SGD
    and Adam runs with their momentum left alone."""
    tmp, init, _, _ = runs
    refs = {}
    for name, (flags, ref_only, epochs) in ONECYCLE.items():
        ref = [f for f in flags if f != "--no-cycle-momentum"]
        refs[name] = reference(tmp, init, str(tmp / f"onecycle-{name}-ref.safetensors"), "--scheduler", "onecycle",
                               *ref, *ref_only, epochs=epochs)
    refs["adam-uncycled"] = reference(tmp, init, str(tmp / "onecycle-adam-uncycled-ref.safetensors"), "--scheduler",
                                     "onecycle", *ONECYCLE["adam"][0], "--cycle-momentum", "off", epochs=1)
    refs["sgd-uncycled"] = reference(tmp, init, str(tmp / "onecycle-uncycled-ref.safetensors"), "--scheduler",
                                     "onecycle", *ONECYCLE["sgd"][0], "--cycle-momentum", "off", epochs=2)
    return refs


@pytest.mark.parametrize("name, update", [("sgd", "fused"), ("sgd", "per-parameter"),
                                          ("sgd-three-linear", "fused"), ("adam", "fused")])
def test_onecycle_equals_torch_onecyclelr(runs, onecycles, name, update):
    """--scheduler onecycle is torch.optim.lr_scheduler.OneCycleLR(max_lr=
    --lr, epochs, steps_per_epoch=an epoch's updates) stepped after every
    optimizer step, with its pct_start, div factors, anneal strategy,
    three phases and momentum cycling (SGD's momentum, Adam's beta1): the
    weights within 1e-5 relative (measured 1e-10 to 3e-7). Cycling the
    momentum moves the SGD run by 1.3e-3 and the Adam run by 8.8e-4, so
    the comparisons see it."""
    tmp, init, _, _ = runs
    flags, _, epochs = ONECYCLE[name]
    extra = ["--no-fused"] if update == "per-parameter" else []
    ours = vggctl_train(tmp / f"onecycle-{name}-{update}", init, "--scheduler", "onecycle", *flags, *extra,
                        epochs=epochs)
    assert set(ours) == set(onecycles[name])
    assert apart(ours, onecycles[name]) < 1e-5, apart(ours, onecycles[name])
    assert apart(onecycles["sgd"], onecycles["sgd-uncycled"]) > 1e-3, "cycling changed nothing: proves nothing"
    assert apart(onecycles["adam"], onecycles["adam-uncycled"]) > 1e-4, "cycling changed nothing: proves nothing"


# name: (flags of vggctl and the reference alike, epochs, update). SGD over
# 2 epochs of 4 updates in cycles of 3 up and 2 down, each half the one
# before, the momentum cycled (CyclicLR's defaults); Adam's beta1 cycled
# over 4 updates of exp_range, per parameter: this tiny Adam run is
# chaotic at its fourth update (a beta1 range of 0.59 or 0.7 instead of
# 0.6 ends 1.2e-3 apart between torch's own fused and single-tensor Adam),
# and vggctl's per-parameter update is torch's single-tensor arithmetic.
CYCLIC = {
    "sgd-triangular2": (["--lr", "0.05", "--lr-min", "0.005", "--batch-size", "16", "--cycle-steps", "3,2",
                         "--cyclic-mode", "triangular2"], 2, "fused"),
    "adam-exp-range": (["--optimizer", "adam", "--lr", "0.001", "--lr-min", "0.0001", "--batch-size", "16",
                        "--cycle-steps", "2,1", "--cyclic-mode", "exp_range", "--gamma", "0.9",
                        "--cycle-momentum", "0.7,0.9"], 1, "per-parameter"),
}


@pytest.mark.parametrize("name", CYCLIC)
def test_cyclic_equals_torch_cycliclr(runs, name):
    """--scheduler cyclic is torch.optim.lr_scheduler.CyclicLR(base_lr=
    --lr-min, max_lr=--lr, step_size_up, step_size_down, mode, gamma)
    stepped after every optimizer step, the momentum (SGD's, Adam's beta1)
    cycled: the weights within 1e-5 relative of PyTorch's run. Cycling the
    SGD run's momentum moves it by more than 1e-3, so the comparison sees
    the momentum."""
    tmp, init, _, _ = runs
    flags, epochs, update = CYCLIC[name]
    want = reference(tmp, init, str(tmp / f"cyclic-{name}-ref.safetensors"), "--scheduler", "cyclic", *flags,
                     epochs=epochs)
    extra = ["--no-fused"] if update == "per-parameter" else []
    ours = vggctl_train(tmp / f"cyclic-{name}", init, "--scheduler", "cyclic", *flags, *extra, epochs=epochs)
    assert set(ours) == set(want)
    assert apart(ours, want) < 1e-5, apart(ours, want)
    if name.startswith("sgd"):
        uncycled = reference(tmp, init, str(tmp / f"cyclic-{name}-uncycled.safetensors"), "--scheduler", "cyclic",
                             *flags, "--cycle-momentum", "off", epochs=epochs)
        assert apart(want, uncycled) > 1e-3, "cycling changed nothing: proves nothing"


def test_random_erase_mixup_and_cutmix_equal_torchvision(runs):
    tmp, init, _, free = runs
    opts = ["--random-erase", "0.5", "--mixup-alpha", "0.4", "--cutmix-alpha", "1.0", "--label-smoothing", "0.1"]
    want = reference(tmp, init, str(tmp / "mixed-ref.safetensors"), *opts)
    ours = vggctl_train(tmp / "mixed", init, "--batch-size", str(BATCH), *opts)
    assert apart(ours, want) < 1e-5
    assert apart(free, want) > 1e-3, "the options changed nothing: the comparison proves nothing"


def test_dropout_equals_torchvisions(runs):
    """--dropout 0.2 is torchvision's `dropout=0.2` (the classifier's
    Dropout layers) with the same draws: weights within 1e-5 after 2
    epochs; the default 0.5 ends more than 1e-3 away."""
    tmp, init, _, free = runs
    want = reference(tmp, init, str(tmp / "dropout-ref.safetensors"), "--dropout", "0.2")
    ours = vggctl_train(tmp / "dropout", init, "--batch-size", str(BATCH), "--dropout", "0.2")
    assert apart(ours, want) < 1e-5, apart(ours, want)
    assert apart(free, want) > 1e-3, "the dropout changed nothing: the comparison proves nothing"
    # What torch.nn.Dropout refuses, and NaN (which it lets through), is one
    # usage line before anything is written.
    for p in ["1.5", "-0.1", "nan"]:
        if p != "nan":
            with pytest.raises(ValueError):
                torch.nn.Dropout(float(p))
        r = subprocess.run([BIN, "train", "--dataset", "digits", "--dropout", p, "--out", str(tmp / "bad")],
                           capture_output=True, text=True, timeout=60)
        shown = "NaN" if p == "nan" else p
        assert (r.returncode, r.stderr) == (2, f"vggctl: error: --dropout {shown} must be a probability in [0, 1]\n")
        assert not (tmp / "bad").exists()


@pytest.mark.parametrize("policy, ours_extra, ref_extra", [
    ("cifar10", [], []), ("imagenet", [], []), ("ra", ["--ra-magnitude", "17"], ["--ra-magnitude", "17"]),
    ("ta_wide", [], []), ("augmix", [], []), ("augmix", ["--augmix-severity", "7"], ["--augmix-severity", "7"]),
    ("ta_wide", ["--augment-interpolation", "bilinear"], ["--interpolation", "bilinear"])])
def test_auto_augment_equals_torchvision(runs, policy, ours_extra, ref_extra):
    """Between them the two AutoAugment policies' 256 images draw every op
    (counted in the reference: the CIFAR-10 one all but ShearX and Invert,
    the ImageNet one those); RandAugment (at magnitude 17, not the default
    9) and TrivialAugment Wide draw each of their 14 ops many times over
    (two or one per image, the signs and TrivialAugment's bins too), AugMix
    its 13 (three chains of 1-3 per image, bilinear, Dirichlet-blended; at
    severity 3 and 7);
    TrivialAugment again with bilinear interpolation, as torchvision's
    reference train.py passes it; the weights after 2 epochs equal
    PyTorch's."""
    tmp, init, _, free = runs
    name = "-".join([policy, *ours_extra])
    want = reference(tmp, init, str(tmp / f"auto-{name}-ref.safetensors"), "--auto-augment", policy, *ref_extra)
    ours = vggctl_train(tmp / f"auto-{name}", init, "--batch-size", str(BATCH), "--auto-augment", policy,
                        *ours_extra)
    assert apart(ours, want) < 1e-5
    assert apart(free, want) > 1e-3, "the policy changed nothing: the comparison proves nothing"


def test_bn_momentum_equals_batchnorm2ds(tmp_path):
    """--bn-momentum 0.5 is every BatchNorm2d's momentum=0.5: weights and
    running statistics within 1e-5 after 2 epochs; torch's default 0.1
    leaves the statistics more than 1e-3 away."""
    init = str(tmp_path / "init.safetensors")
    torch.manual_seed(4)
    model = vgg_reference.build("vgg11", True, "cifar", 10)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, init)
    want = reference(tmp_path, init, str(tmp_path / "ref.safetensors"), "--bn", "--bn-momentum", "0.5")
    usual = reference(tmp_path, init, str(tmp_path / "usual.safetensors"), "--bn")
    ours = vggctl_train(tmp_path / "run", init, "--batch-size", str(BATCH), "--bn-momentum", "0.5", bn=True)
    assert apart(ours, want) < 1e-5
    stats = [k for k in want if "running_" in k]
    assert max((usual[k] - want[k]).abs().max().item() for k in stats) > 1e-3
    r = subprocess.run([BIN, "train", "--dataset", "digits", "--bn", "--bn-momentum", "1.5",
                        "--out", str(tmp_path / "bad")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "vggctl: error: --bn-momentum 1.5 must be in [0, 1]"], r.stderr
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("flag, value, message", [
    ("--scale", "0.9,0.5", "--scale 0.9,0.5 must be LOW,HIGH area fractions with 0 < LOW <= HIGH <= 1"),
    ("--scale", "0.5,1.5", "--scale 0.5,1.5 must be LOW,HIGH area fractions"),
    ("--ratio", "0,1", "--ratio 0,1 must be LOW,HIGH aspect ratios (width / height) with 0 < LOW <= HIGH"),
    ("--ratio", "2,1", "--ratio 2,1 must be LOW,HIGH aspect ratios"),
])
def test_crop_ranges_no_box_can_come_from_are_usage_errors(tmp_path, flag, value, message):
    r = subprocess.run([BIN, "train", "--dataset", "digits", flag, value, "--out", str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=60)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"vggctl: error: {message}"), r.stderr
    assert not (tmp_path / "run").exists()


def test_model_ema_with_accumulation_equals_torchvision_average(tmp_path):
    init = str(tmp_path / "init.safetensors")
    torch.manual_seed(1)
    model = vgg_reference.build("vgg11", True, "cifar", 10)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, init)
    ema = ["--model-ema-steps", "2", "--model-ema-decay", "0.99", "--accum-steps", "2", "--warmup-epochs", "1"]
    want = reference(tmp_path, init, str(tmp_path / "ref.safetensors"), "--bn", "--batch-size", "8",
                     "--ema-out", str(tmp_path / "ref-ema.safetensors"), *ema)
    want_ema = load_file(str(tmp_path / "ref-ema.safetensors"))
    ours = vggctl_train(tmp_path / "run", init, "--batch-size", "8", "--model-ema", *ema, bn=True)
    ours_ema = load_file(str(tmp_path / "run" / "ema.safetensors"))
    assert apart(ours, want) < 1e-5
    assert set(ours_ema) == set(want_ema)
    assert max((ours_ema[k].double() - want_ema[k].double()).abs().max().item() for k in want_ema) < 1e-6
    counts = [k for k in want_ema if k.endswith("num_batches_tracked")]
    assert counts and all(ours_ema[k].item() == want_ema[k].item() for k in counts)
    assert apart(ours_ema, ours) > 1e-3, "the average equals the weights: the comparison proves little"


def test_a_clip_bound_must_be_positive_and_one_of_two(tmp_path):
    for mode in CLIPS:
        for bad, shown in [("0", "0"), ("-1", "-1"), ("nan", "NaN")]:
            r = subprocess.run([BIN, "train", "--dataset", "digits", f"--clip-grad-{mode}={bad}",
                                "--out", str(tmp_path / "r")], capture_output=True, text=True, timeout=60)
            assert r.returncode == 2
            assert r.stderr == f"vggctl: error: --clip-grad-{mode} {shown} must be a positive number\n"
            assert not (tmp_path / "r").exists()
    r = subprocess.run([BIN, "train", "--dataset", "digits", "--clip-grad-norm", "1", "--clip-grad-value", "1",
                        "--out", str(tmp_path / "r")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr == (
        "vggctl: error: --clip-grad-value and --clip-grad-norm exclude each other (timm's --clip-mode picks one)\n")
    assert not (tmp_path / "r").exists()


def test_optimizer_values_torch_refuses_are_usage_errors(tmp_path):
    """What torch.optim.SGD refuses (a negative momentum or weight decay,
    Nesterov without momentum), torch.optim.Adam (betas outside [0, 1), a
    negative eps), torch.optim.RMSprop (a negative alpha), torch.optim.NAdam
    (a negative momentum decay), torch.optim.RAdam (betas), torch.optim.Adamax
    (a negative eps) and torch.optim.Adagrad (a negative LR decay or
    starting sum; OneCycleLR and CyclicLR refuse to cycle its momentum,
    which it has not), vggctl refuses before anything is written,
    with one line naming the option, exit 2; also what torch lets through but
    cannot train (NaN, infinite values; a schedule's gamma of 0 or less;
    RMSprop's alpha above 1, which makes its average negative). A
    negative number given as its own word reaches the option's check
    (`--lr -1`, `--lr -1e-3`, `--betas -0.1,0.5`), not clap's "unexpected
    argument"."""
    param = [torch.zeros(1, requires_grad=True)]
    cases = [
        (["--momentum", "-0.5"], "--momentum -0.5 must be a finite number, 0 or more", dict(momentum=-0.5)),
        (["--weight-decay", "-1"], "--weight-decay -1 must be a finite number, 0 or more", dict(weight_decay=-1.0)),
        (["--nesterov", "--momentum", "0"], "--nesterov needs a --momentum above 0", dict(nesterov=True)),
        (["--lr", "-1"], "--lr -1 must be a positive number", dict(lr=-1.0)),
        (["--lr", "-1e-3"], "--lr -0.001 must be a positive number", dict(lr=-1e-3)),
        (["--optimizer", "adam", "--betas", "-0.1,0.5"], "--betas -0.1,0.5 must each be in [0, 1)",
         dict(betas=(-0.1, 0.5))),
        (["--momentum", "nan"], "--momentum NaN must be a finite number, 0 or more", None),
        (["--weight-decay", "inf"], "--weight-decay inf must be a finite number, 0 or more", None),
        (["--gamma", "0"], "--gamma 0 must be a positive number", None),
        (["--gamma", "-1"], "--gamma -1 must be a positive number", None),
        (["--norm-weight-decay", "-0.1"], "--norm-weight-decay -0.1 must be a finite number, 0 or more", None),
        (["--bias-weight-decay", "nan"], "--bias-weight-decay NaN must be a finite number, 0 or more", None),
        (["--optimizer", "adam", "--betas", "1,0.5"], "--betas 1,0.5 must each be in [0, 1)", dict(betas=(1.0, 0.5))),
        (["--optimizer", "adamw", "--betas=0.9,-0.1"], "--betas 0.9,-0.1 must each be in [0, 1)",
         dict(betas=(0.9, -0.1))),
        (["--optimizer", "adam", "--eps", "-0.5"], "--eps -0.5 must be a finite number, 0 or more", dict(eps=-0.5)),
        (["--optimizer", "rmsprop", "--alpha", "-0.5"], "--alpha -0.5 must be in [0, 1]", dict(alpha=-0.5)),
        (["--optimizer", "rmsprop", "--alpha", "1.5"], "--alpha 1.5 must be in [0, 1]", None),
        (["--optimizer", "nadam", "--momentum-decay", "-0.1"],
         "--momentum-decay -0.1 must be a finite number, 0 or more", dict(momentum_decay=-0.1)),
        (["--optimizer", "radam", "--betas", "0.9,1"], "--betas 0.9,1 must each be in [0, 1)", dict(betas=(0.9, 1.0))),
        (["--optimizer", "adamax", "--eps", "-1e-8"], "--eps -1e-8 must be a finite number, 0 or more", dict(eps=-1e-8)),
        (["--optimizer", "adagrad", "--lr-decay", "-0.1"], "--lr-decay -0.1 must be a finite number, 0 or more",
         dict(lr_decay=-0.1)),
        (["--optimizer", "adagrad", "--initial-accumulator-value", "-1"],
         "--initial-accumulator-value -1 must be a finite number, 0 or more", dict(initial_accumulator_value=-1.0)),
        (["--optimizer", "adadelta", "--rho", "1.5"], "--rho 1.5 must be in [0, 1]", dict(rho=1.5)),
    ]
    for args, message, torch_args in cases:
        if torch_args is not None:
            make = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "rmsprop": torch.optim.RMSprop,
                    "nadam": torch.optim.NAdam, "radam": torch.optim.RAdam, "adamax": torch.optim.Adamax,
                    "adagrad": torch.optim.Adagrad, "adadelta": torch.optim.Adadelta}.get(
                args[1] if args[0] == "--optimizer" else None, torch.optim.SGD)
            with pytest.raises(ValueError):
                make(param, **{"lr": 0.1, **torch_args})
        r = subprocess.run([BIN, "train", "--dataset", "digits", *args, "--out", str(tmp_path / "r")],
                           capture_output=True, text=True, timeout=60)
        assert (r.returncode, r.stderr) == (2, f"vggctl: error: {message}\n"), args
        assert not (tmp_path / "r").exists()
    with pytest.raises(ValueError):
        torch.optim.lr_scheduler.OneCycleLR(torch.optim.Adagrad(param), max_lr=0.1, total_steps=10)
    with pytest.raises(ValueError):
        torch.optim.lr_scheduler.CyclicLR(torch.optim.Adagrad(param), 0.01, 0.1)
    for scheduler in ["onecycle", "cyclic"]:
        r = subprocess.run([BIN, "train", "--dataset", "digits", "--optimizer", "adagrad", "--scheduler", scheduler,
                            "--out", str(tmp_path / "r")], capture_output=True, text=True, timeout=60)
        assert (r.returncode, r.stderr) == (2, f"vggctl: error: --scheduler {scheduler} cycles the momentum, which "
                                               "--optimizer adagrad has none of: add --no-cycle-momentum\n")
        assert not (tmp_path / "r").exists()


def test_torchvision_train_py_options_in_vggctls_form(tmp_path):
    """torchvision's train.py options: --amp is --precision fp16 (recorded
    as such); those vggctl has in another form (--test-only, --start-epoch,
    --cache-dataset, train's --weights; --opt sgd_nesterov, and timm's
    nadamw) are one usage line naming that form, where clap suggested
    unrelated options (--ra-sampler for --amp)."""
    common = ["train", "--dataset", "digits", "--arch", "vgg11", "--epochs", "1", "--limit-train", "32",
              "--limit-test", "32", "--quiet"]
    r = subprocess.run([BIN, *common, "--amp", "--out", str(tmp_path / "amp")],
                       capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "amp" / "config.json").read_text())["precision"] == "fp16"
    forms = [
        (["--test-only"], "--test-only: evaluation is a command of its own, vggctl eval --checkpoint FILE"),
        (["--start-epoch", "3"], "--start-epoch: a run continues from where it stopped with --resume DIR"),
        (["--cache-dataset"], "--cache-dataset: image folders are cached without asking (--cache-dir, --cache-mem)"),
        (["--weights", "imagenet"], "--weights: train starts from weights with --initial-checkpoint FILE; "
                                    "vggctl finetune --weights imagenet fine-tunes torchvision's"),
        # torchvision's --opt sgd_nesterov, timm's nadamw.
        (["--opt", "sgd_nesterov"], "invalid value 'sgd_nesterov' for '--optimizer <OPTIMIZER>': that is "
                                    "--optimizer sgd --nesterov in vggctl; see 'vggctl train --help'"),
        (["--opt", "nadamw"], "invalid value 'nadamw' for '--optimizer <OPTIMIZER>': that is --optimizer nadam "
                              "--decoupled-weight-decay in vggctl; see 'vggctl train --help'"),
    ]
    for args, message in forms:
        r = subprocess.run([BIN, *common, *args, "--out", str(tmp_path / "r")],
                           capture_output=True, text=True, timeout=60)
        assert (r.returncode, r.stderr) == (2, f"vggctl: error: {message}\n"), args
        assert not (tmp_path / "r").exists()


DOWNLOADED_ONLY = ("applies to the datasets vggctl downloads only (not --dataset folder, imagenet, digits,"
                   " stanford-cars or fer2013)")


def test_options_a_run_has_no_use_for_are_named_once_each(tmp_path):
    """Options typed for a new run that would change what it computes but
    that it cannot use (an SGD option with AdamW, a MultiStepLR option with
    cosine, a folder's validation options with the digits, RandAugment's
    magnitude without it, repeated augmentation's copies without it, the memory an image
    folder may take in memory rather than streamed (their crops differ), a warm-up's factor without a warm-up,
    OneCycleLR's, PolynomialLR's and CosineAnnealingWarmRestarts' options with another schedule, the momentum OneCycleLR cycles, a norm
    layer's weight decay or momentum without BatchNorm, a dropout without Dropout layers, a download's
    source for data never downloaded) each get one warning saying what they apply to, as eval's
    download source does; the run goes on. Where they apply,
    no warning; resource and policy options (--workers, --no-download,
    --strict) pass without one."""
    common = ["train", "--dataset", "digits", "--arch", "vgg11", "--epochs", "1",
              "--limit-train", "16", "--limit-test", "100", "--quiet", "--workers", "2", "--no-download",
              "--strict"]
    unused = ["--optimizer", "adamw", "--momentum", "0.5", "--nesterov", "--scheduler", "cosine",
              "--milestones", "3", "--gamma", "0.5", "--val-dir", str(tmp_path), "--val-split", "0.2",
              "--ra-magnitude", "5", "--warmup-decay", "0.1", "--augment-interpolation", "bilinear",
              "--augmix-severity", "5", "--norm-weight-decay", "0", "--bn-momentum", "0.2", "--ra-reps", "2",
              "--scale", "0.5,1",
              "--head", "gap",
              "--dropout", "0.2", "--cache-mem", "1G", "--patience", "3", "--three-phase", "--pct-start", "0.5",
              "--power", "2", "--restart-mult", "2", "--cycle-steps", "4", "--data-url", "http://127.0.0.1:9/"]
    r = subprocess.run([BIN, *common, *unused, "--out", str(tmp_path / "a")],
                       capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode == 0, r.stderr
    warned = [line for line in r.stderr.splitlines() if "is ignored" in line]
    sgd, step = "applies to --optimizer sgd only", "applies to --scheduler multistep only"
    assert warned == [f"warning: {flag} is ignored: it {why}" for flag, why in [
        ("--ra-magnitude", "applies to --auto-augment ra only"),
        ("--ra-reps", "applies with --ra-sampler only"),
        ("--augmix-severity", "applies to --auto-augment augmix only"),
        ("--augment-interpolation", "applies with --auto-augment only"),
        ("--scale", "applies to RandomResizedCrop's training (--dataset imagenet, or finetune on a folder;"
                    " not with --no-augment) only"),
        ("--gamma", "applies to --scheduler multistep, step, exponential, plateau or cyclic's exp_range only"),
        ("--power", "applies to --scheduler poly only"),
        ("--restart-mult", "applies to --scheduler cosine-restarts only"),
        ("--patience", "applies to --scheduler plateau only"),
        ("--pct-start", "applies to --scheduler onecycle only"),
        ("--three-phase", "applies to --scheduler onecycle only"),
        ("--cycle-steps", "applies to --scheduler cyclic only"),
        ("--milestones", step),
        ("--warmup-decay", "applies with --warmup-epochs only"),
        ("--momentum", "applies to --optimizer sgd or rmsprop only"), ("--nesterov", sgd),
        ("--norm-weight-decay", "applies to BatchNorm's parameters, and the model has none (--bn adds them)"),
        ("--bn-momentum", "applies to BatchNorm's running statistics, and the model has none (--bn adds them)"),
        ("--dropout", "applies to the classifier's Dropout layers, and the gap head has none"),
        ("--val-dir", "applies to --dataset folder only"),
        ("--cache-mem", "applies to image folders only (--dataset folder, imagenet, imagenette*, oxford-pets, flowers102, food101, dtd, fgvc-aircraft*, stanford-cars, gtsrb, eurosat, caltech101, caltech256, sun397, country211 or places365*)"),
        ("--val-split", "applies to a held-out part only (--dataset folder without --val-dir, eurosat, caltech101, caltech256, sun397, or --val-on val)"),
        ("--data-url", DOWNLOADED_ONLY)]], r.stderr
    # eval of a dataset never downloaded names a download's source too.
    r = subprocess.run([BIN, "eval", "--checkpoint", str(tmp_path / "a" / "last.safetensors"), "--data-url",
                        "http://127.0.0.1:9/", "--data-md5", "0" * 32], capture_output=True, text=True, timeout=120,
                       env=ENV)
    assert r.returncode == 0, r.stderr
    assert [line for line in r.stderr.splitlines() if "is ignored" in line] == [
        f"warning: {flag} is ignored: it {DOWNLOADED_ONLY}" for flag in ["--data-url", "--data-md5"]], r.stderr
    used = ["--momentum", "0.5", "--nesterov", "--milestones", "3", "--gamma", "0.5", "--auto-augment", "ra",
            "--ra-magnitude", "5", "--ra-sampler", "--ra-reps", "2", "--head", "cifar", "--dropout", "0.2"]
    r = subprocess.run([BIN, *common, *used, "--out", str(tmp_path / "b")],
                       capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode == 0 and "is ignored" not in r.stderr, r.stderr
    # Adam's, RMSprop's and NAdam's own options with SGD (the default); with
    # each, only the others' (and Nesterov) are unused.
    own = ["--betas", "0.8,0.9", "--eps", "1e-6", "--alpha", "0.9", "--momentum", "0.5", "--amsgrad", "--centered",
           "--momentum-decay", "0.01", "--decoupled-weight-decay", "--lr-decay", "0.1", "--initial-accumulator-value", "0.1", "--rho", "0.8"]
    nadam_radam = ["--momentum-decay", "--decoupled-weight-decay"]
    adagrad = ["--lr-decay", "--initial-accumulator-value"]
    for kind, flags in [("sgd", ["--betas", "--eps", "--alpha", "--centered", "--amsgrad", *nadam_radam, *adagrad,
                                 "--rho"]),
                        ("adam", ["--momentum", "--alpha", "--centered", *nadam_radam, *adagrad, "--rho"]),
                        ("rmsprop", ["--betas", "--amsgrad", *nadam_radam, *adagrad, "--rho"]),
                        ("nadam", ["--momentum", "--alpha", "--centered", "--amsgrad", *adagrad, "--rho"]),
                        ("adamax", ["--momentum", "--alpha", "--centered", "--amsgrad", *nadam_radam, *adagrad, "--rho"]),
                        ("adagrad", ["--momentum", "--betas", "--alpha", "--centered", "--amsgrad", *nadam_radam,
                                     "--rho"]),
                        ("adadelta", ["--momentum", "--betas", "--alpha", "--centered", "--amsgrad", *nadam_radam,
                                      *adagrad])]:
        r = subprocess.run([BIN, *common, *own, "--optimizer", kind, "--out", str(tmp_path / kind)],
                           capture_output=True, text=True, timeout=120, env=ENV)
        assert r.returncode == 0, r.stderr
        why = {"--betas": "adam, adamw, nadam, radam or adamax",
               "--eps": "adam, adamw, rmsprop, nadam, radam, adamax, adagrad or adadelta", "--lr-decay": "adagrad",
               "--initial-accumulator-value": "adagrad", "--rho": "adadelta",
               "--alpha": "rmsprop", "--momentum": "sgd or rmsprop", "--centered": "rmsprop",
               "--amsgrad": "adam or adamw", "--momentum-decay": "nadam",
               "--decoupled-weight-decay": "nadam or radam"}
        assert [line for line in r.stderr.splitlines() if "is ignored" in line] == [
            f"warning: {flag} is ignored: it applies to --optimizer {why[flag]} only" for flag in flags], kind
    # OneCycleLR has no gamma, and its cycle replaces SGD's momentum unless
    # --no-cycle-momentum keeps it.
    replaced = ("warning: --momentum is ignored: it is replaced by --cycle-momentum's cycle with --scheduler onecycle"
                " (--no-cycle-momentum keeps it)")
    gamma = "warning: --gamma is ignored: it applies to --scheduler multistep, step, exponential, plateau or cyclic's exp_range only"
    for extra, want in [([], [gamma, replaced]), (["--no-cycle-momentum"], [gamma])]:
        r = subprocess.run([BIN, *common, "--scheduler", "onecycle", "--gamma", "0.5", "--momentum", "0.5", *extra,
                            "--out", str(tmp_path / f"onecycle{len(extra)}")],
                           capture_output=True, text=True, timeout=120, env=ENV)
        assert r.returncode == 0, r.stderr
        assert [line for line in r.stderr.splitlines() if "is ignored" in line] == want, r.stderr


def test_a_run_too_short_for_its_warm_up_or_accumulation_says_so(tmp_path):
    """A warm-up longer than the run never reaches --lr: one warning naming
    the last epoch's LR, which metrics.jsonl records; an accumulation of
    more batches than an epoch holds (64 images in batches of 32: 2 steps)
    makes every update smaller: one warning. Where both fit, neither."""
    common = ["train", "--dataset", "digits", "--arch", "vgg11", "--head", "cifar", "--limit-train", "64",
              "--limit-test", "100", "--batch-size", "32"]
    r = subprocess.run([BIN, *common, "--epochs", "2", "--warmup-epochs", "5", "--accum-steps", "3",
                        "--out", str(tmp_path / "a")], capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode == 0, r.stderr
    with open(tmp_path / "a" / "metrics.jsonl") as f:
        last_lr = [json.loads(line) for line in f][-1]["lr"]
    assert last_lr == pytest.approx(0.01 * 2 / 5)
    warned = [line for line in r.stderr.splitlines() if line.startswith("warning: --")]
    assert warned == [
        f"warning: --warmup-epochs 5 is longer than the run's 2 epochs: the LR never reaches --lr 0.01 "
        f"(its last is {last_lr})",
        "warning: --accum-steps 3 is more than an epoch's 2 steps: every update sums 2 batches of loss / 3, "
        "as an epoch's last, shorter group does"], r.stderr
    r = subprocess.run([BIN, *common, "--epochs", "2", "--warmup-epochs", "2", "--accum-steps", "2",
                        "--out", str(tmp_path / "b")], capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode == 0 and "warning: --" not in r.stderr, r.stderr
