"""`--dataset imagenette-160px` (and its sizes) against torchvision's own
`Imagenette` reader on the same folders. The layout is torchvision's,
`imagenette2-160/{train,val}/<wnid>/<image>.JPEG`, made of real
photographs (scikit-image's) cut into distinct 64x64 windows: two of each
of the ten classes to train on (JPEG), two to validate on (PNG data in
`.JPEG` files, so both sides normalize the same bytes), a `.png` in a class
folder that torchvision's reader (`.jpeg` only) leaves out, and the
`noisy_imagenette.csv` no reader needs.

- Downloaded from a mirror on 127.0.0.1 as the archive torchvision
  downloads (with members no reader needs, and one trying to leave the
  folder), then `eval --weights` of torchvision's VGG11 (ImageNet's 1,000
  classes) scores its val split over the ten classes: its loss and top-1
  those of torchvision's VGG11 on torchvision's `Imagenette(split="val")`
  with the ten classes' logits, within 1e-5. Only the class folders'
  `.JPEG` files are extracted.
- `train` trains it by torchvision's ImageNet recipe (its weight decay,
  milestones, batch and random resized crops), names the classes as
  torchvision's ImageNet names them, and `eval` of the run on the file
  `prepare` makes of it equals `eval` on the folder.
- Folders that are not Imagenette's, splits whose classes differ and a
  missing dataset are one line each.
"""
import io
import json
import os
import shutil
import sys
import tarfile

import numpy as np
import pytest
import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dataset_helpers import FIX, errors, md5, mirror, save_window, vggctl  # noqa: E402

WEIGHTS = os.path.join(FIX, "pth", "vgg11.legacy.pth")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
WNIDS = ["n01440764", "n02102040", "n02979186", "n03000684", "n03028079", "n03394916", "n03417042",
         "n03425413", "n03445777", "n03888257"]
FOLDER = "imagenette2-160"


def make_imagenette(base):
    """Imagenette's layout in `base` (`ROOT/imagenette2-160`)."""
    for s, split in enumerate(["train", "val"]):
        for c, wnid in enumerate(WNIDS):
            folder = base / split / wnid
            folder.mkdir(parents=True)
            for k in range(2):
                save_window(folder / f"{wnid}_{k}.JPEG", 40 * s + 4 * c + k, split == "val")
    save_window(base / "train" / WNIDS[3] / "extra.png", 99, True)
    (base / "noisy_imagenette.csv").write_text("path,noisy_labels_0\n")


@pytest.fixture(scope="module")
def imagenette(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenette")
    make_imagenette(root / FOLDER)
    return root


def serve(base, out):
    """The archive as published (holding `imagenette2-160/`, with members
    no reader needs, one trying to leave the folder) in `out`; its MD5."""
    out.mkdir()
    path = out / f"{FOLDER}.tgz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(base, arcname=FOLDER)
        for extra in ["train/n01440764/../../../evil.JPEG", "test/n01440764/a.JPEG", "README.md"]:
            info = tarfile.TarInfo(f"{FOLDER}/{extra}")
            info.size = 5
            tar.addfile(info, io.BytesIO(b"extra"))
    return md5(str(path))


def torchvisions_scores(root):
    """torchvision's VGG11 on `Imagenette(split="val")`: the loss and top-1
    (in %) over all 1,000 classes and over the ten classes' logits alone,
    and the classes' names."""
    ds = torchvision.datasets.Imagenette(str(root), split="val", size="160px")
    model = torchvision.models.vgg11()
    model.load_state_dict(torch.load(WEIGHTS, weights_only=True))
    x = torch.stack([torch.from_numpy(np.array(ds[i][0])).permute(2, 0, 1) for i in range(len(ds))])
    labels = torch.tensor([t for _, t in ds._samples])
    # ImageNet's index of each class, by torchvision's name for it.
    categories = torchvision.models.VGG11_Weights.IMAGENET1K_V1.meta["categories"]
    index = torch.tensor([categories.index(names[0]) for names in ds.classes])
    with torch.no_grad():
        logits = model.eval()(torchvision.transforms.functional.normalize(x.float() / 255, MEAN, STD)).double()

    def scores(out, target):
        loss = torch.nn.functional.cross_entropy(out, target).item()
        return loss, 100 * (out.argmax(1) == target).double().mean().item()

    return scores(logits, index[labels]), scores(logits[:, index], labels), [n[0] for n in ds.classes]


def test_a_download_is_scored_over_its_ten_classes_as_torchvision_scores_it(imagenette, tmp_path):
    served, data = tmp_path / "served", tmp_path / "data"
    env = dict(os.environ, VGGCTL_IMAGENETTE_160PX_MD5=serve(imagenette / FOLDER, served))
    with mirror(str(served)) as url:
        r = vggctl("eval", "--weights", WEIGHTS, "--arch", "vgg11", "--dataset", "imagenette-160px",
                   "--data-dir", str(data), "--data-url", url, "--input", "64", "--val-resize-size", "64",
                   "--json", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    # torchvision keeps the archive beside the folder; only the class
    # folders' .JPEG files are extracted.
    assert sorted(os.listdir(data)) == [FOLDER, f"{FOLDER}.tgz"]
    assert sorted(os.listdir(data / FOLDER)) == ["train", "val"]
    assert sorted(os.listdir(data / FOLDER / "train")) == WNIDS
    assert sorted(os.listdir(data / FOLDER / "train" / WNIDS[3])) == [f"{WNIDS[3]}_{k}.JPEG" for k in range(2)]
    assert not any((p / "evil.JPEG").exists() for p in [tmp_path, data, served])

    every, ten, classes = torchvisions_scores(data)
    report = json.loads(r.stdout)
    assert report["classes"] == classes and report["images"] == 20 and report["support"] == [2] * 10
    assert report["subset_of_model"]["indices"] == [0, 217, 482, 491, 497, 566, 569, 571, 574, 701]
    assert abs(report["loss"] - every[0]) <= 1e-5 * every[0] and report["top1"] == every[1], (report, every)
    r = vggctl("eval", "--weights", WEIGHTS, "--arch", "vgg11", "--dataset", "imagenette-160px",
               "--data-dir", str(data), "--no-download", "--input", "64", "--val-resize-size", "64",
               "--only-data-classes", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert abs(report["loss"] - ten[0]) <= 1e-5 * ten[0] and report["top1"] == ten[1], (report, ten)


def test_training_follows_imagenets_recipe_and_a_packed_file_evaluates_alike(imagenette, tmp_path):
    out = tmp_path / "run"
    r = vggctl("train", "--arch", "vgg11", "--head", "gap", "--dataset", "imagenette-160px", "--data-dir",
               str(imagenette), "--no-download", "--input", "64", "--val-resize-size", "64", "--epochs", "1",
               "--device", "cpu", "--cache-dir", str(tmp_path / "cache"), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "on imagenette-160px (20 train / 20 val images, 64x64" in r.stderr, r.stderr
    config = json.loads((out / "config.json").read_text())
    # torchvision's reference recipe for VGG on ImageNet.
    assert (config["batch_size"], config["milestones"], config["optimizer"]["weight_decay"]) == (32, [30, 60], 1e-4)
    assert config["augment"] == "resized_crop" and config.get("hflip", 0.5) == 0.5, config
    r = vggctl("eval", "--checkpoint", str(out / "last.safetensors"), "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    folder = json.loads(r.stdout)
    assert folder["classes"][0] == "tench" and folder["images"] == 20, folder

    packed = tmp_path / "packed.vggdata"
    r = vggctl("prepare", "--dataset", "imagenette-160px", "--data-dir", str(imagenette), "-o", str(packed))
    assert r.returncode == 0 and "prepared 40 images" in r.stdout, r.stderr
    r = vggctl("eval", "--checkpoint", str(out / "last.safetensors"), "--data-dir", str(packed), "--json",
               cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    from_file = json.loads(r.stdout)
    assert from_file["classes"] == folder["classes"] and from_file["images"] == 20
    assert (from_file["loss"], from_file["top1"]) == (folder["loss"], folder["top1"]), (from_file, folder)


def edited(imagenette, tmp_path, edit):
    """A copy of the dataset changed by `edit(base)`."""
    root = tmp_path / "edited"
    shutil.copytree(imagenette, root)
    edit(root / FOLDER)
    return root


@pytest.mark.parametrize("edit, line", [
    (lambda b: shutil.copytree(b / "train" / WNIDS[0], b / "train" / "n02086240"),
     "train: 'n02086240' is not one of Imagenette's 10 classes (other ImageNet class folders: --dataset imagenet)"),
    (lambda b: shutil.rmtree(b / "val" / WNIDS[9]),
     f"val: class folders {', '.join(WNIDS[:9])}, where train/ has {', '.join(WNIDS)}"),
    (lambda b: [os.remove(b / "val" / WNIDS[2] / f"{WNIDS[2]}_{k}.JPEG") for k in range(2)]
     and save_window(b / "val" / WNIDS[2] / "a.png", 7, True),
     f"val: no .jpeg images in class folder(s) {WNIDS[2]}"),
])
def test_folders_that_are_not_imagenettes_are_one_line_each(imagenette, tmp_path, edit, line):
    root = edited(imagenette, tmp_path, edit)
    r = vggctl("prepare", "--dataset", "imagenette-160px", "--data-dir", str(root), "--no-download",
               "-o", str(tmp_path / "p.vggdata"))
    assert r.returncode == 1 and len(errors(r)) == 1 and line in r.stderr, r.stderr
    assert not (tmp_path / "p.vggdata").exists()


def test_a_missing_dataset_is_one_line(tmp_path):
    r = vggctl("eval", "--weights", WEIGHTS, "--arch", "vgg11", "--dataset", "imagenette", "--data-dir",
               str(tmp_path), "--no-download", cwd=tmp_path)
    assert r.returncode == 1 and len(errors(r)) == 1, r.stderr
    assert (f"no Imagenette in {tmp_path}: expected {tmp_path}/imagenette2/ and downloading is off; put "
            "torchvision's imagenette2/ of imagenette2.tgz (from https://s3.amazonaws.com/fast-ai-imageclas/)"
            ) in r.stderr, r.stderr
    assert os.listdir(tmp_path) == []
