"""Stochastic weight averaging (`--swa-start`) against PyTorch's own
torch.optim.swa_utils in its documented loop (tests/ddp_reference.py as one
process, same data, initial weights, order and dropout draws):

- VGG11-BN, cosine schedule, averaging from epoch 2 of 4 with SWALR's
  linear anneal over 2 epochs: the trained weights (the LR of every epoch)
  within 1e-5 relative, and swa.safetensors (AveragedModel's parameters,
  then update_bn's BatchNorm statistics over the training images, and its
  num_batches_tracked exactly) within 1e-5; the statistics update_bn gives
  differ from the model's by more than 1e-3, the average from the weights
  likewise, so the comparison can fail. VGG11 without BN and the cos
  anneal over 3 epochs (no statistics to recompute) likewise.
- A run stopped after 3 epochs and resumed to 4 ends with the same
  swa.safetensors and weights as the uninterrupted run, bit for bit.
- Over 2 ranks the recomputed statistics are one process's update_bn on
  the same average.
- The usage errors, the figures in metrics.jsonl and the summary, and
  the warning of a run stopped early before the average began."""
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
LIMIT, BATCH, EPOCHS = 64, 16, 4
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def vggctl(out, *extra, check=True):
    r = subprocess.run(
        [BIN, "train", "--dataset", "cifar10", "--data-dir", DATA, "--no-download", "--arch", "vgg11",
         "--head", "cifar", "--no-augment", "--limit-train", str(LIMIT), "--limit-test", "16",
         "--batch-size", str(BATCH), "--device", "cpu", "--out", str(out), *extra],
        capture_output=True, text=True, timeout=300, env=ENV)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def apart(a, b):
    return max(((a[k].double() - b[k].double()).abs() / (1 + b[k].double().abs())).max().item()
               for k in b if b[k].is_floating_point())


CASES = {
    "bn-linear": (True, ["--swa-start", "2", "--swa-lr", "0.004", "--swa-anneal-epochs", "2",
                         "--swa-anneal-strategy", "linear"]),
    "plain-cos": (False, ["--swa-start", "2", "--swa-lr", "0.02", "--swa-anneal-epochs", "3",
                          "--swa-anneal-strategy", "cos"]),
}


@pytest.mark.parametrize("name", CASES)
def test_swa_equals_torch_swa_utils(tmp_path, name):
    bn, swa = CASES[name]
    init = str(tmp_path / "init.safetensors")
    torch.manual_seed(3)
    model = vgg_reference.build("vgg11", bn, "cifar", 10)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, init)
    ref_out, ref_swa = str(tmp_path / "ref.safetensors"), str(tmp_path / "ref-swa.safetensors")
    ddp_reference.in_process(
        "--as-one-process", "1", "--data", os.path.join(DATA, "cifar-10-batches-bin"), "--init", init,
        "--out", ref_out, "--limit-train", LIMIT, "--epochs", EPOCHS, "--batch-size", BATCH,
        "--epoch-scheduler", "cosine", "--swa-out", ref_swa, *(["--bn"] if bn else []), *swa)
    run = tmp_path / "run"
    r = vggctl(run, "--initial-checkpoint", init, "--epochs", str(EPOCHS), "--scheduler", "cosine",
               *(["--bn"] if bn else []), *swa)
    want, want_swa = load_file(ref_out), load_file(ref_swa)
    ours, ours_swa = load_file(str(run / "last.safetensors")), load_file(str(run / "swa.safetensors"))
    assert apart(ours, want) < 1e-5
    assert set(ours_swa) == set(want_swa)
    assert apart(ours_swa, want_swa) < 1e-5
    assert apart(ours_swa, ours) > 1e-3, "the average equals the weights: the comparison proves little"
    counts = [k for k in want_swa if k.endswith("num_batches_tracked")]
    assert all(ours_swa[k].item() == want_swa[k].item() == LIMIT // BATCH for k in counts)
    if bn:
        stats = [k for k in want_swa if k.endswith("running_var")]
        assert max((want_swa[k] - ours[k]).abs().max().item() for k in stats) > 1e-3, \
            "update_bn changed nothing: the statistics' check proves little"
    lines = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [("swa" in m) for m in lines] == [False] * (EPOCHS - 1) + [True]
    assert "weight average (SWA): val top-1" in r.stdout and str(run / "swa.safetensors") in r.stdout


def test_a_resumed_swa_run_ends_as_the_uninterrupted_one(tmp_path):
    common = ["--bn", "--scheduler", "step", "--step-size", "1", "--gamma", "0.7", "--swa-start", "2",
              "--swa-lr", "0.005", "--swa-anneal-epochs", "2", "--quiet"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    vggctl(whole, "--epochs", "4", *common)
    vggctl(parts, "--epochs", "3", *common)
    # The first leg's end wrote an average of its own (epochs 2-3).
    assert (parts / "swa.safetensors").is_file()
    r = subprocess.run([BIN, "train", "--resume", str(parts), "--epochs", "4", "--quiet"],
                       capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr
    for f in ["last.safetensors", "swa.safetensors"]:
        a, b = load_file(str(whole / f)), load_file(str(parts / f))
        assert set(a) == set(b)
        assert all(torch.equal(a[k], b[k]) for k in a), f


@pytest.mark.parametrize("extra, message", [
    (["--swa-start", "2"], "--swa-start needs --swa-lr"),
    (["--swa-start", "0", "--swa-lr", "0.01"], "--swa-start must be at least 1"),
    (["--swa-start", "2", "--swa-lr", "-1"], "--swa-lr -1 must be 0 or more"),
    (["--swa-start", "5", "--swa-lr", "0.01"], "--swa-start 5 is past the run's last epoch, 2"),
    (["--swa-start", "1", "--swa-lr", "0.01", "--scheduler", "onecycle"], "is stepped every update"),
])
def test_swa_values_no_run_can_use_are_usage_errors(tmp_path, extra, message):
    r = vggctl(tmp_path / "run", "--epochs", "2", *extra, check=False)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert not (tmp_path / "run").exists()


def test_a_run_stopped_early_before_the_average_says_so(tmp_path):
    """At an LR too small to change a prediction the validation top-1
    never improves: --early-stop 1 ends the run after epoch 2, before
    --swa-start 3; one warning says nothing was averaged."""
    r = vggctl(tmp_path / "run", "--epochs", "4", "--lr", "1e-12", "--early-stop", "1", "--swa-start", "3",
               "--swa-lr", "0.01", "--quiet")
    assert "stopped early" in r.stdout, r.stdout
    assert r.stderr.count("warning: the run stopped at epoch 2 before --swa-start 3: nothing was averaged") == 1, \
        r.stderr
    assert not (tmp_path / "run" / "swa.safetensors").exists()


def test_swa_options_without_swa_start_are_named(tmp_path):
    r = vggctl(tmp_path / "run", "--epochs", "1", "--swa-lr", "0.01", "--swa-anneal-epochs", "3", "--quiet")
    for flag in ["--swa-lr", "--swa-anneal-epochs"]:
        assert f"{flag} is ignored: it applies with --swa-start only" in r.stderr
    assert not (tmp_path / "run" / "swa.safetensors").exists()


def test_two_ranks_recompute_the_statistics_over_one_process_batches(tmp_path):
    """Over 2 ranks each takes its share of the training images' batches
    (72 images in batches of 16: 2 and 3, the last one of 8) and the means
    are combined by their counts: update_bn in one process on the same
    average gives the same statistics within 1e-5, and counts 5 batches."""
    limit, run = 72, tmp_path / "run"
    r = subprocess.run(
        [BIN, "train", "--dataset", "cifar10", "--data-dir", DATA, "--no-download", "--arch", "vgg11", "--bn",
         "--head", "cifar", "--no-augment", "--limit-train", str(limit), "--limit-test", "16", "--epochs", "2",
         "--batch-size", str(BATCH), "--device", "cpu", "--out", str(run), "--swa-start", "1",
         "--swa-lr", "0.005", "--quiet", "--nproc-per-node", "2"],
        capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    ours = load_file(str(run / "swa.safetensors"))
    model = vgg_reference.build("vgg11", True, "cifar", 10)
    model.load_state_dict(ours)
    images, _ = ddp_reference.train_split(os.path.join(DATA, "cifar-10-batches-bin"), limit)
    x = ddp_reference.normalize(images, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    batches = [x[i:i + BATCH] for i in range(0, limit, BATCH)]
    torch.optim.swa_utils.update_bn(batches[:2], model)
    rank0 = {k: v.clone() for k, v in model.state_dict().items()}
    torch.optim.swa_utils.update_bn(batches, model)
    want = model.state_dict()
    stats = [k for k in want if "running_" in k]
    assert max((want[k] - ours[k]).abs().max().item() for k in stats) < 1e-5
    assert all(ours[k].item() == 5 for k in want if k.endswith("num_batches_tracked"))
    # Rank 0's batches alone give other statistics: the ranks' were combined.
    assert max((rank0[k] - ours[k]).abs().max().item() for k in stats) > 1e-3
