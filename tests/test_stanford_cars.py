"""`--dataset stanford-cars` against torchvision's own `StanfordCars` reader
on the same folder: `stanford_cars/` with `devkit/cars_meta.mat` (the 196
class names, a cell array), `devkit/cars_train_annos.mat` and
`cars_test_annos_withlabels.mat` (struct arrays of bounding boxes, class
and file name, as the devkit's; one compressed, one not), and 64x64
windows of real photographs (scikit-image's) in `cars_train/` and
`cars_test/`.

- `prepare` lists torchvision's samples of both splits, the same files
  with the same classes in the same order, and its classes; `train` trains
  on the training split and validates on the test split, and `eval` of the
  run reads the test split again.
- A missing dataset (which cannot be downloaded), a class out of range, a
  file name that leaves its folder and a class list of the wrong length
  are one line each, naming the file, and write nothing.
"""
import json
import os
import sys

import numpy as np
import scipy.io
import torchvision
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dataset_helpers import errors, missing_dataset_error, packed_index, vggctl, window  # noqa: E402

CLASSES = [f"Make{c} Model {c % 7} {2000 + c % 13}" for c in range(196)]
CLASSES[0], CLASSES[195] = "AM General Hummer SUV 2000", "smart fortwo Convertible 2012"
# Each split's images' classes (1 to 196), in the annotations' order.
TRAIN = [1, 196, 5, 1, 40, 196, 77, 5, 3, 150, 40, 1]
TEST = [196, 1, 5, 40, 77, 3, 150, 2]


def annotations(classes, offset, names=None):
    """The devkit's struct array: bbox_x1 .. bbox_x2, class, fname."""
    kinds = [("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"), ("class", "O"), ("fname", "O")]
    rows = np.empty(len(classes), dtype=kinds)
    for i, c in enumerate(classes):
        fname = names[i] if names else f"{i + 1:05d}.jpg"
        rows[i] = (np.uint8(3), np.uint8(4), np.uint16(60 + i), np.uint8(50), np.uint8(c), fname)
    return rows


def make_cars(base, train=TRAIN, test=TEST, classes=CLASSES):
    """Stanford Cars' layout in `base` (`ROOT/stanford_cars`)."""
    (base / "devkit").mkdir(parents=True)
    names = np.empty(len(classes), dtype=object)
    names[:] = classes
    scipy.io.savemat(base / "devkit" / "cars_meta.mat", {"class_names": names[None]})
    scipy.io.savemat(base / "devkit" / "cars_train_annos.mat", {"annotations": annotations(train, 0)[None]},
                     do_compression=True)
    scipy.io.savemat(base / "cars_test_annos_withlabels.mat", {"annotations": annotations(test, 100)[None]})
    for folder, split, offset in [("cars_train", train, 0), ("cars_test", test, 100)]:
        (base / folder).mkdir()
        for i in range(len(split)):
            Image.fromarray(window(offset + i)).save(base / folder / f"{i + 1:05d}.jpg", format="JPEG")


def test_prepare_lists_torchvisions_samples_and_training_validates_on_test(tmp_path):
    make_cars(tmp_path / "stanford_cars")
    packed = tmp_path / "cars.vggdata"
    r = vggctl("prepare", "--dataset", "stanford-cars", "--data-dir", str(tmp_path), "-o", str(packed))
    assert r.returncode == 0, r.stderr
    index = packed_index(packed)
    for split, key in [("train", "train"), ("test", "val")]:
        ds = torchvision.datasets.StanfordCars(str(tmp_path), split=split)
        assert ds.classes == CLASSES == index["classes"]
        folder = tmp_path / "stanford_cars"
        theirs = [(os.path.relpath(p, folder), y) for p, y in ds._samples]
        assert [(e["name"], e["label"]) for e in index[key]] == theirs, split
    assert f"prepared {len(TRAIN) + len(TEST)} images" in r.stdout

    out = tmp_path / "run"
    r = vggctl("train", "--dataset", "stanford-cars", "--data-dir", str(tmp_path), "--arch", "vgg11", "--head",
               "gap", "--epochs", "1", "--device", "cpu", "--cache-dir", str(tmp_path / "cache"), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "on stanford-cars (12 train / 8 val images, 32x32" in r.stderr, r.stderr
    r = vggctl("eval", "--checkpoint", str(out / "last.safetensors"), "--json", "--predictions",
               str(tmp_path / "p.csv"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["images"] == len(TEST) and report["classes"] == CLASSES
    rows = (tmp_path / "p.csv").read_text().splitlines()[1:]
    ds = torchvision.datasets.StanfordCars(str(tmp_path), split="test")
    assert [(row.split(",")[0], int(row.split(",")[1])) for row in rows] == ds._samples


def test_a_missing_dataset_and_damaged_annotations_are_one_line_each(tmp_path):
    line, empty = missing_dataset_error("stanford-cars", tmp_path)
    assert line == (
        f"vggctl: error: no Stanford Cars in {empty}: {empty}/stanford_cars/devkit/cars_meta.mat is not there, and "
        "the dataset cannot be downloaded (its site is gone; torchvision no longer downloads it either): put its "
        f"devkit/, cars_train/, cars_test/ and cars_test_annos_withlabels.mat into {empty}/stanford_cars"), line

    cases = [
        ("class", dict(train=TRAIN[:-1] + [197]), "devkit/cars_train_annos.mat: annotation 11: class 197 is not "
         "from 1 to 196"),
        ("classes", dict(classes=CLASSES[:-1]), "devkit/cars_meta.mat: 'class_names' has 195 names, where Stanford "
         "Cars has 196"),
    ]
    for name, changes, message in cases:
        root = tmp_path / name
        make_cars(root / "stanford_cars", **changes)
        r = vggctl("train", "--dataset", "stanford-cars", "--data-dir", str(root), "--epochs", "1")
        assert r.returncode == 1 and len(errors(r)) == 1, r.stderr
        assert f"{root}/stanford_cars/{message}" in r.stderr, r.stderr
    root = tmp_path / "fname"
    make_cars(root / "stanford_cars")
    scipy.io.savemat(root / "stanford_cars" / "cars_test_annos_withlabels.mat",
                     {"annotations": annotations(TEST, 100, ["../00001.jpg"] + ["x.jpg"] * 7)[None]})
    r = vggctl("prepare", "--dataset", "stanford-cars", "--data-dir", str(root), "-o", str(tmp_path / "p.vggdata"))
    assert r.returncode == 1 and len(errors(r)) == 1, r.stderr
    assert (f"{root}/stanford_cars/cars_test_annos_withlabels.mat: annotation 0: '../00001.jpg' is not a file "
            "name") in r.stderr, r.stderr
    assert not (tmp_path / "p.vggdata").exists()
