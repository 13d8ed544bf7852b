"""`--dataset stl10` against torchvision's own `STL10` class, on real
photographs written as its binary files: 96x96 crops of ten of
scikit-image's photographs (one class each) at seeded places, each image
three planes stored column by column, labels 1..10, the class names, a few
unlabelled images and the folds (torchvision's integrity check reads every
file; it is fed the files' own MD5s).

- VGG11 trained by vggctl for 2 epochs at the images' own 96x96 (the
  default input) equals PyTorch's loop over torchvision's images and
  labels (`ddp_reference.py --stl10`) within 1e-5, with the recipe's crop
  and flip, both normalized by the training images' own per-channel mean
  and deviation; the checkpoint records those (within 1e-12 of numpy's),
  the class names and the dataset.
- `eval` of the reference's weights gives PyTorch's test loss (within
  1e-5) and its exact top-1 count.
- A download of the archive from 127.0.0.1 leaves the folder torchvision
  reads (every member) beside the archive; a file cut short, a label 0, a
  label count that is not the image count and a class list of nine names
  are one error line naming the file, exit 1, and no run directory.
- `--fold K` trains on torchvision's `STL10(folds=K)`, and `features
  --split train --fold K` saves that fold's rows and labels."""
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dataset_helpers import BIN, ENV, apart, initial_model, md5, mirror, reference  # noqa: E402
from ddp_reference import normalize, stl10, stl10_norm  # noqa: E402
import vgg_reference  # noqa: E402

PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
          "colorwheel", "retina", "stereo_motorcycle", "grass"]
NAMES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
TRAIN, TEST = 4, 2  # images per class
LIMIT, BATCH, EPOCHS = 16, 8, 2


def photo(name):
    import skimage.data
    img = getattr(skimage.data, name)()
    img = img[0] if isinstance(img, tuple) else img
    return np.stack([img] * 3, -1) if img.ndim == 2 else img[..., :3]


def stl_bytes(images):
    """N x 96 x 96 x 3 uint8 as STL-10 stores it: N x 3 planes, each column by column."""
    return np.ascontiguousarray(images.transpose(0, 3, 2, 1)).tobytes()


def write_stl10(root):
    """The folder torchvision reads, from seeded crops of the photographs."""
    rng = np.random.default_rng(10)
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    splits = {"train": ([], []), "test": ([], [])}
    for label, name in enumerate(PHOTOS):
        img = photo(name)
        for split, count in [("train", TRAIN), ("test", TEST)]:
            for _ in range(count):
                y, x = rng.integers(img.shape[0] - 96), rng.integers(img.shape[1] - 96)
                splits[split][0].append(img[y:y + 96, x:x + 96])
                splits[split][1].append(label + 1)
    for split, (images, labels) in splits.items():
        order = rng.permutation(len(labels))
        (folder / f"{split}_X.bin").write_bytes(stl_bytes(np.stack(images)[order]))
        (folder / f"{split}_y.bin").write_bytes(np.array(labels, np.uint8)[order].tobytes())
    (folder / "unlabeled_X.bin").write_bytes(stl_bytes(np.stack(splits["test"][0][:2])))
    (folder / "class_names.txt").write_text("\n".join(NAMES) + "\n")
    (folder / "fold_indices.txt").write_text("\n".join(" ".join(str(i) for i in range(k, 40, 10))
                                                       for k in range(10)) + "\n")
    return folder


def vggctl(*args, env=ENV):
    return subprocess.run([BIN, *args], capture_output=True, text=True, timeout=300, env=env)


def test_stl10_trains_and_evaluates_as_torchvision_reads_it(tmp_path):
    data = tmp_path / "data"
    write_stl10(data)
    init = str(tmp_path / "init.safetensors")
    model = initial_model(init, 7)
    want_path = reference(tmp_path / "ref.safetensors", init, str(data), "--stl10", "--crop-flip", "0.5",
                          limit=LIMIT, batch=BATCH, epochs=EPOCHS)
    want = load_file(want_path)
    assert apart(want, load_file(init)) > 1e-3, "the reference did not train"
    out = tmp_path / "run"
    r = vggctl("train", "--dataset", "stl10", "--data-dir", str(data), "--no-download", "--arch", "vgg11",
               "--head", "cifar", "--initial-checkpoint", init, "--limit-train", str(LIMIT), "--limit-test", "8",
               "--epochs", str(EPOCHS), "--batch-size", str(BATCH), "--device", "cpu", "--quiet", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert apart(load_file(str(out / "last.safetensors")), want) < 1e-5
    meta = safe_open(str(out / "last.safetensors"), "pt").metadata()
    assert json.loads(meta["class_names"]) == NAMES and meta["dataset"] == "stl10"
    assert json.loads(meta["input_size"]) == 96
    train = stl10(str(data), "train")
    mean, std = stl10_norm(train)
    assert np.abs(np.array(json.loads(meta["mean"])) - mean).max() < 1e-12
    assert np.abs(np.array(json.loads(meta["std"])) - std).max() < 1e-12

    test = stl10(str(data), "test")
    model.load_state_dict(want)
    model.eval()
    x, y = normalize(torch.from_numpy(test.data), mean, std), torch.from_numpy(test.labels).long()
    with torch.no_grad():
        logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits, y).item()
    correct = (logits.argmax(1) == y).sum().item()
    r = vggctl("eval", "--checkpoint", want_path, "--dataset", "stl10", "--data-dir", str(data), "--no-download",
               "--device", "cpu", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["images"] == len(y) == 10 * TEST and round(report["top1"] * len(y) / 100) == correct
    assert abs(report["loss"] - loss) <= 1e-5 * max(1.0, abs(loss))


def test_a_fold_trains_on_torchvisions_fold(tmp_path):
    """`--fold 3` trains on line 3 of fold_indices.txt as torchvision's
    `STL10(folds=3)` holds it (normalized by the whole split, as without a
    fold), recorded in config.json; fold 10, and a fold naming an image
    that is not there, are one line each."""
    data = tmp_path / "data"
    folder = write_stl10(data)
    init = str(tmp_path / "init.safetensors")
    initial_model(init, 8)
    want = load_file(reference(tmp_path / "ref.safetensors", init, str(data), "--stl10", "--stl10-fold", "3",
                               "--crop-flip", "0.5", limit=LIMIT, batch=2, epochs=EPOCHS))
    assert apart(want, load_file(init)) > 1e-3, "the reference did not train"
    assert len(stl10(str(data), folds=3).labels) == 4
    out = tmp_path / "run"
    args = ["train", "--dataset", "stl10", "--data-dir", str(data), "--no-download", "--arch", "vgg11", "--head",
            "cifar", "--initial-checkpoint", init, "--limit-test", "4", "--epochs", str(EPOCHS), "--batch-size", "2",
            "--device", "cpu", "--quiet"]
    r = vggctl(*args, "--fold", "3", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert apart(load_file(str(out / "last.safetensors")), want) < 1e-5
    assert json.loads((out / "config.json").read_text())["fold"] == 3
    # `features --split train --fold 3`: the fold's rows (logits of the
    # run's weights, as eval reads the images) and labels, in its order.
    feats = tmp_path / "fold.safetensors"
    r = vggctl("features", "--checkpoint", str(out / "last.safetensors"), "--dataset", "stl10", "--data-dir",
               str(data), "--no-download", "--split", "train", "--fold", "3", "--layer", "classifier.3",
               "--device", "cpu", "-o", str(feats))
    assert r.returncode == 0, r.stderr
    fold, rows = stl10(str(data), folds=3), load_file(str(feats))
    model = vgg_reference.build("vgg11", False, "cifar", 10)
    model.load_state_dict(load_file(str(out / "last.safetensors")))
    with torch.no_grad():
        logits = model.eval()(normalize(torch.from_numpy(fold.data), *stl10_norm(stl10(str(data), "train"))))
    assert rows["labels"].tolist() == fold.labels.tolist()
    assert (rows["classifier.3"] - logits).abs().max() <= 1e-5 * logits.abs().max()

    r = vggctl(*args, "--fold", "10", "--out", str(tmp_path / "r10"))
    assert r.returncode == 2 and r.stderr.strip() == "vggctl: error: --fold 10: STL-10's folds are 0 to 9", r.stderr
    (folder / "fold_indices.txt").write_text("0 1\n2 40\n")
    r = vggctl(*args, "--fold", "1", "--out", str(tmp_path / "r1"))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and lines == [
        f"vggctl: error: {folder}/fold_indices.txt: fold 1 lists \"40\", not one of the 40 training images' indices"
    ], r.stderr
    assert not (tmp_path / "r10").exists() and not (tmp_path / "r1").exists()


def test_stl10_downloads_and_bad_files_are_one_line(tmp_path):
    served = tmp_path / "served"
    folder = write_stl10(tmp_path / "made")
    served.mkdir()
    archive = served / "stl10_binary.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="stl10_binary")
        tar.addfile(tarfile.TarInfo("elsewhere.txt"), io.BytesIO(b""))
    with mirror(str(served)) as url:
        env = dict(ENV, VGGCTL_STL10_URL=url + "stl10_binary.tar.gz", VGGCTL_STL10_MD5=md5(str(archive)))
        data = tmp_path / "data"
        r = vggctl("train", "--dataset", "stl10", "--data-dir", str(data), "--epochs", "1", "--limit-train", "8",
                   "--limit-test", "4", "--batch-size", "8", "--input", "32", "--device", "cpu", "--quiet",
                   "--out", str(tmp_path / "ok"), env=env)
        assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(data)) == ["stl10_binary", "stl10_binary.tar.gz"]
    assert sorted(os.listdir(data / "stl10_binary")) == sorted(os.listdir(folder))
    ours, theirs = stl10(str(data), "train"), stl10(str(tmp_path / "made"), "train")
    assert (ours.data == theirs.data).all() and (ours.labels == theirs.labels).all()

    x = (folder / "train_X.bin").read_bytes()
    y = (folder / "train_y.bin").read_bytes()
    cases = [
        ("train_X.bin", x[:-100], "train_X.bin: 1105820 bytes is not a whole number of 27648-byte images"),
        ("train_y.bin", b"\x00" + y[1:], "train_y.bin: label 0 is 0, not one of 1..10"),
        ("train_y.bin", y[:-1], "train_y.bin: 39 labels for the 40 images of"),
        ("class_names.txt", "\n".join(NAMES[:9]).encode(), "class_names.txt: lists 9 class names, STL-10 has 10"),
    ]
    for name, content, needle in cases:
        bad = tmp_path / "bad"
        shutil.rmtree(bad, ignore_errors=True)
        shutil.copytree(folder, bad / "stl10_binary")
        (bad / "stl10_binary" / name).write_bytes(content)
        r = vggctl("train", "--dataset", "stl10", "--data-dir", str(bad), "--no-download", "--device", "cpu",
                   "--out", str(tmp_path / "run"))
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1 and needle in lines[0], (name, r.stderr)
        assert not (tmp_path / "run").exists()
