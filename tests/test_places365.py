"""`--dataset places365-256` against torchvision's own `Places365` reader
(`small=True`, the train-standard and val splits) on the same folder: the
365 classes of `categories_places365.txt` (`/a/airfield 0`, one a level
deeper, as the real list has), a training list of 7 images in five
classes under `data_256_standard/`, a val list of 8 under `val_256/`,
each a 32x32 window of real photographs (scikit-image's).

- Downloaded from a mirror on 127.0.0.1 as the three tars torchvision
  downloads (the lists' devkit, whose test list is not extracted; the
  training images as `data_256/`, renamed to `data_256_standard/` as
  torchvision renames it, with a member trying to leave the folder; the val
  images), then packed: the file `prepare` writes lists torchvision's
  samples of both splits and its classes, in its order.
- `train` (torchvision's ImageNet recipe, here at `--input 32`) validates
  on the val list, and `eval` of the run reads it again.
- A class index out of range and a missing dataset are one line each.
"""
import json
import os
import sys
import tarfile

import pytest
import torchvision
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dataset_helpers import errors, md5, mirror, missing_dataset_error, packed_index, vggctl, window  # noqa: E402

CLASSES = ["/a/airfield", "/a/apartment_building/outdoor"] + [f"/{chr(97 + i // 15)}/scene_{i:03d}"
                                                               for i in range(2, 365)]
TRAIN = [(c, k) for c in (0, 1, 17, 200, 364) for k in range(1 + c % 4)]
VAL = [3, 0, 364, 1, 200, 17, 17, 40]


def make_places(root, val=VAL):
    """Places365-Standard's lists and small images in `root`, the training
    images in `data_256/` (as the archive holds them)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "categories_places365.txt").write_text("".join(f"{c} {i}\n" for i, c in enumerate(CLASSES)))
    lines = []
    for n, (c, k) in enumerate(TRAIN):
        path = f"{CLASSES[c]}/{k + 1:08d}.jpg"
        (root / "data_256" / path[1:]).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(window(n, 32, 32)).save(root / "data_256" / path[1:])
        lines.append(f"{path} {c}\n")
    (root / "places365_train_standard.txt").write_text("".join(lines))
    (root / "val_256").mkdir()
    for i, c in enumerate(val):
        Image.fromarray(window(100 + i, 32, 32)).save(root / "val_256" / f"Places365_val_{i + 1:08d}.jpg")
    (root / "places365_val.txt").write_text("".join(f"Places365_val_{i + 1:08d}.jpg {c}\n" for i, c in enumerate(val)))
    (root / "places365_test.txt").write_text("Places365_test_00000001.jpg\n")


def serve(made, out):
    """The three tars torchvision downloads, in `out`; their MD5s."""
    out.mkdir()
    with tarfile.open(out / "filelist_places365-standard.tar", "w") as tar:
        for f in ["categories_places365.txt", "places365_train_standard.txt", "places365_val.txt",
                  "places365_test.txt"]:
            tar.add(made / f, arcname=f)
    with tarfile.open(out / "train_256_places365standard.tar", "w") as tar:
        tar.add(made / "data_256", arcname="data_256")
        tar.add(made / "places365_val.txt", arcname="data_256/../../evil.jpg")
    with tarfile.open(out / "val_256.tar", "w") as tar:
        tar.add(made / "val_256", arcname="val_256")
    files = ["filelist_places365-standard.tar", "train_256_places365standard.tar", "val_256.tar"]
    return ",".join(md5(str(out / f)) for f in files)


def theirs(root, split, monkeypatch):
    """torchvision's classes and samples (paths under `root`) of `split`,
    its MD5s of the lists being those of these ones."""
    P = torchvision.datasets.Places365
    monkeypatch.setattr(P, "_CATEGORIES_META", ("categories_places365.txt",
                                                md5(str(root / "categories_places365.txt"))))
    lists = {s: (f, md5(str(root / f))) for s, f in [("train-standard", "places365_train_standard.txt"),
                                                      ("val", "places365_val.txt")]}
    monkeypatch.setattr(P, "_FILE_LIST_META", lists)
    ds = P(str(root), split=split, small=True)
    return ds.classes, [(os.path.relpath(p, root), y) for p, y in ds.imgs]


def test_a_download_lists_torchvisions_samples(tmp_path, monkeypatch):
    made, served, data = tmp_path / "made", tmp_path / "served", tmp_path / "data"
    make_places(made)
    sums = serve(made, served)
    packed = tmp_path / "places.vggdata"
    with mirror(str(served)) as url:
        env = dict(os.environ, VGGCTL_PLACES365_256_URL=url, VGGCTL_PLACES365_256_MD5=sums)
        r = vggctl("prepare", "--dataset", "places365-256", "--data-dir", str(data), "-o", str(packed), env=env)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(data)) == [
        "categories_places365.txt", "data_256_standard", "filelist_places365-standard.tar",
        "places365_train_standard.txt", "places365_val.txt", "train_256_places365standard.tar", "val_256",
        "val_256.tar"]
    assert not (tmp_path / "evil.jpg").exists()
    index = packed_index(packed)
    classes, train = theirs(data, "train-standard", monkeypatch)
    _, val = theirs(data, "val", monkeypatch)
    assert classes == CLASSES == index["classes"]
    assert [(e["name"], e["label"]) for e in index["train"]] == train and len(train) == 7
    assert [(e["name"], e["label"]) for e in index["val"]] == val and len(val) == 8


def test_training_validates_on_the_val_list(tmp_path):
    make_places(tmp_path)
    os.rename(tmp_path / "data_256", tmp_path / "data_256_standard")
    out = tmp_path / "run"
    r = vggctl("train", "--dataset", "places365-256", "--data-dir", str(tmp_path), "--no-download", "--arch", "vgg11",
               "--head", "gap", "--input", "32", "--epochs", "1", "--batch-size", "16", "--device", "cpu",
               "--cache-dir", str(tmp_path / "cache"), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "on places365-256 (7 train / 8 val images, 32x32" in r.stderr, r.stderr
    r = vggctl("eval", "--checkpoint", str(out / "last.safetensors"), "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["images"] == 8 and report["classes"] == CLASSES

    bad = tmp_path / "bad"
    make_places(bad, val=VAL[:-1] + [365])
    os.rename(bad / "data_256", bad / "data_256_standard")
    r = vggctl("train", "--dataset", "places365-256", "--data-dir", str(bad), "--no-download", "--epochs", "1")
    assert r.returncode == 1 and len(errors(r)) == 1, r.stderr
    assert f"{bad}/places365_val.txt line 8: class index '365' is not from 0 to 364" in r.stderr, r.stderr


@pytest.mark.parametrize("name", ["places365", "places365-256"])
def test_a_missing_dataset_is_one_line(tmp_path, name):
    line, empty = missing_dataset_error(name, tmp_path)
    size = {"places365": "large", "places365-256": "256"}[name]
    train = {"places365": "train_large_places365standard.tar", "places365-256": "train_256_places365standard.tar"}
    assert line == (
        f"vggctl: error: no Places365 in {empty}: expected {empty}/categories_places365.txt and downloading is off; "
        "put torchvision's categories_places365.txt, places365_train_standard.txt and places365_val.txt (of "
        f"filelist_places365-standard.tar), data_{size}_standard/ (of {train[name]}) and val_{size}/ (of "
        f"val_{size}.tar, from http://data.csail.mit.edu/places/places365/) into {empty} by hand, or point "
        "--data-dir at a copy (--data-url names a mirror)"), line
