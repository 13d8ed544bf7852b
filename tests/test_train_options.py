"""Training options PyTorch users reach for, against PyTorch itself on the
same data, initial weights, order and dropout draws (tests/ddp_reference.py
as one process): `--clip-grad-norm` equals `torch.nn.utils.clip_grad_norm_`
before each SGD step, with the fused flat-buffer update and with the
per-parameter one, within 1e-5 relative after 2 epochs; the clipping binds
(the unclipped reference ends elsewhere): measured bit-identical fused,
1.3e-8 per-parameter. A norm that is not positive is a usage error."""
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vgg_reference  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("VGGCTL_BIN", os.path.join(ROOT, "target", "release", "vggctl"))
DATA = os.path.join(ROOT, "tests", "fixtures", "digits-bin")
LIMIT, BATCH, EPOCHS, CLIP = 64, 16, 2, 0.25
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def reference(tmp_path, init, out, *extra):
    subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "ddp_reference.py"), "--as-one-process", "1",
         "--data", os.path.join(DATA, "cifar-10-batches-bin"), "--init", init, "--out", out,
         "--limit-train", str(LIMIT), "--epochs", str(EPOCHS), "--batch-size", str(BATCH), *extra],
        check=True, timeout=300, env=ENV)
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
    clipped = reference(tmp, init, str(tmp / "clipped.safetensors"), "--clip-grad-norm", str(CLIP))
    free = reference(tmp, init, str(tmp / "free.safetensors"))
    return tmp, init, clipped, free


@pytest.mark.parametrize("update", ["fused", "per-parameter"])
def test_clip_grad_norm_equals_pytorch(runs, update):
    tmp, init, clipped, free = runs
    out = tmp / update
    extra = ["--no-fused"] if update == "per-parameter" else []
    r = subprocess.run(
        [BIN, "train", "--dataset", "cifar10", "--data-dir", DATA, "--no-download", "--arch", "vgg11",
         "--head", "cifar", "--initial-checkpoint", init, "--no-augment", "--limit-train", str(LIMIT),
         "--limit-test", "16", "--epochs", str(EPOCHS), "--batch-size", str(BATCH), "--device", "cpu",
         "--clip-grad-norm", str(CLIP), "--quiet", "--out", str(out), *extra],
        capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr
    ours = load_file(str(out / "last.safetensors"))
    assert set(ours) == set(clipped)
    assert apart(ours, clipped) < 1e-5
    assert apart(free, clipped) > 1e-3, "the clipping never bound: the comparison proves nothing"


def test_a_clip_norm_must_be_positive(tmp_path):
    for bad, shown in [("0", "0"), ("-1", "-1"), ("nan", "NaN")]:
        r = subprocess.run([BIN, "train", "--dataset", "digits", f"--clip-grad-norm={bad}", "--out", str(tmp_path / "r")],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2
        assert r.stderr == f"vggctl: error: --clip-grad-norm {shown} must be a positive number\n"
        assert not (tmp_path / "r").exists()
