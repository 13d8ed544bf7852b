"""The learning rate of every epoch (metrics.jsonl's `lr`) equals PyTorch's
own schedulers stepped once per epoch, as torchvision's reference
`train.py` builds them, within 1e-12 relative (PyTorch's are recursive,
vggctl's closed forms):

- `--scheduler multistep`: MultiStepLR;
- `--warmup-epochs W` with `--warmup-method linear|constant` and
  `--warmup-decay F`: SequentialLR of LinearLR(start_factor=F) or
  ConstantLR(factor=F) over W epochs and the main scheduler, which then
  counts its own epochs: CosineAnnealingLR(T_max=epochs-W, eta_min=--lr-min),
  StepLR(--step-size, --gamma), ExponentialLR(--gamma),
  PolynomialLR(total_iters=epochs-W, power=--power),
  CosineAnnealingWarmRestarts(T_0=--restart-epochs, T_mult=--restart-mult,
  eta_min=--lr-min);
- `--warmup-epochs W` alone, vggctl's ramp lr·(e+1)/W: SequentialLR of
  LinearLR(start_factor=1/W, total_iters=W-1) and the main scheduler.

`--scheduler onecycle` is OneCycleLR stepped after every update (its
weights against PyTorch's in test_train_options.py), `--scheduler cyclic`
CyclicLR likewise.

`--scheduler plateau` is ReduceLROnPlateau stepped after each epoch with
that epoch's validation loss (metrics.jsonl's `test_loss`), also across a
`--resume` from inside a cooldown.

Impossible values are one usage error each.
"""
import json
import os
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("VGGCTL_BIN", os.path.join(ROOT, "target", "release", "vggctl"))
EPOCHS, LR = 7, 0.1
S = torch.optim.lr_scheduler


def pytorch_lrs(main, warmup=None, w=0):
    """The LR of each epoch: `main(optimizer)` after `warmup(optimizer)`
    for `w` epochs, joined by SequentialLR."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    sched = S.SequentialLR(opt, [warmup(opt), main(opt)], milestones=[w]) if warmup else main(opt)
    lrs = []
    for _ in range(EPOCHS):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


CASES = {
    "multistep": (["--scheduler", "multistep", "--milestones", "2,5", "--gamma", "0.5"],
                  lambda: pytorch_lrs(lambda o: S.MultiStepLR(o, [2, 5], 0.5))),
    "cosine-linear": (["--scheduler", "cosine", "--lr-min", "0.001", "--warmup-epochs", "2",
                       "--warmup-decay", "0.1"],
                      lambda: pytorch_lrs(lambda o: S.CosineAnnealingLR(o, EPOCHS - 2, eta_min=0.001),
                                          lambda o: S.LinearLR(o, start_factor=0.1, total_iters=2), 2)),
    "step-constant": (["--scheduler", "step", "--step-size", "2", "--gamma", "0.5", "--warmup-epochs", "2",
                       "--warmup-method", "constant", "--warmup-decay", "0.25"],
                      lambda: pytorch_lrs(lambda o: S.StepLR(o, 2, 0.5),
                                          lambda o: S.ConstantLR(o, factor=0.25, total_iters=2), 2)),
    "exponential-default-decay": (["--scheduler", "exponential", "--gamma", "0.7", "--warmup-epochs", "3",
                                   "--warmup-method", "linear"],
                                  lambda: pytorch_lrs(lambda o: S.ExponentialLR(o, 0.7),
                                                      lambda o: S.LinearLR(o, start_factor=0.01, total_iters=3), 3)),
    "poly-linear": (["--scheduler", "poly", "--power", "0.9", "--warmup-epochs", "2", "--warmup-method", "linear",
                     "--warmup-decay", "0.1"],
                    lambda: pytorch_lrs(lambda o: S.PolynomialLR(o, total_iters=EPOCHS - 2, power=0.9),
                                        lambda o: S.LinearLR(o, start_factor=0.1, total_iters=2), 2)),
    "poly-default-power": (["--scheduler", "polynomiallr"],
                           lambda: pytorch_lrs(lambda o: S.PolynomialLR(o, total_iters=EPOCHS))),
    # Cycles of 1 and 2 epochs after a constant warm-up of 1: restarts at 2 and 4.
    "restarts-constant": (["--scheduler", "cosine-restarts", "--restart-epochs", "1", "--restart-mult", "2",
                           "--lr-min", "0.001", "--warmup-epochs", "1", "--warmup-method", "constant",
                           "--warmup-decay", "0.5"],
                          lambda: pytorch_lrs(lambda o: S.CosineAnnealingWarmRestarts(o, 1, 2, eta_min=0.001),
                                              lambda o: S.ConstantLR(o, factor=0.5, total_iters=1), 1)),
    # Cycles of 3 epochs: restarts at 3 and 6.
    "restarts": (["--scheduler", "sgdr", "--restart-epochs", "3"],
                 lambda: pytorch_lrs(lambda o: S.CosineAnnealingWarmRestarts(o, 3))),
    "cosine-ramp": (["--scheduler", "cosine", "--warmup-epochs", "3"],
                    lambda: pytorch_lrs(lambda o: S.CosineAnnealingLR(o, EPOCHS - 3),
                                        lambda o: S.LinearLR(o, start_factor=1 / 3, total_iters=2), 3)),
}


def train(tmp_path, name, flags, epochs=EPOCHS):
    out = tmp_path / name
    r = subprocess.run(
        [BIN, "train", "--dataset", "digits", "--arch", "vgg11", "--head", "cifar", "--epochs", str(epochs),
         "--lr", str(LR), "--limit-train", "8", "--limit-test", "8", "--batch-size", "8", "--keep", "last",
         "--quiet", "--out", str(out), *flags],
        capture_output=True, text=True, timeout=300)
    return r, out


@pytest.mark.parametrize("name", CASES)
def test_each_epochs_lr_is_pytorchs(tmp_path, name):
    flags, reference = CASES[name]
    r, out = train(tmp_path, name, flags)
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    with open(out / "metrics.jsonl") as f:
        ours = [json.loads(line)["lr"] for line in f]
    want = reference()
    assert len(ours) == EPOCHS
    for epoch, (a, b) in enumerate(zip(ours, want)):
        assert abs(a - b) <= 1e-12 * b, (epoch, ours, want)
    assert len(set(round(v, 12) for v in want)) > 2, "a schedule that hardly changes proves little"


PLATEAU = ["--scheduler", "plateau", "--patience", "0", "--cooldown", "1", "--gamma", "0.5", "--lr-min", "0.02"]


def metrics(out):
    with open(out / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_plateau_is_reducelronplateau_on_the_validation_loss(tmp_path):
    """Each epoch's LR equals PyTorch's ReduceLROnPlateau(factor=0.5,
    patience=0, cooldown=1, min_lr=0.02) stepped with the epochs' validation
    losses so far, exactly. The run reduces the LR, sits out a cooldown and
    reaches the floor (checked: else the comparison proves little). A run
    stopped after epoch 8, whose loss starts the first cooldown, and resumed
    to 16 has the same LRs and weights: the schedule's state is the losses
    in the resume point's history. A factor of 1 or more, which torch
    refuses, is a usage error (test_impossible_values_are_usage_errors)."""
    epochs = 16
    r, out = train(tmp_path, "straight", PLATEAU, epochs)
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    ms = metrics(out)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    sched = S.ReduceLROnPlateau(opt, factor=0.5, patience=0, cooldown=1, min_lr=0.02)
    want = []
    for m in ms:
        want.append(opt.param_groups[0]["lr"])
        sched.step(m["test_loss"])
    assert [m["lr"] for m in ms] == want
    assert want[-1] == 0.02 and len(set(want)) >= 4, want
    cooled = [e for e in range(2, epochs) if want[e] == want[e - 1] < want[e - 2]]
    assert cooled, f"no cooldown kept an LR after a reduction: {want}"

    with pytest.raises(ValueError):
        S.ReduceLROnPlateau(opt, factor=1.0)
    stop = 8
    assert want[stop] < want[stop - 1], f"epoch {stop + 1} should start the first cooldown: {want}"
    r, split = train(tmp_path, "split", PLATEAU, stop)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([BIN, "train", "--resume", str(split), "--epochs", str(epochs), "--quiet"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert [m["lr"] for m in metrics(split)] == want
    a, b = load_file(str(out / "last.safetensors")), load_file(str(split / "last.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_longer_resume_re_spans_cosine_and_says_so(tmp_path):
    """A cosine run of 2 epochs resumed with --epochs 4: one note says the
    schedule now spans 4 epochs from epoch 3 on, and epochs 3 and 4 take
    CosineAnnealingLR(T_max=4)'s LRs within 1e-12 (the first two keep
    T_max=2's). A resume to the same length, or a schedule that does not
    span the run (step), says nothing."""
    r, out = train(tmp_path, "short", ["--scheduler", "cosine"], 2)
    assert r.returncode == 0, r.stderr
    resume = [BIN, "train", "--resume", str(out), "--epochs", "4", "--quiet"]
    r = subprocess.run(resume, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == [
        "note: --epochs 4 re-spans the run's cosine schedule, which spanned 2 epochs: the LR from epoch 3 on "
        "follows the new length"], r.stderr
    lrs = [m["lr"] for m in metrics(out)]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    sched, want = S.CosineAnnealingLR(opt, 4), []
    for _ in range(4):
        want.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert len(lrs) == 4 and abs(lrs[0] - LR) + abs(lrs[1] - LR / 2) <= 1e-15 and all(
        abs(a - b) <= 1e-12 * b for a, b in zip(lrs[2:], want[2:])), (lrs, want)
    r = subprocess.run([*resume[:-2], "5", "--quiet"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "note: --epochs 5 re-spans" in r.stderr, r.stderr
    r, step = train(tmp_path, "step", ["--scheduler", "step", "--step-size", "1", "--gamma", "0.5"], 1)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([BIN, "train", "--resume", str(step), "--epochs", "2", "--quiet"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stderr == "", r.stderr


def check_first_updates(out, epochs, key, scheduler):
    """The run in `out` recorded, for each of its `epochs` of 8 updates,
    the LR of its first update as `scheduler(optimizer)` stepped after
    every update gives it (within 1e-12 relative, every epoch's another),
    and config.json's `key` values the 8."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR, momentum=0.9)
    sched = scheduler(opt)
    want = []
    for _ in range(epochs):
        want.append(opt.param_groups[0]["lr"])
        for _ in range(8):
            opt.step()
            sched.step()
    ours = [m["lr"] for m in metrics(out)]
    assert len(ours) == epochs and all(abs(a - b) <= 1e-12 * b for a, b in zip(ours, want)), (ours, want)
    assert len(set(round(v, 12) for v in want)) == epochs, want
    with open(out / "config.json") as f:
        assert json.load(f)[key]["steps_per_epoch"] == 8


def onecycle_run(out, epochs, *extra):
    return [BIN, "train", "--dataset", "digits", "--arch", "vgg11", "--head", "cifar", "--epochs", str(epochs),
            "--lr", str(LR), "--limit-train", "64", "--limit-test", "8", "--batch-size", "8", "--keep", "last",
            "--scheduler", "onecycle", "--three-phase", "--pct-start", "0.25", "--out", str(out), *extra]


def test_onecycle_steps_every_update_and_resumes_mid_epoch(tmp_path):
    """--scheduler onecycle is OneCycleLR(max_lr=--lr, epochs,
    steps_per_epoch=an epoch's updates) stepped after every update: each
    epoch's `lr` in metrics.jsonl is the LR of its first update, within
    1e-12 relative, here over 5 epochs of 8 updates in three phases, and
    config.json records the 8. Ctrl-C in the middle of the run, then
    --resume: the weights of the run in one go, bit for bit (the LR and the
    momentum are functions of the update's position in the run)."""
    epochs = 5
    straight = tmp_path / "straight"
    r = subprocess.run(onecycle_run(straight, epochs, "--quiet"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ignored" not in r.stderr, r.stderr
    check_first_updates(straight, epochs, "onecycle", lambda o: S.OneCycleLR(
        o, max_lr=LR, epochs=epochs, steps_per_epoch=8, pct_start=0.25, three_phase=True))

    stopped = tmp_path / "stopped"
    p = subprocess.Popen(onecycle_run(stopped, epochs), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    while not (stopped / "metrics.jsonl").exists() or not metrics(stopped):
        assert time.monotonic() - t0 < 120 and p.poll() is None, "the run never finished an epoch"
        time.sleep(0.02)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert len(metrics(stopped)) < epochs, "the run ended before the stop: nothing was resumed"
    r = subprocess.run([BIN, "train", "--resume", str(stopped), "--quiet"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    a, b = load_file(str(straight / "last.safetensors")), load_file(str(stopped / "last.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cyclic_records_each_epochs_first_update(tmp_path):
    """--scheduler cyclic is CyclicLR(base_lr=--lr-min, max_lr=--lr)
    stepped after every update: each epoch's `lr` in metrics.jsonl is its
    first update's, within 1e-12 relative, over 4 epochs of 8 updates in
    cycles of 3 up and 2 down (triangular2: each half the one before)."""
    epochs = 4
    out = tmp_path / "cyclic"
    r = subprocess.run(
        [BIN, "train", "--dataset", "digits", "--arch", "vgg11", "--head", "cifar", "--epochs", str(epochs),
         "--lr", str(LR), "--lr-min", "0.01", "--limit-train", "64", "--limit-test", "8", "--batch-size", "8",
         "--keep", "last", "--scheduler", "cycliclr", "--cycle-steps", "3,2", "--cyclic-mode", "triangular2",
         "--quiet", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ignored" not in r.stderr, r.stderr
    check_first_updates(out, epochs, "cyclic", lambda o: S.CyclicLR(
        o, base_lr=0.01, max_lr=LR, step_size_up=3, step_size_down=2, mode="triangular2"))


def test_impossible_values_are_usage_errors(tmp_path):
    for flags, message in [
        (["--warmup-epochs", "2", "--warmup-decay", "0"],
         "--warmup-decay: warm-up decay 0 must be in (0, 1] for the linear warm-up"),
        (["--warmup-epochs", "2", "--warmup-method", "constant", "--warmup-decay", "1.5"],
         "--warmup-decay: warm-up decay 1.5 must be in [0, 1] for the constant warm-up"),
        (["--scheduler", "step", "--step-size", "0"], "--step-size must be at least 1"),
        (["--scheduler", "cosine", "--lr-min", "-1"], "--lr-min"),
        (["--scheduler", "plateau", "--gamma", "1"],
         "--gamma 1 must be below 1 for --scheduler plateau (ReduceLROnPlateau's factor)"),
        (["--scheduler", "plateau", "--warmup-epochs", "2"],
         "--warmup-epochs does not combine with --scheduler plateau"),
        (["--scheduler", "onecycle", "--warmup-epochs", "2"],
         "--warmup-epochs does not combine with --scheduler onecycle"),
        (["--scheduler", "onecycle", "--pct-start", "1.5"], "--pct-start 1.5 must be in [0, 1]"),
        (["--scheduler", "poly", "--power", "-0.5"], "--power -0.5 must be a finite number, 0 or more"),
        (["--scheduler", "cyclic", "--warmup-epochs", "2"], "--warmup-epochs does not combine with --scheduler cyclic"),
        (["--scheduler", "cyclic", "--cyclic-mode", "exp_range"],
         "--cyclic-mode exp_range needs --gamma, its factor per update (e.g. 0.9999)"),
        (["--scheduler", "cyclic", "--cyclic-mode", "exp_range", "--gamma", "1.5"],
         "--gamma 1.5 must be in (0, 1] (exp_range's factor per update)"),
        (["--scheduler", "cyclic", "--cycle-steps", "0,4"],
         "--cycle-steps 0,4 must rise over 1 update or more (a fall of 0 is a sawtooth)"),
        (["--scheduler", "cyclic", "--cycle-steps", "3,x"],
         "--cycle-steps 3,x must be UP or UP,DOWN: whole numbers of updates"),
        (["--scheduler", "cyclic", "--cycle-momentum", "0.95,0.9"],
         "--cycle-momentum 0.95,0.9 must be a base and a maximum in [0, 1), the base not above the maximum"),
        (["--scheduler", "cosine-restarts"], "--scheduler cosine-restarts needs --restart-epochs N"),
        (["--scheduler", "cosine-restarts", "--restart-epochs", "0"], "--restart-epochs must be at least 1"),
        (["--scheduler", "cosine-restarts", "--restart-epochs", "2", "--restart-mult", "0"],
         "--restart-mult must be at least 1"),
        (["--scheduler", "onecycle", "--div-factor", "0"], "--div-factor 0 must be a positive number"),
        (["--scheduler", "onecycle", "--cycle-momentum", "0.9,0.8"],
         "--cycle-momentum 0.9,0.8 must be a base and a maximum in [0, 1), the base not above the maximum"),
    ]:
        r, out = train(tmp_path, "bad", flags)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and message in lines[0], (flags, r.stderr)
        assert not out.exists()
