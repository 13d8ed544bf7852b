"""The image sides of torchvision's reference train.py: `--input` (alias
`--val-crop-size`), `--train-crop-size` and `--val-resize-size`.

- `train --dataset imagenet --input 64 --train-crop-size 48
  --val-resize-size 80` on real photographs (PNG, so both sides decode the
  same pixels) in ImageNet's layout: the run says which sides it uses,
  records them (config.json, the checkpoint's `input_size` and `resize`),
  and its last epoch's validation loss is that of torchvision's VGG11 with
  the saved weights (and vggctl's `gap` head) under `Resize(80) +
  CenterCrop(64)` (within 1e-5
  relative); `eval` of the checkpoint takes the same transform from its
  metadata and gets the same loss; `eval --input 96` and `predict --input
  96` scale the resize with the crop (Resize(120) + CenterCrop(96): loss
  within 1e-5 relative, probabilities within 1e-5); `eval` and `predict`
  take torchvision's `--val-resize-size 72 --val-crop-size 64` as
  Resize(72) + CenterCrop(64) (the same tolerances), and a resize under
  the crop is a usage line. (That training batches are 48x48 is a
  unit test of `Preprocess`, for the in-memory and the streamed path.)
- `train --dataset digits --input 40` trains CIFAR-style at 40 and records it.
- Sides that cannot work are one usage line each, before anything is
  written: a crop size for CIFAR-style training, an evaluation resize
  smaller than its crop, a side under 32 or over 4096.
- `--resume auto` with other sides than the run's is refused, naming them.
"""
import json
import os
import struct
import subprocess

import torch
import torchvision
import torchvision.transforms.functional as F
from safetensors.torch import load_file
from torchvision.io import ImageReadMode, decode_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("VGGCTL_BIN", os.path.join(ROOT, "target", "release", "vggctl"))
PHOTOS = os.path.join(ROOT, "tests", "fixtures", "photos")
# Three WordNet ids (sorted, as torchvision's class indices are) for the
# three folders of photographs.
WNIDS = {"astronaut": "n01440764", "cat": "n02123045", "coffee": "n03000134"}


def vggctl(*args, cwd=None):
    return subprocess.run([BIN, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def metadata(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))["__metadata__"]


def imagenet_layout(root):
    for split, names in [("train", slice(0, 3)), ("val", slice(3, 6))]:
        for folder, wnid in WNIDS.items():
            d = root / split / wnid
            d.mkdir(parents=True)
            pngs = sorted(n for n in os.listdir(os.path.join(PHOTOS, folder)) if n.endswith(".png"))
            for name in pngs[names]:
                (d / name).symlink_to(os.path.join(PHOTOS, folder, name))
    return root


def torchvision_model(weights):
    """torchvision's VGG11 with vggctl's `gap` head (global average
    pooling, then one Linear) and the saved weights."""
    model = torchvision.models.vgg11()
    model.avgpool = torch.nn.AdaptiveAvgPool2d(1)
    model.classifier = torch.nn.Linear(512, len(WNIDS))
    model.load_state_dict(load_file(weights))
    return model.eval()


def eval_input(path, resize, crop):
    img = decode_image(str(path), mode=ImageReadMode.RGB)
    img = F.center_crop(F.resize(img, resize, antialias=True), crop).float() / 255
    return F.normalize(img, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def torchvision_loss(weights, val, resize, crop):
    xs, ys = [], []
    for i, wnid in enumerate(sorted(WNIDS.values())):
        for name in sorted(os.listdir(val / wnid)):
            xs.append(eval_input(val / wnid / name, resize, crop))
            ys.append(i)
    with torch.no_grad():
        logits = torchvision_model(weights)(torch.stack(xs))
    return torch.nn.functional.cross_entropy(logits, torch.tensor(ys)).item(), len(ys)


def torchvision_probabilities(weights, image, resize, crop):
    with torch.no_grad():
        logits = torchvision_model(weights)(eval_input(image, resize, crop)[None])
    return logits.softmax(1)[0].tolist()


def test_imagenet_style_sides_equal_torchvisions_transforms(tmp_path):
    data = imagenet_layout(tmp_path / "imagenet")
    out = tmp_path / "run"
    sides = ["--input", "64", "--train-crop-size", "48", "--val-resize-size", "80"]
    r = vggctl("train", "--arch", "vgg11", "--head", "gap", "--dataset", "imagenet", "--data-dir", str(data), *sides,
               "--epochs", "1", "--batch-size", "3", "--keep", "last", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "(9 train / 9 val images, 48x48 training, 64x64 evaluation (resized to 80 first))" in r.stderr, r.stderr
    config = json.loads((out / "config.json").read_text())
    assert (config["input_size"], config["train_crop_size"], config["val_resize_size"]) == (64, 48, 80)
    meta = metadata(out / "last.safetensors")
    assert (meta["input_size"], meta["resize"]) == ("64", "80"), meta

    loss, images = torchvision_loss(out / "last.safetensors", data / "val", 80, 64)
    ran = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["test_loss"]
    assert abs(ran - loss) <= 1e-5 * loss, (ran, loss)
    r = vggctl("eval", "--checkpoint", str(out / "last.safetensors"), "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["images"] == images and abs(report["loss"] - loss) <= 1e-5 * loss, (report["loss"], loss)

    # eval and predict at another --input: the resize keeps its ratio to
    # the crop (80/64), so 96 is Resize(120) + CenterCrop(96).
    loss, _ = torchvision_loss(out / "last.safetensors", data / "val", 120, 96)
    r = vggctl("eval", "--checkpoint", str(out / "last.safetensors"), "--input", "96", "--json")
    assert r.returncode == 0, r.stderr
    assert abs(json.loads(r.stdout)["loss"] - loss) <= 1e-5 * loss, (r.stdout, loss)
    image = next(iter(sorted((data / "val" / WNIDS["cat"]).iterdir())))
    r = vggctl("predict", "--checkpoint", str(out / "last.safetensors"), "--input", "96", "--json", str(image))
    assert r.returncode == 0, r.stderr
    ours = {t["index"]: t["probability"] for t in json.loads(r.stdout)[0]["top"]}
    want = torchvision_probabilities(out / "last.safetensors", image, 120, 96)
    assert all(abs(ours[i] - want[i]) <= 1e-5 for i in ours), (ours, want)

    # torchvision's names for eval's sides: --val-resize-size and
    # --val-crop-size set Resize(R) + CenterCrop(H) whatever the checkpoint
    # records (here 72 for its 80).
    loss, _ = torchvision_loss(out / "last.safetensors", data / "val", 72, 64)
    r = vggctl("eval", "--checkpoint", str(out / "last.safetensors"), "--val-resize-size", "72",
               "--val-crop-size", "64", "-b", "4", "--json")
    assert r.returncode == 0, r.stderr
    assert abs(json.loads(r.stdout)["loss"] - loss) <= 1e-5 * loss, (r.stdout, loss)
    r = vggctl("predict", "--checkpoint", str(out / "last.safetensors"), "--val-resize-size", "72", "--json",
               str(image))
    assert r.returncode == 0, r.stderr
    ours = {t["index"]: t["probability"] for t in json.loads(r.stdout)[0]["top"]}
    want = torchvision_probabilities(out / "last.safetensors", image, 72, 64)
    assert all(abs(ours[i] - want[i]) <= 1e-5 for i in ours), (ours, want)
    r = vggctl("eval", "--checkpoint", str(out / "last.safetensors"), "--val-resize-size", "60")
    assert (r.returncode, r.stderr) == (2, "vggctl: error: --val-resize-size 60 is under the crop 64: "
                                           "give 64 or more\n"), r.stderr

    # --resume auto continues only the same run: other sides are named.
    r = vggctl("train", "--arch", "vgg11", "--head", "gap", "--dataset", "imagenet", "--data-dir", str(data),
               "--input", "64", "--train-crop-size", "56", "--val-resize-size", "80",
               "--epochs", "2", "--batch-size", "3", "--keep", "last", "--out", str(out), "--resume", "auto")
    assert r.returncode == 1 and "train_crop_size" in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr


def test_cifar_style_training_takes_input(tmp_path):
    out = tmp_path / "digits"
    r = vggctl("train", "--arch", "vgg11", "--dataset", "digits", "--input", "40", "--epochs", "1",
               "--limit-train", "32", "--limit-test", "32", "--keep", "last", "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "config.json").read_text())["input_size"] == 40
    meta = metadata(out / "last.safetensors")
    assert meta["input_size"] == "40" and "resize" not in meta, meta


def test_sides_that_cannot_work_are_usage_errors(tmp_path):
    data = imagenet_layout(tmp_path / "imagenet")
    out = tmp_path / "never"
    imagenet = ["--dataset", "imagenet", "--data-dir", str(data)]
    cases = [
        (["--dataset", "digits", "--train-crop-size", "48"],
         "--train-crop-size applies to ImageNet-style training"),
        (["--dataset", "digits", "--val-resize-size", "48"],
         "--val-resize-size applies to ImageNet-style training"),
        ([*imagenet, "--input", "128", "--val-resize-size", "100"],
         "--val-resize-size 100 is smaller than evaluation's centre crop, --input 128"),
        ([*imagenet, "--val-resize-size", "200"],
         "--val-resize-size 200 is smaller than evaluation's centre crop, --input 224"),
        ([*imagenet, "--val-crop-size", "16"], "--input 16 is too small"),
        ([*imagenet, "--train-crop-size", "5000"], "--train-crop-size 5000 is too large: sides go up to 4096, what a checkpoint records"),
    ]
    for args, message in cases:
        r = vggctl("train", *args, "--out", str(out))
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"vggctl: error: {message}"), (args, r.stderr)
        assert not out.exists()
    r = vggctl("finetune", "--dataset", "digits", "--train-crop-size", "48", "--out", str(out))
    assert r.returncode == 2 and "applies to ImageNet-style training" in r.stderr, r.stderr
