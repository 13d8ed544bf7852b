"""`--dataset usps` against torchvision's own `USPS` class, on
scikit-learn's real 8x8 digits written as USPS's files (`usps.bz2`, 300
training images, and `usps.t.bz2`, 100 test images: LIBSVM's lines, the
label the digit plus one, each image doubled to 16x16, its values scaled to
[-1, 1] with a little noise and written as `%g` writes them, exponents
included, so that torchvision's float32 truncation to bytes is exercised).

- VGG11 trained by vggctl for 2 epochs equals PyTorch's loop over
  torchvision's images (`ddp_reference.py --usps`: resized to 32x32 by
  `F.resize(antialias=True)`, three channels, normalized by the training
  images' own mean and deviation) within 1e-5, not mirrored; the recorded
  mean and deviation are numpy's over torchvision's bytes within 1e-12 (a
  byte off by one moves the mean by 5e-8), and the classes are the digits.
- `eval` of the reference's weights gives PyTorch's test loss (within
  1e-5) and its exact top-1 count.
- A download from a mirror on 127.0.0.1 leaves the two files torchvision
  reads; a wrong MD5 leaves nothing behind, with one error line.
- A file that is not bzip2, a line of 255 values, a value outside [-1, 1]
  and a label 0 are one error line naming the file (and the line)."""
import bz2
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dataset_helpers import BIN, ENV, apart, errors, initial_model, md5, mirror, reference, reference_scores  # noqa: E402
from ddp_reference import usps  # noqa: E402

LIMIT, BATCH, EPOCHS = 48, 16, 2
FILES = ["usps.bz2", "usps.t.bz2"]


def usps_lines(images, labels):
    """LIBSVM's lines of USPS for 16x16 images of values in [-1, 1]."""
    return [f"{y + 1} " + " ".join(f"{i + 1}:{v:g}" for i, v in enumerate(x.ravel())) + "\n"
            for x, y in zip(images, labels)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """USPS's two files made of scikit-learn's digits."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    x = np.kron(digits.images, np.ones((2, 2)))
    noise = np.random.default_rng(3).normal(0, 0.02, x.shape)
    x = np.clip(x / 8 - 1 + noise * (x > 0), -1, 1)
    root = tmp_path_factory.mktemp("usps")
    for name, part in [(FILES[0], slice(0, 300)), (FILES[1], slice(300, 400))]:
        text = "".join(usps_lines(x[part], digits.target[part]))
        (root / name).write_bytes(bz2.compress(text.encode()))
    return root


def vggctl(*args, env=ENV):
    return subprocess.run([BIN, *args], capture_output=True, text=True, timeout=300, env=env)


def test_usps_trains_and_evaluates_as_torchvision_reads_it(data, tmp_path):
    init = str(tmp_path / "init.safetensors")
    model = initial_model(init, 11)
    want_path = reference(tmp_path / "ref.safetensors", init, str(data), "--usps", "--crop-flip", "0",
                          limit=LIMIT, batch=BATCH, epochs=EPOCHS)
    want = load_file(want_path)
    assert apart(want, load_file(init)) > 1e-3, "the reference did not train"
    out = tmp_path / "run"
    r = vggctl("train", "--dataset", "usps", "--data-dir", str(data), "--no-download", "--arch", "vgg11",
               "--head", "cifar", "--initial-checkpoint", init, "--limit-train", str(LIMIT), "--limit-test", "16",
               "--epochs", str(EPOCHS), "--batch-size", str(BATCH), "--device", "cpu", "--quiet", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert apart(load_file(str(out / "last.safetensors")), want) < 1e-5
    meta = safe_open(str(out / "last.safetensors"), "pt").metadata()
    assert json.loads(meta["class_names"]) == [str(d) for d in range(10)] and meta["dataset"] == "usps"
    _, _, (mean, std) = usps(str(data))
    assert max(abs(a - b) for a, b in zip(json.loads(meta["mean"]), mean)) < 1e-12
    assert max(abs(a - b) for a, b in zip(json.loads(meta["std"]), std)) < 1e-12
    assert json.loads((out / "config.json").read_text())["hflip"] == 0.0

    # The reference's weights evaluated on the whole test split.
    images, targets, norm = usps(str(data), train=False)
    loss, correct = reference_scores(model, want, images, targets, norm)
    r = vggctl("eval", "--checkpoint", want_path, "--dataset", "usps", "--data-dir", str(data), "--no-download",
               "--device", "cpu", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["images"] == len(targets) == 100 and round(report["top1"]) == correct
    assert abs(report["loss"] - loss) <= 1e-5 * max(1.0, abs(loss))


def test_usps_downloads_and_bad_files_are_one_line(data, tmp_path):
    sums = [md5(str(data / f)) for f in FILES]
    with mirror(str(data)) as url:
        env = dict(ENV, VGGCTL_USPS_URL=url, VGGCTL_USPS_MD5=",".join(sums))
        got = tmp_path / "got"
        r = vggctl("train", "--dataset", "usps", "--data-dir", str(got), "--epochs", "1", "--limit-train", "16",
                   "--limit-test", "8", "--batch-size", "8", "--device", "cpu", "--quiet", "--out",
                   str(tmp_path / "ok"), env=env)
        assert r.returncode == 0, r.stderr
        assert sorted(os.listdir(got)) == sorted(FILES)
        assert [md5(str(got / f)) for f in FILES] == sums
        # A wrong MD5 for the test file: refused, nothing left of it.
        wrong = tmp_path / "wrong"
        env = dict(env, VGGCTL_USPS_MD5=f"{sums[0]},{'0' * 32}")
        r = vggctl("train", "--dataset", "usps", "--data-dir", str(wrong), "--epochs", "1", "--device", "cpu",
                   "--out", str(tmp_path / "w"), env=env)
        assert r.returncode == 1 and len(errors(r)) == 1 and "usps.t.bz2" in errors(r)[0], r.stderr
        assert not (wrong / "usps.t.bz2").exists() and not (tmp_path / "w").exists()

    good = (data / FILES[0]).read_bytes()
    lines = bz2.decompress(good).decode().splitlines(keepends=True)
    for content, needle in [
        (b"not bzip2", "not a bzip2 file, or a damaged one"),
        (bz2.compress("".join(lines[:4] + [lines[4].rsplit(" ", 1)[0] + "\n"]).encode()),
         "line 5: 255 values, where an image of USPS has 256"),
        (bz2.compress("".join(lines[:2] + [lines[2].replace(" 7:", " 7:1.5 8:", 1)]).encode()), "line 3: '7:1.5' is not '7:<value from -1 to 1>'"),
        (bz2.compress(("0" + lines[0][lines[0].index(" "):]).encode()), "line 1: label '0' is not 1 to 10"),
    ]:
        bad = tmp_path / "bad"
        shutil.rmtree(bad, ignore_errors=True)
        bad.mkdir()
        shutil.copy(data / FILES[1], bad / FILES[1])
        (bad / FILES[0]).write_bytes(content)
        r = vggctl("train", "--dataset", "usps", "--data-dir", str(bad), "--no-download", "--device", "cpu",
                   "--out", str(tmp_path / "run"))
        lines = errors(r)
        assert r.returncode == 1 and len(lines) == 1 and f"{bad / FILES[0]}: " in lines[0] and needle in lines[0], \
            r.stderr
        assert not (tmp_path / "run").exists()
