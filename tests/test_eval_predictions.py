"""`vggctl eval --predictions FILE`: each test image's prediction as CSV.

- Real photographs (PNG, so both sides decode the same pixels) in
  ImageNet's layout, its validation folder holding an unreadable file and
  a file whose name needs CSV quoting: one row per readable image, in
  torchvision's ImageFolder order, named by its file; the predicted class
  is the argmax of torchvision's VGG11 with the saved weights (and
  vggctl's `gap` head) under the checkpoint's Resize + CenterCrop, and the
  prediction's and the label's softmax probabilities equal torchvision's
  within 1e-5. The rows' share of `correct` is `--json`'s top-1, exactly,
  and its `top1_ci95` is scipy's Wilson interval for that count
  (`binomtest(k, n).proportion_ci(method="wilson")`) within 1e-9, as the
  training summary's final line is for its last epoch's.
  The same holds for the images held in memory, streamed (`--cache-mem 0`,
  the unreadable file inside a batch) and over two ranks
  (`--nproc-per-node 2`), whose rows are one process's.
- A CIFAR-style folder run (`train --dataset folder`): `eval`'s rows and
  `predict`'s probabilities are torchvision's under the transform it
  evaluated with (the centre square at 32·256/224, resized to 32).
- A CIFAR-10 model at --input 64: `predict` squeezes an image to 32x32
  and upsamples it as training did (CIFAR's test images: `eval`'s rows; a
  photograph: torchvision's under that transform), and `eval` on an
  image folder reads photographs as `predict` does.
- The built-in digits name their images by scikit-learn's index: every
  row's label is `load_digits().target` at that index.
- `--predictions -` writes the same CSV on stdout, instead of the report.
- An existing file needs --force (and is left alone without it), a
  missing directory or a file as the directory is refused before
  evaluating, and --force alone or
  `--predictions -` with `--json` is a usage error: one line each.
"""
import csv
import json
import os
import pickle
import re
import struct
import subprocess

import torch
import torchvision
import torchvision.transforms.functional as F
from safetensors.torch import load_file
from scipy.stats import binomtest
from sklearn.datasets import load_digits
from torchvision.io import ImageReadMode, decode_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("VGGCTL_BIN", os.path.join(ROOT, "target", "release", "vggctl"))
PHOTOS = os.path.join(ROOT, "tests", "fixtures", "photos")
# The photographs' folders as three WordNet ids (sorted, as torchvision's
# class indices are), so that training is ImageNet-style.
WNIDS = {"astronaut": "n01440764", "cat": "n02123045", "coffee": "n03000134"}
QUOTED = "a, \"quoted\" name.png"


def vggctl(*args):
    return subprocess.run([BIN, *args], capture_output=True, text=True, timeout=300)


def metadata(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))["__metadata__"]


def imagenet_layout(root):
    """ImageNet's layout with three PNG photographs per class in train/
    and val/; the cat's val folder also holds an unreadable file and a
    PNG whose name needs quoting."""
    for folder, wnid in WNIDS.items():
        pngs = sorted(n for n in os.listdir(os.path.join(PHOTOS, folder)) if n.endswith(".png"))
        for split, names in [("train", pngs[:3]), ("val", pngs[3:6])]:
            d = root / split / wnid
            d.mkdir(parents=True)
            for name in names:
                (d / name).symlink_to(os.path.join(PHOTOS, folder, name))
    cat = root / "val" / WNIDS["cat"]
    (cat / "broken.png").symlink_to(os.path.join(PHOTOS, "cat", "broken.jpg"))
    (cat / QUOTED).symlink_to(os.path.join(PHOTOS, "coffee", "coffee_01.png"))
    return root


def torchvision_rows(weights, val, resize, crop):
    """(file, label, probabilities) of each readable image of `val`, in
    ImageFolder's order, from torchvision's VGG11 with the saved weights."""
    model = torchvision.models.vgg11()
    model.avgpool = torch.nn.AdaptiveAvgPool2d(1)
    model.classifier = torch.nn.Linear(512, len(WNIDS))
    model.load_state_dict(load_file(weights))
    model.eval()
    folder = torchvision.datasets.ImageFolder(str(val), loader=lambda p: p)
    assert folder.classes == sorted(WNIDS.values())
    rows = []
    for path, label in folder.samples:
        try:
            img = decode_image(path, mode=ImageReadMode.RGB)
        except RuntimeError:
            continue
        x = F.center_crop(F.resize(img, resize, antialias=True), crop).float() / 255
        x = F.normalize(x, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
        with torch.no_grad():
            p = model(x[None]).double().softmax(1)[0]
        rows.append((path, label, p))
    return rows


def read_csv(path):
    with open(path, newline="") as f:
        r = csv.reader(f)
        assert next(r) == ["image", "label_index", "label", "predicted_index", "predicted", "probability",
                           "label_probability", "correct"]
        return list(r)


def check_rows(rows, want, classes, top1):
    assert [r[0] for r in rows] == [w[0] for w in want]
    for row, (path, label, p) in zip(rows, want):
        predicted = int(p.argmax())
        assert row[1:5] == [str(label), classes[label], str(predicted), classes[predicted]], (row, p)
        assert abs(float(row[5]) - p[predicted].item()) <= 1e-5, (row, p)
        assert abs(float(row[6]) - p[label].item()) <= 1e-5, (row, p)
        assert row[7] == str(int(predicted == label)), row
    correct = sum(int(r[7]) for r in rows)
    assert abs(100.0 * correct / len(rows) - top1) <= 1e-9, (correct, len(rows), top1)


def test_each_images_prediction_equals_torchvisions(tmp_path):
    data = imagenet_layout(tmp_path / "imagenet")
    out = tmp_path / "run"
    r = vggctl("train", "--arch", "vgg11", "--head", "gap", "--dataset", "imagenet", "--data-dir", str(data),
               "--input", "64", "--epochs", "1", "--batch-size", "3", "--keep", "last", "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    # The summary's interval is the Wilson interval of the last epoch's count.
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    n = last["test_images"]
    ci = binomtest(round(last["test_top1"] * n / 100), n).proportion_ci(method="wilson")
    assert n == 10 and f"(95% CI {100 * ci.low:.2f}-{100 * ci.high:.2f})" in r.stdout, r.stdout
    checkpoint = out / "last.safetensors"
    meta = metadata(checkpoint)
    classes = json.loads(meta["class_names"])
    want = torchvision_rows(checkpoint, data / "val", int(meta["resize"]), 64)
    assert len(want) == 10 and want[3][0].endswith(QUOTED), [w[0] for w in want]

    runs = {
        "in memory": [],
        "streamed": ["--cache-mem", "0", "--workers", "2"],
        "two ranks": ["--nproc-per-node", "2"],
    }
    for name, extra in runs.items():
        path = tmp_path / f"{name}.csv"
        r = vggctl("eval", "--checkpoint", str(checkpoint), "--batch-size", "4", "--predictions", str(path),
                   "--json", *extra)
        assert r.returncode == 0, (name, r.stderr)
        report = json.loads(r.stdout)
        assert report["images"] == 10, (name, report["images"])
        check_rows(read_csv(path), want, classes, report["top1"])
        correct = round(report["top1"] * report["images"] / 100)
        ci = binomtest(correct, report["images"]).proportion_ci(method="wilson")
        assert max(abs(a - 100 * b) for a, b in zip(report["top1_ci95"], [ci.low, ci.high])) < 1e-9, report
    # RFC 4180: the field quoted, its quotes doubled.
    assert '/a, ""quoted"" name.png",' in (tmp_path / "in memory.csv").read_text()


def test_cifar_style_folder_runs_predict_as_they_evaluate(tmp_path):
    """`train --dataset folder` (CIFAR-style) evaluates each image's centre
    square at 36 (32·256/224), bilinearly resized to 32: `eval`'s rows and
    `predict`'s probabilities are torchvision's under that transform
    (within 1e-5). Before, predict squeezed the whole image to 32x32."""
    data = imagenet_layout(tmp_path / "photos")
    out = tmp_path / "run"
    r = vggctl("train", "--arch", "vgg11", "--head", "gap", "--dataset", "folder", "--data-dir", str(data / "train"),
               "--val-dir", str(data / "val"), "--epochs", "1", "--batch-size", "3", "--keep", "last",
               "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    checkpoint = out / "last.safetensors"
    meta = metadata(checkpoint)
    assert meta["input_size"] == "32" and "resize" not in meta, meta
    model = torchvision.models.vgg11()
    model.avgpool = torch.nn.AdaptiveAvgPool2d(1)
    model.classifier = torch.nn.Linear(512, len(WNIDS))
    model.load_state_dict(load_file(checkpoint))
    model.eval()
    folder = torchvision.datasets.ImageFolder(str(data / "val"), loader=lambda p: p)
    files = [p for p, _ in folder.samples if not p.endswith("broken.png")]
    want = []
    for path in files:
        img = decode_image(path, mode=ImageReadMode.RGB)
        x = F.center_crop(F.resize(img, 36, antialias=True), 36).float() / 255
        x = F.normalize(x, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
        x = torch.nn.functional.interpolate(x[None], size=32, mode="bilinear", align_corners=False)
        with torch.no_grad():
            want.append(model(x).double().softmax(1)[0])

    path = tmp_path / "p.csv"
    r = vggctl("eval", "--checkpoint", str(checkpoint), "--predictions", str(path))
    assert r.returncode == 0, r.stderr
    rows = read_csv(path)
    assert [row[0] for row in rows] == files
    for row, p in zip(rows, want):
        assert abs(float(row[6]) - p[int(row[1])].item()) <= 1e-5, (row, p)
    r = vggctl("predict", "--checkpoint", str(checkpoint), "--json", *files)
    assert r.returncode == 0, r.stderr
    for got, p in zip(json.loads(r.stdout), want):
        for t in got["top"]:
            assert abs(t["probability"] - p[t["index"]].item()) <= 1e-5, (got, p)


def test_cifar_models_predict_at_their_32_pixels(tmp_path):
    """A CIFAR-10 model trained at --input 64 saw 32x32 images upsampled
    (bilinear) to 64: `predict` squeezes an image to 32x32 and upsamples it
    the same way, so its probabilities for CIFAR's own test images (as PNG
    files) are `eval`'s rows, and for a photograph torchvision's under
    `Resize((32, 32))` + bilinear upsampling (within 1e-5). Before, it
    resized straight to 64. `eval` of the model on an image folder reads
    the photographs the same way: its rows are predict's."""
    out = tmp_path / "run"
    r = vggctl("train", "--arch", "vgg11", "--head", "gap", "--dataset", "cifar10", "--data-dir",
               os.path.join(ROOT, "tests", "fixtures", "digits-py"), "--input", "64", "--epochs", "1",
               "--limit-train", "32", "--limit-test", "8", "--keep", "last", "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    checkpoint = out / "last.safetensors"
    path = tmp_path / "p.csv"
    r = vggctl("eval", "--checkpoint", str(checkpoint), "--limit-test", "8", "--predictions", str(path))
    assert r.returncode == 0, r.stderr
    rows = read_csv(path)
    assert [row[0] for row in rows] == [str(i) for i in range(8)]
    with open(os.path.join(ROOT, "tests", "fixtures", "digits-py", "cifar-10-batches-py", "test_batch"), "rb") as f:
        batch = pickle.load(f, encoding="latin1")
    pngs = []
    for i in range(8):
        pngs.append(str(tmp_path / f"test_{i}.png"))
        torchvision.io.write_png(torch.from_numpy(batch["data"][i].reshape(3, 32, 32)), pngs[-1])
        assert batch["labels"][i] == int(rows[i][1])
    photo = os.path.join(PHOTOS, "cat", "cat_01.png")
    r = vggctl("predict", "--checkpoint", str(checkpoint), "--json", "--topk", "10", *pngs, photo)
    assert r.returncode == 0, r.stderr
    got = [{t["index"]: t["probability"] for t in p["top"]} for p in json.loads(r.stdout)]
    for row, probs in zip(rows, got):
        assert abs(probs[int(row[3])] - float(row[5])) <= 1e-5, (row, probs)
        assert abs(probs[int(row[1])] - float(row[6])) <= 1e-5, (row, probs)

    meta = metadata(checkpoint)
    model = torchvision.models.vgg11()
    model.avgpool = torch.nn.AdaptiveAvgPool2d(1)
    model.classifier = torch.nn.Linear(512, 10)
    model.load_state_dict(load_file(checkpoint))
    model.eval()
    img = decode_image(photo, mode=ImageReadMode.RGB)
    x = F.resize(img, [32, 32], antialias=True).float() / 255
    x = F.normalize(x, json.loads(meta["mean"]), json.loads(meta["std"]))
    x = torch.nn.functional.interpolate(x[None], size=64, mode="bilinear", align_corners=False)
    with torch.no_grad():
        want = model(x).double().softmax(1)[0]
    assert all(abs(got[-1][i] - want[i].item()) <= 1e-5 for i in range(10)), (got[-1], want)

    # On an image folder (three of its classes, by name), eval reads each
    # photograph as predict does: its rows' probabilities are predict's.
    names = json.loads(meta["class_names"])
    for cls, folder in zip(names[:3], ["astronaut", "cat", "coffee"]):
        (tmp_path / "mine" / cls).mkdir(parents=True)
        for name in sorted(n for n in os.listdir(os.path.join(PHOTOS, folder)) if n.endswith(".png"))[:3]:
            (tmp_path / "mine" / cls / name).symlink_to(os.path.join(PHOTOS, folder, name))
    path = tmp_path / "mine.csv"
    r = vggctl("eval", "--checkpoint", str(checkpoint), "--dataset", "folder", "--val-dir", str(tmp_path / "mine"),
               "--predictions", str(path))
    assert r.returncode == 0, r.stderr
    rows = read_csv(path)
    assert len(rows) == 9
    r = vggctl("predict", "--checkpoint", str(checkpoint), "--json", "--topk", "10", *[row[0] for row in rows])
    assert r.returncode == 0, r.stderr
    for row, p in zip(rows, json.loads(r.stdout)):
        probs = {t["index"]: t["probability"] for t in p["top"]}
        assert abs(probs[names.index(row[4])] - float(row[5])) <= 1e-5, (row, probs)
        assert abs(probs[names.index(row[2])] - float(row[6])) <= 1e-5, (row, probs)


def test_digits_are_named_by_scikit_learns_index(tmp_path):
    out = tmp_path / "digits"
    r = vggctl("train", "--arch", "vgg11", "--dataset", "digits", "--epochs", "1", "--limit-train", "32",
               "--limit-test", "8", "--keep", "last", "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    path = tmp_path / "digits.csv"
    r = vggctl("eval", "--checkpoint", str(out / "last.safetensors"), "--predictions", str(path))
    assert r.returncode == 0, r.stderr
    rows = read_csv(path)
    target = load_digits().target
    assert len(rows) == 297
    # `-`: the same CSV on stdout, instead of the report.
    r = vggctl("eval", "--checkpoint", str(out / "last.safetensors"), "--predictions", "-")
    assert r.returncode == 0 and r.stdout == path.read_text(), r.stderr
    for row in rows:
        index = int(re.fullmatch(r"load_digits\(\)\[(\d+)\]", row[0]).group(1))
        assert row[1] == row[2] == str(target[index]), row


def test_bad_prediction_files_are_refused_before_evaluating(tmp_path):
    out = tmp_path / "digits"
    r = vggctl("train", "--arch", "vgg11", "--dataset", "digits", "--epochs", "1", "--limit-train", "16",
               "--limit-test", "8", "--keep", "last", "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    checkpoint = str(out / "last.safetensors")
    existing = tmp_path / "old.csv"
    existing.write_text("keep me\n")
    r = vggctl("eval", "--checkpoint", checkpoint, "--predictions", str(existing))
    assert r.returncode == 1 and r.stderr.splitlines() == [
        f"vggctl: error: {existing} already exists (use --force to overwrite)"], r.stderr
    assert existing.read_text() == "keep me\n" and r.stdout == ""
    missing = tmp_path / "nowhere" / "p.csv"
    r = vggctl("eval", "--checkpoint", checkpoint, "--predictions", str(missing))
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr
    assert "does not exist" in r.stderr and r.stdout == "" and not missing.parent.exists()
    r = vggctl("eval", "--checkpoint", checkpoint, "--predictions", str(existing / "p.csv"))
    assert r.returncode == 1 and r.stderr.splitlines() == [
        f"vggctl: error: {existing}/p.csv: {existing} is not a directory"], r.stderr
    r = vggctl("eval", "--checkpoint", checkpoint, "--force")
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "--predictions" in r.stderr, r.stderr
    r = vggctl("eval", "--checkpoint", checkpoint, "--predictions", "-", "--json")
    assert r.returncode == 2 and r.stderr.splitlines() == [
        "vggctl: error: --predictions - and --json both write to stdout: give --predictions a file"], r.stderr
    r = vggctl("eval", "--checkpoint", checkpoint, "--predictions", str(existing), "--force")
    assert r.returncode == 0, r.stderr
    assert len(read_csv(existing)) == 297
    assert sorted(os.listdir(tmp_path)) == ["digits", "old.csv"]
