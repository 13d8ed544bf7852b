"""`--dataset oxford-pets` against torchvision's `OxfordIIITPet` on the
same folder: a copy of the dataset's layout (`oxford-iiit-pet/images/<id>.jpg`,
`annotations/trainval.txt` and `test.txt`) with its 37 breeds, named and
numbered as the real lists number them (cats capitalized, dogs not, the
labels in case-blind order, so that neither Python's sort nor the ids'
order gives the classes), two images of each breed to train on and one to
test, all real photographs (scikit-image's) cut into distinct 64x64 windows.

- Downloaded from a mirror on 127.0.0.1 (the two archives the test makes,
  with members vggctl does not need), then read: `features --dataset
  oxford-pets --split test` saves torchvision's classes, targets in its
  order, and rows equal to torchvision's VGG11 on `OxfordIIITPet`'s images
  within 1e-5 (the test images are stored losslessly, PNG data in .jpg files
  as a few real ones are, so both sides normalize the same bytes); `--split
  train` is the trainval list. Nothing but the two folders and the archives
  is left in the data directory.
- `finetune` trains on trainval and validates on test (74 / 37 images); the
  checkpoint names torchvision's classes and `eval` of it counts the 37. A
  --val-dir given is ignored with a warning and left out of the run's files.
- Bad lists, a missing dataset, a --data-dir that is a file and a wrong MD5
  get one line each and leave nothing behind.
"""
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from safetensors import safe_open
from safetensors.numpy import load_file
from skimage import data as skdata

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dataset_helpers import BIN, FIX, md5, mirror  # noqa: E402

WEIGHTS = os.path.join(FIX, "pth", "vgg11.legacy.pth")
CATS = ["Abyssinian", "Bengal", "Birman", "Bombay", "British_Shorthair", "Egyptian_Mau", "Maine_Coon",
        "Persian", "Ragdoll", "Russian_Blue", "Siamese", "Sphynx"]
DOGS = ["american_bulldog", "american_pit_bull_terrier", "basset_hound", "beagle", "boxer", "chihuahua",
        "english_cocker_spaniel", "english_setter", "german_shorthaired", "great_pyrenees", "havanese",
        "japanese_chin", "keeshond", "leonberger", "miniature_pinscher", "newfoundland", "pomeranian", "pug",
        "saint_bernard", "samoyed", "scottish_terrier", "shiba_inu", "staffordshire_bull_terrier",
        "wheaten_terrier", "yorkshire_terrier"]
BREEDS = sorted(CATS + DOGS, key=str.lower)
PHOTOS = ["astronaut", "coffee", "chelsea", "rocket"]
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def vggctl(*args, cwd=None, env=None):
    return subprocess.run([BIN, *args], capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


def make_pets(base):
    """The dataset's layout in `base` (`ROOT/oxford-iiit-pet`)."""
    photos = [np.asarray(Image.fromarray(getattr(skdata, p)()).convert("RGB")) for p in PHOTOS]
    (base / "images").mkdir(parents=True)
    (base / "annotations").mkdir()
    lists = {"trainval": [], "test": []}
    k = 0
    for label, breed in enumerate(BREEDS, 1):
        species = 1 if breed in CATS else 2
        for number, split in [(101, "trainval"), (102, "trainval"), (103, "test")]:
            img = photos[k % len(photos)]
            y, x = (k * 37) % (img.shape[0] - 64), (k * 53) % (img.shape[1] - 64)
            window = Image.fromarray(img[y:y + 64, x:x + 64])
            image_id = f"{breed}_{number}"
            # Test images losslessly (PNG data, as a few real files are);
            # the others as JPEG.
            window.save(base / "images" / f"{image_id}.jpg", format="PNG" if split == "test" else "JPEG")
            lists[split].append(f"{image_id} {label} {species} {label}")
            k += 1
    for split, lines in lists.items():
        (base / "annotations" / f"{split}.txt").write_text("\n".join(sorted(lines)) + "\n")


@pytest.fixture(scope="module")
def pets(tmp_path_factory):
    root = tmp_path_factory.mktemp("pets")
    make_pets(root / "oxford-iiit-pet")
    return root


def archives(base, out):
    """The dataset's two archives as published (`images/`, `annotations/`,
    with members no reader needs), written into `out`."""
    out.mkdir()
    for folder in ["images", "annotations"]:
        with tarfile.open(out / f"{folder}.tar.gz", "w:gz") as tar:
            tar.add(base / folder, arcname=folder)
            extra = tarfile.TarInfo(f"{folder}/{'Abyssinian_100.mat' if folder == 'images' else 'list.txt'}")
            extra.size = 5
            tar.addfile(extra, io.BytesIO(b"extra"))
            deeper = tarfile.TarInfo(f"{folder}/xmls/Abyssinian_1.xml")
            deeper.size = 2
            tar.addfile(deeper, io.BytesIO(b"<>"))
    return [md5(str(out / f"{f}.tar.gz")) for f in ["images", "annotations"]]


def test_downloaded_pets_are_read_as_torchvision_reads_them(pets, tmp_path):
    served = tmp_path / "served"
    sums = archives(pets / "oxford-iiit-pet", served)
    data = tmp_path / "data"
    env = dict(os.environ, VGGCTL_OXFORD_PETS_MD5=",".join(sums))
    with mirror(str(served)) as url:
        r = vggctl("features", "--device", "cpu", "--dataset", "oxford-pets", "--split", "test",
                   "--data-dir", str(data), "--data-url", url, "--weights", WEIGHTS, "--input", "64",
                   "--val-resize-size", "64", "--layer", "classifier.6", "-o", "test.safetensors",
                   cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    base = data / "oxford-iiit-pet"
    assert sorted(os.listdir(base)) == ["annotations", "annotations.tar.gz", "images", "images.tar.gz"]
    assert sorted(os.listdir(base / "annotations")) == ["test.txt", "trainval.txt"]

    ds = torchvision.datasets.OxfordIIITPet(str(data), split="test")
    saved = load_file(tmp_path / "test.safetensors")
    meta = safe_open(str(tmp_path / "test.safetensors"), "np").metadata()
    assert json.loads(meta["classes"]) == ds.classes and len(ds.classes) == 37
    assert ds.classes[:3] == ["Abyssinian", "American Bulldog", "American Pit Bull Terrier"]
    assert (meta["dataset"], meta["split"]) == ("oxford-pets", "test")
    assert saved["labels"].tolist() == ds._labels
    model = torchvision.models.vgg11()
    model.load_state_dict(torch.load(WEIGHTS, weights_only=True))
    x = torch.stack([torch.from_numpy(np.array(ds[i][0])).permute(2, 0, 1) for i in range(len(ds))])
    with torch.no_grad():
        theirs = model.eval()(torchvision.transforms.functional.normalize(x.float() / 255, MEAN, STD)).numpy()
    ours = saved["classifier.6"]
    assert ours.shape == theirs.shape == (37, 1000)
    err = np.abs(ours - theirs).max() / np.abs(theirs).max()
    assert err <= 1e-5, err

    # --split train is trainval, read from the folder now there.
    r = vggctl("features", "--device", "cpu", "--dataset", "oxford-pets", "--split", "train",
               "--data-dir", str(data), "--no-download", "--weights", WEIGHTS, "--input", "64",
               "--layer", "features.0", "--pool", "avg", "--limit", "9", "-o", "train.safetensors",
               cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    trainval = torchvision.datasets.OxfordIIITPet(str(data), split="trainval")
    assert load_file(tmp_path / "train.safetensors")["labels"].tolist() == trainval._labels[:9]


def test_finetuning_trains_on_trainval_and_validates_on_test(pets, tmp_path):
    out = tmp_path / "ft"
    r = vggctl("finetune", "--weights", WEIGHTS, "--arch", "vgg11", "--dataset", "oxford-pets",
               "--data-dir", str(pets), "--no-download", "--input", "32", "--epochs", "1",
               "--batch-size", "16", "--keep", "last", "--cache-dir", str(tmp_path / "cache"),
               "--val-dir", str(pets), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "on oxford-pets (74 train / 37 val images" in r.stderr, r.stderr
    # --val-dir is a folder's: ignored, and not recorded or suggested.
    assert "--val-dir is ignored: it applies to --dataset folder only" in r.stderr
    assert "holds only 37 images" in r.stderr and "more validation images help" in r.stderr, r.stderr
    assert json.loads((out / "config.json").read_text())["val_dir"] is None
    classes = torchvision.datasets.OxfordIIITPet(str(pets), split="test").classes
    assert json.loads(safe_open(str(out / "last.safetensors"), "np").metadata()["class_names"]) == classes
    assert json.loads((out / "config.json").read_text())["dataset"] == "oxford-pets"
    r = vggctl("eval", "--checkpoint", str(out / "last.safetensors"), "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["dataset"] == "oxford-pets" and report["classes"] == classes
    assert report["images"] == 37 and sum(report["support"]) == 37, report


def errors(r):
    """stderr's lines but the note on the weights' architecture."""
    return [line for line in r.stderr.splitlines() if not line.startswith("note: ")]


def edited(pets, tmp_path, split, edit):
    """A copy of the dataset (images linked) with `split`'s list edited."""
    root = tmp_path / "edited"
    base = root / "oxford-iiit-pet"
    (base / "annotations").mkdir(parents=True)
    os.symlink(pets / "oxford-iiit-pet" / "images", base / "images")
    for s in ["trainval", "test"]:
        lines = (pets / "oxford-iiit-pet" / "annotations" / f"{s}.txt").read_text().splitlines()
        (base / "annotations" / f"{s}.txt").write_text("\n".join(edit(lines) if s == split else lines) + "\n")
    return root


@pytest.mark.parametrize("split, edit, line", [
    ("trainval", lambda ls: ls[:1] + ["Bengal_7 6 1"] + ls[1:], "trainval.txt: line 2: 3 fields, expected 4"),
    ("trainval", lambda ls: ls[:2] + ["Bengal_7 38 1 6"] + ls[2:], "line 3: breed '38' is not a number from 1 to 37"),
    ("test", lambda ls: ["../../x_1 1 1 1"] + ls, "test.txt: line 1: image id '../../x_1' is not a file name"),
    ("trainval", lambda ls: [l for l in ls if l.split()[1] != "5"], "trainval.txt: no images of breed(s) 5: "),
    ("test", lambda ls: ["beagle_9 1 2 1"] + ls, "test.txt: line 1: beagle_9 has label 1, which trainval.txt gives to Abyssinian"),
    ("trainval", lambda ls: ls + ["boxer_9 1 2 1"], "line 75: boxer_9 has label 1, which earlier lines give to Abyssinian"),
    ("test", lambda ls: [], "test.txt: lists no images"),
])
def test_bad_lists_are_one_line_each(pets, tmp_path, split, edit, line):
    root = edited(pets, tmp_path, split, edit)
    r = vggctl("features", "--device", "cpu", "--dataset", "oxford-pets", "--split", "test", "--data-dir",
               str(root), "--no-download", "--weights", WEIGHTS, "-o", "x.npy", cwd=tmp_path)
    lines = errors(r)
    assert r.returncode == 1 and len(lines) == 1 and line in lines[0], r.stderr
    assert not (tmp_path / "x.npy").exists()


def test_missing_data_and_wrong_downloads_are_refused(pets, tmp_path):
    def features(*args, env=None):
        return vggctl("features", "--device", "cpu", "--dataset", "oxford-pets", "--split", "test",
                      "--weights", WEIGHTS, "-o", "x.npy", *args, cwd=tmp_path, env=env)

    empty = tmp_path / "empty"
    empty.mkdir()
    r = features("--data-dir", str(empty), "--no-download")
    assert r.returncode == 1 and len(errors(r)) == 1, r.stderr
    assert f"no Oxford-IIIT Pet in {empty}: expected {empty}/oxford-iiit-pet/images/ and downloading is off" in r.stderr

    a_file = tmp_path / "a_file"
    a_file.write_text("")
    r = features("--data-dir", str(a_file))
    assert r.returncode == 1 and errors(r) == [f"vggctl: error: {a_file}: not a directory (--data-dir names the folder oxford-pets is read from or downloaded into)"], r.stderr

    # A wrong MD5: the archive is refused, nothing is left.
    served = tmp_path / "served"
    sums = archives(pets / "oxford-iiit-pet", served)
    data = tmp_path / "data"
    env = dict(os.environ, VGGCTL_OXFORD_PETS_MD5=",".join([sums[0], "0" * 32]))
    with mirror(str(served)) as url:
        r = features("--data-dir", str(data), "--data-url", url, env=env)
    assert r.returncode == 1 and len(errors(r)) == 1, r.stderr
    assert "could not download Oxford-IIIT Pet" in r.stderr and "annotations.tar.gz" in r.stderr
    assert "MD5" in r.stderr, r.stderr
    # The images (checked) stay for the next run, as a partial MNIST does.
    assert sorted(os.listdir(data / "oxford-iiit-pet")) == ["images", "images.tar.gz"]
    assert not (tmp_path / "x.npy").exists()
