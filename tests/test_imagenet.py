"""ImageNet's layout (DIR/train/<wnid>/, DIR/val/<wnid>/) made of real
scikit-image photographs: JPEG and PNG, landscape and portrait, one
grayscale, one CMYK and one truncated JPEG.

- Streamed (`--cache-mem 0`), fine-tuning trains and evaluates on it: the
  truncated file is skipped with a warning naming it each epoch (with
  --strict it is the error), the grayscale and CMYK photos are read; the
  checkpoint names the classes by torchvision's names for their WordNet
  ids; `predict` and `eval` name them too, and eval counts every val image.
- `train --dataset imagenet` from scratch takes torchvision's reference
  recipe for what the command line leaves out (weight decay 1e-4, the LR
  decays at 30 and 60, 90 epochs, batch 32, 224 crops) and keeps what it
  gives.
"""
import json
import os
import struct
import subprocess

import pytest
from PIL import Image
from skimage import data as skdata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("VGGCTL_BIN", os.path.join(ROOT, "target", "release", "vggctl"))
WEIGHTS = os.path.join(ROOT, "tests", "fixtures", "pth", "vgg11.legacy.pth")
CIFAR_WEIGHTS = os.path.join(ROOT, "tests", "fixtures", "pth", "vgg11-cifar.zip.pth")
# torchvision's class names of these WordNet ids.
CLASSES = {"n01440764": "tench", "n02123045": "tabby", "n03000134": "chainlink fence"}
PHOTOS = {
    "n01440764": ["astronaut", "coffee"],
    "n02123045": ["chelsea", "rocket"],
    "n03000134": ["hubble_deep_field", "immunohistochemistry"],
}


def vggctl(*args, cwd=None):
    return subprocess.run([BIN, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    for split in ["train", "val"]:
        for wnid, names in PHOTOS.items():
            d = root / split / wnid
            d.mkdir(parents=True)
            for name in names:
                img = Image.fromarray(getattr(skdata, name)()).convert("RGB")
                shapes = [(300, 220, "JPEG"), (200, 290, "png")][: 2 if split == "train" else 1]
                for w, h, ext in shapes:
                    img.resize((w, h)).save(d / f"{name}_{w}x{h}.{ext}", quality=90)
    odd = root / "train" / "n01440764"
    Image.fromarray(skdata.camera()).resize((260, 200)).save(odd / "gray.JPEG")
    Image.fromarray(skdata.astronaut()).resize((240, 200)).convert("CMYK").save(odd / "cmyk.JPEG")
    whole = (odd / "astronaut_300x220.JPEG").read_bytes()
    (odd / "truncated.JPEG").write_bytes(whole[: len(whole) // 2])
    return root


def metadata(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))["__metadata__"]


def test_a_streamed_imagenet_folder_trains_and_names_its_classes(imagenet, tmp_path):
    out = tmp_path / "ft"
    r = vggctl("finetune", "--weights", WEIGHTS, "--arch", "vgg11", "--dataset", "imagenet",
               "--data-dir", str(imagenet), "--input", "32", "--epochs", "2", "--batch-size", "4",
               "--cache-mem", "0", "--workers", "2", "--keep", "last", "--out", str(out))
    assert r.returncode == 0, r.stderr
    # 12 photos, the gray, CMYK and truncated files to train on, 6 to
    # validate: streaming counts files (the truncated one is skipped when read).
    assert "on imagenet (15 train / 6 val images" in r.stderr, r.stderr
    skips = [l for l in r.stderr.splitlines() if "skipped" in l]
    assert len(skips) == 2 and all("skipped 1 unreadable image" in l and "truncated.JPEG" in l for l in skips), r.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["dataset"] == "imagenet" and config["streamed"] is True
    meta = metadata(out / "last.safetensors")
    assert json.loads(meta["class_names"]) == [CLASSES[w] for w in sorted(CLASSES)]

    r = vggctl("predict", "--checkpoint", str(out / "last.safetensors"), "--topk", "3",
               "--json", str(imagenet / "val" / "n02123045"))
    assert r.returncode == 0, r.stderr
    predicted = json.loads(r.stdout)
    names = {c["label"] for p in predicted for c in p["top"]}
    assert names == set(CLASSES.values()), predicted

    r = vggctl("eval", "--checkpoint", str(out / "last.safetensors"), "--cache-mem", "0", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["dataset"] == "imagenet" and report["classes"] == [CLASSES[w] for w in sorted(CLASSES)]
    assert report["images"] == 6 and sum(report["support"]) == 6, report

    r = vggctl("finetune", "--weights", WEIGHTS, "--arch", "vgg11", "--dataset", "imagenet",
               "--data-dir", str(imagenet), "--input", "32", "--epochs", "1", "--cache-mem", "0",
               "--strict", "--out", str(tmp_path / "strict"), "--quiet")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "truncated.JPEG" in lines[0] and "--strict" in lines[0], r.stderr


def test_training_imagenet_from_scratch_takes_torchvisions_recipe(imagenet, tmp_path):
    out = tmp_path / "scratch"
    r = vggctl("train", "--arch", "vgg11", "--dataset", "imagenet", "--data-dir", str(imagenet),
               "--epochs", "1", "--lr", "0.02", "--limit-train", "2", "--limit-test", "2",
               "--keep", "last", "--out", str(out), "--quiet", "--scale", "0.35,1", "--ratio", "0.5,2")
    assert r.returncode == 0, r.stderr
    assert "is ignored" not in r.stderr, r.stderr
    c = json.loads((out / "config.json").read_text())
    # timm's RandomResizedCrop ranges, recorded for the run's resume.
    assert c["crop_range"] == {"scale": [0.35, 1.0], "ratio": [0.5, 2.0]}
    assert c["optimizer"]["weight_decay"] == 1e-4 and c["optimizer"]["momentum"] == 0.9
    assert (c["milestones"], c["batch_size"], c["input_size"]) == ([30, 60], 32, 224)
    assert (c["epochs"], c["lr"], c["augment"]) == (1, 0.02, "resized_crop")
    assert c["model"]["head"] == "imagenet" and c["model"]["classes"] == 3
    meta = metadata(out / "last.safetensors")
    assert json.loads(meta["class_names"]) == [CLASSES[w] for w in sorted(CLASSES)]

    # Class folders that are not WordNet ids: one line naming the first.
    bad = tmp_path / "bad"
    for split in ["train", "val"]:
        for name in ["cats", "dogs"]:
            (bad / split / name).mkdir(parents=True)
            Image.fromarray(skdata.chelsea()).save(bad / split / name / "c.png")
    r = vggctl("train", "--dataset", "imagenet", "--data-dir", str(bad), "--out", str(tmp_path / "x"))
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "train/cats" in lines[0] and "WordNet" in lines[0], r.stderr

    # A folder that is not the layout (its class folders directly, as
    # ImageNet-R ships): one line saying what the layout is, for train,
    # prepare and eval alike; nothing written.
    flat = imagenet / "val"
    layout = f"vggctl: error: {flat}: no train/ folder: --dataset imagenet reads DIR/train/<wnid>/ and DIR/val/<wnid>/"
    for args in [["train", "--out", str(tmp_path / "y")], ["prepare", "--out", str(tmp_path / "y.vggdata")]]:
        r = vggctl(*args, "--dataset", "imagenet", "--data-dir", str(flat))
        assert r.returncode == 1 and r.stderr.startswith(layout) and len(r.stderr.splitlines()) == 1, r.stderr
    r = vggctl("eval", "--checkpoint", CIFAR_WEIGHTS, "--dataset", "imagenet", "--data-dir", str(flat), "--device", "cpu")
    assert r.returncode == 1 and r.stderr.splitlines()[-1].startswith(layout.replace("no train/", "no val/")), r.stderr
    assert not (tmp_path / "y").exists() and not (tmp_path / "y.vggdata").exists()
