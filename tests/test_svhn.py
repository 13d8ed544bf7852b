"""`--dataset svhn` against torchvision's own `SVHN` class, on the fixtures'
real digits written as its MAT-files (`make_datasets.py`: X 32x32x3xN, y
with the digit 0 labelled 10; y stored as double in an uncompressed file in
digits-bin, as uint8 in a zlib-compressed -v7 file in digits-py).

- VGG11 trained by vggctl for 2 epochs from each file equals PyTorch's loop
  over torchvision's images and labels (`ddp_reference.py --svhn`, SVHN's
  normalization) within 1e-5, with the recipe's crop and no flip (digits);
  so does `--extra` over the same images split into train_32x32.mat and
  extra_32x32.mat (torchvision's SVHN("train") then SVHN("extra")).
- `eval` of the reference's weights gives PyTorch's test loss (within 1e-5)
  and its exact top-1 count.
- A download from a mirror on 127.0.0.1 leaves the two files torchvision
  reads, and `--extra` fetches the third; `eval --val-on val` of an
  `--extra` run scores the part it held out of train + extra. A file cut
  short or without `y` is one error line naming it."""
import json
import os
import shutil
import subprocess
import sys

import torch
from safetensors import safe_open
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dataset_helpers import BIN, ENV, FIX, apart, initial_model, md5, mirror, reference  # noqa: E402
from ddp_reference import SVHN_NORM, normalize, svhn  # noqa: E402

LIMIT, BATCH, EPOCHS = 48, 16, 2
FILES = ["train_32x32.mat", "test_32x32.mat"]
EXTRA = "extra_32x32.mat"


def split_off_extra(src, dest, n, m):
    """`src`'s SVHN files in `dest`, its first `n` training images as
    train_32x32.mat and the next `m` as extra_32x32.mat (y as uint8, zlib
    compressed)."""
    import scipy.io
    os.makedirs(dest)
    shutil.copy(os.path.join(src, FILES[1]), os.path.join(dest, FILES[1]))
    mat = scipy.io.loadmat(os.path.join(src, FILES[0]))
    for name, part in [(FILES[0], slice(0, n)), (EXTRA, slice(n, n + m))]:
        arrays = {"X": mat["X"][..., part], "y": mat["y"][part].astype("uint8")}
        scipy.io.savemat(os.path.join(dest, name), arrays, do_compression=True)
    return str(dest)


def vggctl(*args, env=ENV):
    return subprocess.run([BIN, *args], capture_output=True, text=True, timeout=300, env=env)


def test_svhn_trains_and_evaluates_as_torchvision_reads_it(tmp_path):
    init = str(tmp_path / "init.safetensors")
    model = initial_model(init, 6)
    want_path = reference(tmp_path / "ref.safetensors", init, os.path.join(FIX, "digits-bin"), "--svhn",
                          "--crop-flip", "0", limit=LIMIT, batch=BATCH, epochs=EPOCHS)
    want = load_file(want_path)
    assert apart(want, load_file(init)) > 1e-3, "the reference did not train"
    # The same 48 images as train (30) + extra (18), read by torchvision.
    extra = split_off_extra(os.path.join(FIX, "digits-py"), tmp_path / "extra", 30, LIMIT - 30)
    both = [svhn(extra, "train"), svhn(extra, "extra")]
    whole = svhn(os.path.join(FIX, "digits-bin"), "train")
    assert (torch.from_numpy(whole.data[:LIMIT]) == torch.cat([torch.from_numpy(d.data) for d in both])).all()
    assert list(whole.labels[:LIMIT]) == [y for d in both for y in d.labels]
    for out, data, more in [("bin", os.path.join(FIX, "digits-bin"), []), ("extra", extra, ["--extra"])]:
        out = tmp_path / out
        r = vggctl("train", "--dataset", "svhn", "--data-dir", data, "--no-download", *more,
                   "--arch", "vgg11", "--head", "cifar", "--initial-checkpoint", init, "--limit-train", str(LIMIT),
                   "--limit-test", "16", "--epochs", str(EPOCHS), "--batch-size", str(BATCH), "--device", "cpu",
                   "--quiet", "--out", str(out))
        assert r.returncode == 0, r.stderr
        assert apart(load_file(str(out / "last.safetensors")), want) < 1e-5, out
        meta = safe_open(str(out / "last.safetensors"), "pt").metadata()
        assert json.loads(meta["class_names"]) == [str(d) for d in range(10)] and meta["dataset"] == "svhn"

    test = svhn(os.path.join(FIX, "digits-py"), "test")
    model.load_state_dict(want)
    model.eval()
    x, y = normalize(torch.from_numpy(test.data), *SVHN_NORM), torch.from_numpy(test.labels)
    with torch.no_grad():
        logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits, y).item()
    correct = (logits.argmax(1) == y).sum().item()
    r = vggctl("eval", "--checkpoint", want_path, "--dataset", "svhn", "--data-dir", os.path.join(FIX, "digits-bin"),
               "--no-download", "--device", "cpu", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["images"] == len(y) == 297 and round(report["top1"] * 297 / 100) == correct
    assert abs(report["loss"] - loss) <= 1e-5 * max(1.0, abs(loss))


def test_svhn_downloads_and_bad_files_are_one_line(tmp_path):
    served = split_off_extra(os.path.join(FIX, "digits-py"), tmp_path / "served", 600, 40)
    with mirror(served) as url:
        md5s = ",".join(md5(os.path.join(served, f)) for f in [*FILES, EXTRA])
        env = dict(ENV, VGGCTL_SVHN_URL=url, VGGCTL_SVHN_MD5=md5s)
        data = tmp_path / "data"
        r = vggctl("train", "--dataset", "svhn", "--data-dir", str(data), "--epochs", "1", "--limit-train", "16",
                   "--limit-test", "8", "--batch-size", "8", "--device", "cpu", "--quiet", "--out",
                   str(tmp_path / "ok"), env=env)
        assert r.returncode == 0, r.stderr
        assert sorted(os.listdir(data)) == sorted(FILES)
        ours, theirs = svhn(str(data), "train"), svhn(served, "train")
        assert (ours.data == theirs.data).all() and (ours.labels == theirs.labels).all()
        # --extra fetches the third file; the run holds out 64 of 640 images.
        r = vggctl("train", "--dataset", "svhn", "--data-dir", str(data), "--extra", "--val-on", "val", "--epochs",
                   "1", "--limit-train", "16", "--batch-size", "8", "--device", "cpu", "--quiet", "--out",
                   str(tmp_path / "extra"), env=env)
        assert r.returncode == 0, r.stderr
        assert sorted(os.listdir(data)) == sorted([*FILES, EXTRA])
        assert md5(str(data / EXTRA)) == md5(os.path.join(served, EXTRA))
    assert json.loads((tmp_path / "extra" / "config.json").read_text())["extra"] is True
    logged = json.loads((tmp_path / "extra" / "metrics.jsonl").read_text().splitlines()[0])
    assert logged["test_images"] == 64
    r = vggctl("eval", "--checkpoint", str(tmp_path / "extra" / "last.safetensors"), "--val-on", "val",
               "--no-download", "--device", "cpu", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["images"] == 64 and report["split"] == "val"
    assert abs(report["loss"] - logged["test_loss"]) <= 1e-5 * logged["test_loss"], (report, logged)

    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(os.path.join(FIX, "digits-bin", "test_32x32.mat"), bad / "test_32x32.mat")
    whole = open(os.path.join(FIX, "digits-bin", "train_32x32.mat"), "rb").read()
    import scipy.io
    for name, content in [("cut", whole[: len(whole) // 2]), ("no y", None)]:
        if content is None:
            scipy.io.savemat(str(bad / "train_32x32.mat"), {"X": scipy.io.loadmat(str(bad / "test_32x32.mat"))["X"]})
        else:
            (bad / "train_32x32.mat").write_bytes(content)
        r = vggctl("train", "--dataset", "svhn", "--data-dir", str(bad), "--no-download", "--device", "cpu",
                   "--out", str(tmp_path / "run"))
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1 and "train_32x32.mat" in lines[0], (name, r.stderr)
        assert ("cut short" in lines[0]) if content else ("no 'y' array" in lines[0]), lines[0]
        assert not (tmp_path / "run").exists()


def test_svhn_files_of_another_shape_or_version_are_one_line(tmp_path):
    """Images of 28x28, a label 11, a MAT-file of version 7.3 (HDF5) and a
    big-endian one: one error line naming the file, exit 1."""
    import numpy as np
    import scipy.io
    mat = scipy.io.loadmat(os.path.join(FIX, "digits-bin", "test_32x32.mat"))
    X, y = mat["X"], mat["y"]
    header = open(os.path.join(FIX, "digits-bin", "test_32x32.mat"), "rb").read()
    cases = [
        ({"X": X[2:30, 2:30], "y": y}, "dimensions [28, 28, 3, 297], expected 32 x 32 x 3 x N"),
        ({"X": X, "y": np.where(np.arange(len(y))[:, None] == 3, 11.0, y)}, "label 3 is 11, not one of 0..10"),
        (b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: HDF5 schema 1.00".ljust(128, b" "), "version 7.3"),
        (header[:126] + b"MI" + header[128:], "big-endian"),
    ]
    for k, (content, needle) in enumerate(cases):
        d = tmp_path / f"d{k}"
        d.mkdir()
        shutil.copy(os.path.join(FIX, "digits-bin", "train_32x32.mat"), d / "train_32x32.mat")
        if isinstance(content, dict):
            scipy.io.savemat(str(d / "test_32x32.mat"), content)
        else:
            (d / "test_32x32.mat").write_bytes(content)
        r = vggctl("train", "--dataset", "svhn", "--data-dir", str(d), "--no-download", "--device", "cpu",
                   "--out", str(tmp_path / "run"))
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1 and "test_32x32.mat" in lines[0] and needle in lines[0], r.stderr
        assert not (tmp_path / "run").exists()
