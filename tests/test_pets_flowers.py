"""The fine-tuning datasets read from lists against torchvision's own
readers on the same folders: `--dataset oxford-pets` against
`OxfordIIITPet`, `--dataset flowers102` against `Flowers102`, `--dataset
food101` against `Food101`, `--dataset dtd` against `DTD`, `--dataset
fgvc-aircraft` (and its `-family` and `-manufacturer` levels) against
`FGVCAircraft` (at each `annotation_level`). Each is a copy
of the dataset's layout made of real photographs (scikit-image's) cut into
distinct 64x64 windows; the images to validate on are stored losslessly
(PNG data in .jpg files, as a few real pets are), so that both sides
normalize the same bytes, the others as JPEG.

- Oxford-IIIT Pet: `oxford-iiit-pet/images/<id>.jpg` listed by
  `annotations/trainval.txt` and `test.txt` with its 37 breeds, named and
  numbered as the real lists number them (cats capitalized, dogs not, the
  labels in case-blind order, so that neither Python's sort nor the ids'
  order gives the classes), two images of each breed to train on and one
  to test.
- Oxford 102 Flowers: `flowers-102/jpg/image_NNNNN.jpg`, 30 images whose
  classes (1 and 102 among them) `imagelabels.mat` gives and whose splits
  `setid.mat` gives in shuffled order, both compressed MAT-files as
  scipy writes them; vggctl trains on train + val and validates on test.
- Food-101: `food-101/images/<class>/<id>.jpg` listed by `meta/train.json`
  and `test.json` with 101 classes in shuffled order (the classes are
  sorted, the images in the lists' order), one image each to train on and
  one to test; its archive holds the folder itself, and a member trying to
  leave it (`../../../evil.jpg`) is not written anywhere.
- DTD: `dtd/dtd/images/<class>/<image>.jpg` of 47 classes (in shuffled
  order), three or four images each, listed by the ten partitions'
  `labels/{train,val,test}<K>.txt`, each partition putting each image in
  another split, so that partition 1 tests 47 images and partition 2
  tests 70; `--fold K` reads partition K, and eval of a run reads the
  run's.
- FGVC-Aircraft: `fgvc-aircraft-2013b/data/images/<id>.jpg` listed by
  `data/images_variant_{train,val,trainval,test}.txt` (`<id> <variant>`,
  variants with spaces and slashes), its 100 variants in
  `data/variants.txt` in shuffled order (torchvision's classes, unsorted),
  ten of them with an image in each split; the same images listed by
  family (70 in `families.txt`, the ten variants of five) and by
  manufacturer (30, of three) in `images_family_*.txt` and
  `images_manufacturer_*.txt`. It publishes no MD5, so a download without
  one is refused before anything is fetched. Each level is a dataset of
  its own: torchvision's classes and labels at that level, a run's head of
  as many classes, and a file prepared at one level is refused at another.

For each:
- Downloaded from a mirror on 127.0.0.1 (the archives the test makes, with
  members vggctl does not need), then read: `features --dataset NAME
  --split test` saves torchvision's classes, targets in its order, and rows
  equal to torchvision's VGG11 on the reader's images within 1e-5; `--split
  train` is trainval (pets) or train then val (flowers, DTD). Nothing but the
  dataset's files is left in the data directory.
- `finetune` trains on the training images and validates on the test
  images; the checkpoint names torchvision's classes and `eval` of it
  counts the test images. A --val-dir given is ignored with a warning and
  left out of the run's files.
- Bad lists (pets' and DTD's text, food's JSON) and MAT-files, a missing dataset, a --data-dir that is a file
  and a wrong MD5 get one line each and leave nothing behind.
"""
import io
import json
import os
import sys
import tarfile

import numpy as np
import pytest
import scipy.io
import torch
import torchvision
from safetensors import safe_open
from safetensors.numpy import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dataset_helpers import FIX, errors, md5, mirror, save_window, vggctl  # noqa: E402

WEIGHTS = os.path.join(FIX, "pth", "vgg11.legacy.pth")
SMALL = os.path.join(FIX, "pth", "vgg11-cifar.legacy.pth")
CATS = ["Abyssinian", "Bengal", "Birman", "Bombay", "British_Shorthair", "Egyptian_Mau", "Maine_Coon",
        "Persian", "Ragdoll", "Russian_Blue", "Siamese", "Sphynx"]
DOGS = ["american_bulldog", "american_pit_bull_terrier", "basset_hound", "beagle", "boxer", "chihuahua",
        "english_cocker_spaniel", "english_setter", "german_shorthaired", "great_pyrenees", "havanese",
        "japanese_chin", "keeshond", "leonberger", "miniature_pinscher", "newfoundland", "pomeranian", "pug",
        "saint_bernard", "samoyed", "scottish_terrier", "shiba_inu", "staffordshire_bull_terrier",
        "wheaten_terrier", "yorkshire_terrier"]
BREEDS = sorted(CATS + DOGS, key=str.lower)
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# Flowers: 30 images, their classes, and setid.mat's shuffled splits.
FLOWER_LABELS = np.random.default_rng(5).integers(1, 103, 30).astype(np.uint8)
FLOWER_LABELS[:2] = [1, 102]
FLOWER_IDS = np.random.default_rng(6).permutation(np.arange(1, 31)).astype(np.uint16)
SETID = {"trnid": FLOWER_IDS[:10], "valid": FLOWER_IDS[10:20], "tstid": FLOWER_IDS[20:]}
# Food-101: 101 classes, listed in shuffled order (the classes are sorted).
DISHES = [f"dish_{i:03d}" for i in np.random.default_rng(7).permutation(101)]
# DTD: 47 classes in shuffled order, three images of each but every
# other one, which has four.
TEXTURES = [f"texture_{i:02d}" for i in np.random.default_rng(8).permutation(47)]
# FGVC-Aircraft: 100 variants in shuffled order (names with spaces and
# slashes, as the real ones have), the first ten with images.
VARIANTS = [f"{['A', 'Cessna ', 'F/A-'][i % 3]}{i:02d}" for i in np.random.default_rng(10).permutation(100)]
# Its other annotation levels: 70 families and 30 manufacturers in shuffled
# order; the ten variants with images are of five families (two each) of
# three manufacturers.
FAMILIES = [f"{['Boeing ', 'A', 'DC-'][i % 3]}{i:02d}" for i in np.random.default_rng(11).permutation(70)]
MANUFACTURERS = [f"Maker {i:02d}" for i in np.random.default_rng(12).permutation(30)]
AIRCRAFT = {"variant": ("variants", lambda c: VARIANTS[c]), "family": ("families", lambda c: FAMILIES[c // 2]),
            "manufacturer": ("manufacturers", lambda c: MANUFACTURERS[c // 4])}
TITLES = {"oxford-pets": "Oxford-IIIT Pet", "flowers102": "Oxford 102 Flowers", "food101": "Food-101",
          "dtd": "DTD", "fgvc-aircraft": "FGVC-Aircraft"}
NAMES = ["oxford-pets", "flowers102", "food101", "dtd", "fgvc-aircraft"]


def make_pets(base):
    """Oxford-IIIT Pet's layout in `base` (`ROOT/oxford-iiit-pet`)."""
    (base / "images").mkdir(parents=True)
    (base / "annotations").mkdir()
    lists = {"trainval": [], "test": []}
    k = 0
    for label, breed in enumerate(BREEDS, 1):
        species = 1 if breed in CATS else 2
        for number, split in [(101, "trainval"), (102, "trainval"), (103, "test")]:
            image_id = f"{breed}_{number}"
            save_window(base / "images" / f"{image_id}.jpg", k, split == "test")
            lists[split].append(f"{image_id} {label} {species} {label}")
            k += 1
    for split, lines in lists.items():
        (base / "annotations" / f"{split}.txt").write_text("\n".join(sorted(lines)) + "\n")


def make_flowers(base):
    """Oxford 102 Flowers' layout in `base` (`ROOT/flowers-102`)."""
    (base / "jpg").mkdir(parents=True)
    for i in range(1, 31):
        save_window(base / "jpg" / f"image_{i:05d}.jpg", 200 + i, i in SETID["tstid"])
    scipy.io.savemat(base / "imagelabels.mat", {"labels": FLOWER_LABELS[None]}, do_compression=True)
    scipy.io.savemat(base / "setid.mat", {k: v[None] for k, v in SETID.items()}, do_compression=True)


def make_food(base):
    """Food-101's layout in `base` (`ROOT/food-101`): one image of each
    class to train on, one to test."""
    (base / "meta").mkdir(parents=True)
    lists = {"train": {}, "test": {}}
    for k, dish in enumerate(DISHES):
        (base / "images" / dish).mkdir(parents=True)
        for number, split in [(11, "train"), (12, "test")]:
            save_window(base / "images" / dish / f"{number}.jpg", 400 + 2 * k + number, split == "test")
            lists[split][dish] = [f"{dish}/{number}"]
    for split, classes in lists.items():
        (base / "meta" / f"{split}.json").write_text(json.dumps(classes))
    (base / "meta" / "classes.txt").write_text("\n".join(sorted(DISHES)))


def dtd_split(j, k):
    """The split partition `k` puts a class's `j`-th image in."""
    return ["train", "val", "test"][(j + k) % 3]


def make_dtd(data, partitions=range(1, 11)):
    """DTD's layout in `data` (`ROOT/dtd/dtd`), with the lists of
    `partitions`; the images partition 1 tests stored losslessly."""
    lists = {(s, k): [] for s in ["train", "val", "test"] for k in partitions}
    for c, texture in enumerate(TEXTURES):
        (data / "images" / texture).mkdir(parents=True)
        for j in range(3 + c % 2):
            image = f"{texture}_{j:04d}.jpg"
            save_window(data / "images" / texture / image, 600 + 4 * c + j, dtd_split(j, 1) == "test")
            for k in partitions:
                lists[dtd_split(j, k), k].append(f"{texture}/{image}")
    (data / "labels").mkdir()
    rng = np.random.default_rng(9)
    for (s, k), lines in lists.items():
        (data / "labels" / f"{s}{k}.txt").write_text("\n".join(rng.permutation(lines)) + "\n")


def make_aircraft(base):
    """FGVC-Aircraft's layout in `base` (`ROOT/fgvc-aircraft-2013b`): two
    images of each of the first ten variants to train on (train, val), one
    to test, listed at each annotation level; trainval is train and val by
    id, as its lists are sorted."""
    data = base / "data"
    (data / "images").mkdir(parents=True)
    lists = {(level, split): [] for level in AIRCRAFT for split in ["train", "val", "test"]}
    for c in range(10):
        for j, split in enumerate(["train", "val", "test"]):
            image_id = f"{1000000 + 37 * (3 * c + j) % 1000:07d}"
            save_window(data / "images" / f"{image_id}.jpg", 700 + 3 * c + j, split == "test")
            for level, (_, class_of) in AIRCRAFT.items():
                lists[level, split].append(f"{image_id} {class_of(c)}")
    for level, (plural, _) in AIRCRAFT.items():
        lists[level, "trainval"] = sorted(lists[level, "train"] + lists[level, "val"])
        classes = {"variant": VARIANTS, "family": FAMILIES, "manufacturer": MANUFACTURERS}[level]
        (data / f"{plural}.txt").write_text("\n".join(classes) + "\n")
    for (level, split), lines in lists.items():
        (data / f"images_{level}_{split}.txt").write_text("\n".join(sorted(lines)) + "\n")


@pytest.fixture(scope="module")
def aircraft(tmp_path_factory):
    root = tmp_path_factory.mktemp("aircraft")
    make_aircraft(root / "fgvc-aircraft-2013b")
    return root


@pytest.fixture(scope="module")
def dtd(tmp_path_factory):
    root = tmp_path_factory.mktemp("dtd")
    make_dtd(root / "dtd" / "dtd")
    return root


@pytest.fixture(scope="module")
def food(tmp_path_factory):
    root = tmp_path_factory.mktemp("food")
    make_food(root / "food-101")
    return root


@pytest.fixture(scope="module")
def datasets(pets, flowers, food, dtd, aircraft):
    return {"oxford-pets": pets, "flowers102": flowers, "food101": food, "dtd": dtd, "fgvc-aircraft": aircraft}


@pytest.fixture(scope="module")
def pets(tmp_path_factory):
    root = tmp_path_factory.mktemp("pets")
    make_pets(root / "oxford-iiit-pet")
    return root


@pytest.fixture(scope="module")
def flowers(tmp_path_factory):
    root = tmp_path_factory.mktemp("flowers")
    make_flowers(root / "flowers-102")
    return root


def tar_folder(path, folder, name, extras):
    """`folder` as the archive `path` holds it (named `name`), with the
    extra members `extras` (names in it, a subfolder's too)."""
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname=name)
        for extra in extras:
            info = tarfile.TarInfo(f"{name}/{extra}")
            info.size = 5
            tar.addfile(info, io.BytesIO(b"extra"))


def serve_pets(base, out):
    """Oxford-IIIT Pet's two archives as published (`images/`,
    `annotations/`, with members no reader needs) in `out`; their MD5s."""
    out.mkdir()
    tar_folder(out / "images.tar.gz", base / "images", "images", ["Abyssinian_100.mat", "sub/x.jpg"])
    tar_folder(out / "annotations.tar.gz", base / "annotations", "annotations", ["list.txt", "xmls/a.xml"])
    return [md5(str(out / f"{f}.tar.gz")) for f in ["images", "annotations"]]


def serve_flowers(base, out):
    """Oxford 102 Flowers' three files as published in `out`; their MD5s."""
    out.mkdir()
    tar_folder(out / "102flowers.tgz", base / "jpg", "jpg", ["README.txt", "sub/image_00001.jpg"])
    for f in ["imagelabels.mat", "setid.mat"]:
        (out / f).write_bytes((base / f).read_bytes())
    return [md5(str(out / f)) for f in ["102flowers.tgz", "imagelabels.mat", "setid.mat"]]


def serve_food(base, out):
    """Food-101's archive as published (holding `food-101/`, with members
    no reader needs, one trying to leave the folder) in `out`; its MD5."""
    out.mkdir()
    tar_folder(out / "food-101.tar.gz", base, "food-101",
               ["README.txt", "images/x.jpg", "images/dish_000/../../../evil.jpg"])
    return [md5(str(out / "food-101.tar.gz"))]


def serve_dtd(base, out):
    """DTD's archive as published (holding `dtd/`, with members no reader
    needs) in `out`; its MD5."""
    out.mkdir()
    tar_folder(out / "dtd-r1.0.1.tar.gz", base, "dtd",
               ["imdb/imdb.mat", "labels/labels_joint_anno.txt", "images/texture_00/.directory"])
    return [md5(str(out / "dtd-r1.0.1.tar.gz"))]


def serve_aircraft(base, out):
    """FGVC-Aircraft's archive as published (holding
    `fgvc-aircraft-2013b/`, with members no reader needs) in `out`; its MD5."""
    out.mkdir()
    tar_folder(out / "fgvc-aircraft-2013b.tar.gz", base, "fgvc-aircraft-2013b",
               ["README.html", "evaluation.m", "data/images/sub/x.jpg", "data/images/a.png"])
    return [md5(str(out / "fgvc-aircraft-2013b.tar.gz"))]


def torchvision_split(name, root, split, partition=1):
    """torchvision's reader of the dataset `name` in `root`: its split
    `split` ("train": what vggctl trains on; DTD's of `partition`)."""
    if name == "dtd":
        return torchvision.datasets.DTD(str(root), split=split, partition=partition)
    if name == "oxford-pets":
        return torchvision.datasets.OxfordIIITPet(str(root), split="trainval" if split == "train" else split)
    if name == "food101":
        return torchvision.datasets.Food101(str(root), split=split)
    if name == "fgvc-aircraft":
        return torchvision.datasets.FGVCAircraft(str(root), split=split)
    return flowers102(root, split)


def flowers102(root, split):
    """torchvision's Flowers102, trusting the test's MAT-files (it checks
    them against the real files' MD5s)."""
    class Ours(torchvision.datasets.Flowers102):
        _file_dict = {k: (f, md5(os.path.join(root, "flowers-102", f)) if k != "image" else s)
                      for k, (f, s) in torchvision.datasets.Flowers102._file_dict.items()}
    return Ours(str(root), split=split)


def features(*args, cwd, env=None, weights=WEIGHTS):
    return vggctl("features", "--device", "cpu", "--weights", weights, *args, cwd=cwd, env=env)


def refused_features(*args, cwd):
    """`features` where the data is refused: a small model's weights (no
    ImageNet head to load before the data is read)."""
    return features(*args, cwd=cwd, weights=SMALL)


def assert_rows_are_torchvisions(path, ds, name):
    """The rows `features` saved at `path` (classifier.6 at 64x64) are
    torchvision's VGG11 on `ds`'s images, with its classes and targets."""
    saved = load_file(path)
    meta = safe_open(str(path), "np").metadata()
    assert json.loads(meta["classes"]) == ds.classes
    assert (meta["dataset"], meta["split"]) == (name, "test")
    assert saved["labels"].tolist() == ds._labels
    model = torchvision.models.vgg11()
    model.load_state_dict(torch.load(WEIGHTS, weights_only=True))
    x = torch.stack([torch.from_numpy(np.array(ds[i][0])).permute(2, 0, 1) for i in range(len(ds))])
    with torch.no_grad():
        theirs = model.eval()(torchvision.transforms.functional.normalize(x.float() / 255, MEAN, STD)).numpy()
    ours = saved["classifier.6"]
    assert ours.shape == theirs.shape == (len(ds), 1000)
    err = np.abs(ours - theirs).max() / np.abs(theirs).max()
    assert err <= 1e-5, err


@pytest.mark.parametrize("name", NAMES)
def test_downloads_are_read_as_torchvision_reads_them(datasets, tmp_path, name):
    served, data, root = tmp_path / "served", tmp_path / "data", datasets[name]
    if name == "oxford-pets":
        sums, folder = serve_pets(root / "oxford-iiit-pet", served), "oxford-iiit-pet"
        files = ["annotations", "annotations.tar.gz", "images", "images.tar.gz"]
    elif name == "flowers102":
        sums, folder = serve_flowers(root / "flowers-102", served), "flowers-102"
        files = ["102flowers.tgz", "imagelabels.mat", "jpg", "setid.mat"]
    elif name == "food101":
        sums, folder = serve_food(root / "food-101", served), "food-101"
        files = ["images", "meta"]
    elif name == "fgvc-aircraft":
        sums, folder = serve_aircraft(root / "fgvc-aircraft-2013b", served), "fgvc-aircraft-2013b"
        files = ["data"]
    else:
        sums, folder = serve_dtd(root / "dtd" / "dtd", served), "dtd"
        files = ["dtd", "dtd-r1.0.1.tar.gz"]
    env = dict(os.environ, **{f"VGGCTL_{name.upper().replace('-', '_')}_MD5": ",".join(sums)})
    with mirror(str(served)) as url:
        r = features("--dataset", name, "--split", "test", "--data-dir", str(data), "--data-url", url,
                     "--input", "64", "--val-resize-size", "64", "--layer", "classifier.6",
                     "-o", "test.safetensors", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    # torchvision keeps Food-101's and FGVC-Aircraft's archive beside its
    # folder, the others' in it.
    beside = {"food101": ["food-101.tar.gz"], "fgvc-aircraft": ["fgvc-aircraft-2013b.tar.gz"]}.get(name, [])
    assert sorted(os.listdir(data)) == [folder, *beside] and sorted(os.listdir(data / folder)) == files
    ds = torchvision_split(name, data, "test")
    if name == "oxford-pets":
        assert sorted(os.listdir(data / folder / "annotations")) == ["test.txt", "trainval.txt"]
        assert ds.classes[:3] == ["Abyssinian", "American Bulldog", "American Pit Bull Terrier"]
        train = torchvision_split(name, data, "train")._labels
    elif name == "flowers102":
        assert sorted(os.listdir(data / folder / "jpg")) == sorted(os.listdir(root / folder / "jpg"))
        train = flowers102(data, "train")._labels + flowers102(data, "val")._labels
    elif name == "dtd":
        # Every partition's lists, the images of the class folders only.
        assert sorted(os.listdir(data / "dtd" / "dtd")) == ["images", "labels"]
        assert sorted(os.listdir(data / "dtd" / "dtd" / "labels")) == sorted(
            f"{s}{k}.txt" for s in ["train", "val", "test"] for k in range(1, 11))
        assert sorted(os.listdir(data / "dtd" / "dtd" / "images" / "texture_00")) == sorted(
            os.listdir(root / "dtd" / "dtd" / "images" / "texture_00"))
        assert ds.classes == sorted(TEXTURES) and len(ds) == 47
        # --split train --fold 2 below: partition 2's train then val.
        train = (torchvision_split(name, data, "train", 2)._labels
                 + torchvision_split(name, data, "val", 2)._labels)
    elif name == "fgvc-aircraft":
        # The lists and the photographs of data/, nothing else.
        listed = sorted(os.listdir(root / folder / "data"))
        assert sorted(os.listdir(data / folder / "data")) == listed and "images" in listed
        assert sorted(os.listdir(data / folder / "data" / "images")) == sorted(
            os.listdir(root / folder / "data" / "images"))
        assert ds.classes == VARIANTS and len(ds) == 10
        train = (torchvision_split(name, data, "train")._labels + torchvision_split(name, data, "val")._labels)
    else:
        assert sorted(os.listdir(data / folder / "meta")) == ["test.json", "train.json"]
        assert sorted(os.listdir(data / folder / "images")) == sorted(DISHES)
        assert ds.classes == sorted(DISHES) and ds._labels != sorted(ds._labels)
        assert not (tmp_path / "evil.jpg").exists() and not (served / "evil.jpg").exists()
        train = torchvision_split(name, data, "train")._labels
    assert_rows_are_torchvisions(tmp_path / "test.safetensors", ds, name)

    # --split train: trainval (pets), train then val (flowers, DTD's
    # partition 2), read from the folder now there.
    fold = ["--fold", "2"] if name == "dtd" else []
    r = features("--dataset", name, "--split", "train", "--data-dir", str(data), "--no-download", *fold,
                 "--input", "64", "--layer", "features.0", "--pool", "avg", "-o", "train.safetensors",
                 cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert load_file(tmp_path / "train.safetensors")["labels"].tolist() == train


@pytest.mark.parametrize("name, n_train, n_val", [("oxford-pets", 74, 37), ("flowers102", 20, 10),
                                                  ("food101", 101, 101), ("dtd", 94, 70),
                                                  ("fgvc-aircraft", 20, 10)])
def test_finetuning_trains_on_the_training_images_and_validates_on_the_test_images(
        datasets, tmp_path, name, n_train, n_val):
    root = datasets[name]
    out = tmp_path / "ft"
    # DTD: partition 2 (which tests 70 images; partition 1, 47).
    fold = ["--fold", "2"] if name == "dtd" else []
    r = vggctl("finetune", "--weights", WEIGHTS, "--arch", "vgg11", "--dataset", name, *fold,
               "--data-dir", str(root), "--no-download", "--input", "32", "--epochs", "1",
               "--batch-size", "128", "--keep", "last", "--cache-dir", str(tmp_path / "cache"),
               "--val-dir", str(root), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert f"on {name} ({n_train} train / {n_val} val images" in r.stderr, r.stderr
    # --val-dir is a folder's: ignored, and not recorded or suggested.
    assert "--val-dir is ignored: it applies to --dataset folder only" in r.stderr
    assert "--val-dir help" not in r.stderr
    if n_val < 100:
        assert f"holds only {n_val} images" in r.stderr and "more validation images help" in r.stderr, r.stderr
    assert json.loads((out / "config.json").read_text())["val_dir"] is None
    classes = torchvision_split(name, root, "test").classes
    assert json.loads(safe_open(str(out / "last.safetensors"), "np").metadata()["class_names"]) == classes
    assert json.loads((out / "config.json").read_text())["dataset"] == name
    # eval finds the run's data (streamed here, to compare with the file below).
    r = vggctl("eval", "--checkpoint", str(out / "last.safetensors"), "--cache-mem", "0", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["dataset"] == name and report["classes"] == classes
    assert report["images"] == n_val and sum(report["support"]) == n_val, report
    if name == "dtd":
        # The run's partition, recorded; --fold reads another.
        assert json.loads((out / "config.json").read_text())["fold"] == 2
        r = vggctl("eval", "--checkpoint", str(out / "last.safetensors"), "--fold", "1", "--json", cwd=tmp_path)
        assert r.returncode == 0 and json.loads(r.stdout)["images"] == 47, r.stderr
    if name == "fgvc-aircraft":
        # Its own val split: the ten images of images_variant_val.txt.
        r = vggctl("eval", "--checkpoint", str(out / "last.safetensors"), "--val-on", "val", "--json", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        val, labels = json.loads(r.stdout), torchvision_split(name, root, "val")._labels
        assert (val["split"], val["support"]) == ("val", np.bincount(labels, minlength=100).tolist()), val

    # `prepare` packs the dataset into one file, read (streamed) exactly as
    # its folder is streamed.
    packed = tmp_path / "packed.vggctl"
    r = vggctl("prepare", "--dataset", name, "--data-dir", str(root), *fold, "-o", str(packed))
    assert r.returncode == 0 and f"prepared {n_train + n_val} images" in r.stdout, r.stderr
    r = vggctl("eval", "--checkpoint", str(out / "last.safetensors"), "--data-dir", str(packed), "--json",
               cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    from_file = json.loads(r.stdout)
    assert from_file["images"] == n_val and from_file["dataset"] == name
    assert (from_file["loss"], from_file["top1"]) == (report["loss"], report["top1"]), (from_file, report)
    if name == "dtd":
        # The file packs partition 2: training on it asks for that one.
        r = vggctl("train", "--dataset", "dtd", "--data-dir", str(packed), "--input", "32", "--out",
                   str(tmp_path / "p1"))
        assert r.returncode == 2 and errors(r) == [
            f"vggctl: error: {packed}: packs DTD's partition 2, not 1: give --fold 2 (or prepare --fold 1 another file)"
        ], r.stderr


def edited_pets(pets, tmp_path, split, edit):
    """A copy of the pets (images linked) with `split`'s list edited."""
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
def test_bad_pet_lists_are_one_line_each(pets, tmp_path, split, edit, line):
    root = edited_pets(pets, tmp_path, split, edit)
    r = refused_features("--dataset", "oxford-pets", "--split", "test", "--data-dir", str(root), "--no-download",
                 "-o", "x.npy", cwd=tmp_path)
    lines = errors(r)
    assert r.returncode == 1 and len(lines) == 1 and line in lines[0], r.stderr
    assert not (tmp_path / "x.npy").exists()


@pytest.mark.parametrize("file, arrays, line", [
    ("imagelabels.mat", {"labels": np.array([[3, 0, 7] + [1] * 27], np.uint8)},
     "imagelabels.mat: 'labels': value 1 is 0, not a whole number from 1 to 102"),
    ("imagelabels.mat", {"labels": np.full((2, 15), 3, np.uint8)},
     "imagelabels.mat: 'labels': dimensions [2, 15], expected a vector"),
    ("setid.mat", {"trnid": SETID["trnid"][None], "valid": np.array([[31]], np.uint16), "tstid": SETID["tstid"][None]},
     "setid.mat: 'valid': value 0 is 31, not a whole number from 1 to 30"),
    ("setid.mat", {"trnid": SETID["trnid"][None], "valid": SETID["valid"][None]}, "setid.mat: no 'tstid' array"),
    ("setid.mat", None, "setid.mat: not Oxford 102 Flowers' trnid"),
])
def test_bad_flower_files_are_one_line_each(flowers, tmp_path, file, arrays, line):
    base = tmp_path / "edited" / "flowers-102"
    base.mkdir(parents=True)
    os.symlink(flowers / "flowers-102" / "jpg", base / "jpg")
    for f in ["imagelabels.mat", "setid.mat"]:
        (base / f).write_bytes((flowers / "flowers-102" / f).read_bytes())
    if arrays is None:
        (base / file).write_text("not a MAT-file")
    else:
        scipy.io.savemat(base / file, arrays, do_compression=True)
    r = refused_features("--dataset", "flowers102", "--split", "test", "--data-dir", str(tmp_path / "edited"),
                 "--no-download", "-o", "x.npy", cwd=tmp_path)
    lines = errors(r)
    assert r.returncode == 1 and len(lines) == 1 and line in lines[0], r.stderr
    assert not (tmp_path / "x.npy").exists()


@pytest.mark.parametrize("name", NAMES)
def test_missing_data_and_wrong_downloads_are_refused(datasets, tmp_path, name):
    def run(*args, env=None):
        return features("--dataset", name, "--split", "test", "-o", "x.npy", *args, cwd=tmp_path, env=env)

    empty = tmp_path / "empty"
    empty.mkdir()
    r = run("--data-dir", str(empty), "--no-download")
    first = {"oxford-pets": "oxford-iiit-pet/images/", "flowers102": "flowers-102/jpg/",
             "food101": "food-101/", "dtd": "dtd/dtd/", "fgvc-aircraft": "fgvc-aircraft-2013b/"}[name]
    title = TITLES[name]
    assert r.returncode == 1 and len(errors(r)) == 1, r.stderr
    assert f"no {title} in {empty}: expected {empty}/{first} and downloading is off" in r.stderr
    r = vggctl("prepare", "--dataset", name, "--data-dir", str(empty), "--no-download",
               "-o", str(tmp_path / "p.vggdata"))
    assert r.returncode == 1 and len(errors(r)) == 1, r.stderr
    assert f"no {title} in {empty}: expected {empty}/{first} and downloading is off" in r.stderr
    assert not (tmp_path / "p.vggdata").exists() and os.listdir(empty) == []

    # Its validation images are its test split: prepare takes no --val-dir.
    r = vggctl("prepare", "--dataset", name, "--data-dir", str(datasets[name]), "--val-dir", str(empty),
               "-o", str(tmp_path / "p.vggdata"))
    assert r.returncode == 2 and errors(r) == [
        f"vggctl: error: --val-dir: {name} validates on its own test split"], r.stderr
    assert not (tmp_path / "p.vggdata").exists()

    # features reads a split from memory; a streamed one is refused.
    r = run("--data-dir", str(datasets[name]), "--no-download", "--cache-mem", "0")
    assert r.returncode == 1 and len(errors(r)) == 1, r.stderr
    assert "features reads a split held in memory, and the test split is streamed" in r.stderr

    a_file = tmp_path / "a_file"
    a_file.write_text("")
    r = run("--data-dir", str(a_file))
    assert r.returncode == 1 and errors(r) == [
        f"vggctl: error: {a_file}: not a directory (--data-dir names the folder {name} is read from or downloaded into)"
    ], r.stderr

    # A wrong MD5 for the last file: it is refused, the others (checked)
    # stay for the next run, as a partial MNIST does; a data directory
    # made for nothing is removed.
    served, data, root = tmp_path / "served", tmp_path / "data", datasets[name]
    if name == "oxford-pets":
        sums, kept = serve_pets(root / "oxford-iiit-pet", served), ["images", "images.tar.gz"]
    elif name == "flowers102":
        sums, kept = serve_flowers(root / "flowers-102", served), ["102flowers.tgz", "imagelabels.mat", "jpg"]
    elif name == "food101":
        sums, kept = serve_food(root / "food-101", served), None
    elif name == "fgvc-aircraft":
        # No MD5 is published: without one, nothing is fetched.
        sums, kept = serve_aircraft(root / "fgvc-aircraft-2013b", served), None
        with mirror(str(served)) as url:
            r = run("--data-dir", str(data), "--data-url", url)
        assert r.returncode == 1 and len(errors(r)) == 1, r.stderr
        assert (f"no FGVC-Aircraft in {data}: {data}/fgvc-aircraft-2013b/ is not there, and its publisher gives no "
                "checksum of fgvc-aircraft-2013b.tar.gz (torchvision checks none), so vggctl downloads it only with "
                "the MD5 you trust, in $VGGCTL_FGVC_AIRCRAFT_MD5") in r.stderr, r.stderr
        assert not data.exists()
    else:
        sums, kept = serve_dtd(root / "dtd" / "dtd", served), None
    env = dict(os.environ, **{f"VGGCTL_{name.upper().replace('-', '_')}_MD5": ",".join(sums[:-1] + ["0" * 32])})
    with mirror(str(served)) as url:
        r = run("--data-dir", str(data), "--data-url", url, env=env)
    assert r.returncode == 1 and len(errors(r)) == 1, r.stderr
    assert f"could not download {title}" in r.stderr and "MD5" in r.stderr, r.stderr
    if kept is None:
        assert not data.exists()
    else:
        assert sorted(os.listdir(data / (first.split("/")[0]))) == kept
    assert not (tmp_path / "x.npy").exists()


@pytest.mark.parametrize("split, edit, line", [
    ("train", lambda d: d.pop("dish_005"), "train.json: 100 classes, where Food-101 has 101"),
    ("test", lambda d: d.update(soup=["soup/1"]), "test.json: class 'soup' is not one of train.json's"),
    ("test", lambda d: d.update(dish_005=["../../../etc/x"]), "test.json: class 'dish_005': '../../../etc/x' is not a path inside images/"),
    ("test", lambda d: d.update(dish_005="dish_005/12"), "test.json: class 'dish_005': not a list of image paths"),
    ("test", lambda d: d.clear(), "test.json: lists no images"),
    ("train", None, "train.json: not JSON"),
])
def test_bad_food_lists_are_one_line_each(food, tmp_path, split, edit, line):
    base = tmp_path / "edited" / "food-101"
    (base / "meta").mkdir(parents=True)
    os.symlink(food / "food-101" / "images", base / "images")
    for s in ["train", "test"]:
        text = (food / "food-101" / "meta" / f"{s}.json").read_text()
        if s == split:
            if edit is None:
                text = text[:-5]
            else:
                doc = json.loads(text)
                edit(doc)
                text = json.dumps(doc)
        (base / "meta" / f"{s}.json").write_text(text)
    r = refused_features("--dataset", "food101", "--split", "test", "--data-dir", str(tmp_path / "edited"),
                 "--no-download", "-o", "x.npy", cwd=tmp_path)
    lines = errors(r)
    assert r.returncode == 1 and len(lines) == 1 and line in lines[0], r.stderr
    assert not (tmp_path / "x.npy").exists()


@pytest.mark.parametrize("split, edit, line", [
    ("test", lambda ls: ["texture_00/a/b.jpg"] + ls, "test1.txt: line 1: 'texture_00/a/b.jpg' is not <class>/<image>"),
    ("train", lambda ls: ls[:2] + ["../x.jpg"] + ls[2:],
     "train1.txt: line 3: '../x.jpg' is not <class>/<image> of plain file names"),
    ("test", lambda ls: ["stone/stone_0001.jpg"] + ls,
     "test1.txt: line 1: class 'stone' is not one of train1.txt's and val1.txt's"),
    ("train", lambda ls: ls + ["stone/stone_0001.jpg"], "train1.txt and val1.txt: 48 classes, where DTD has 47"),
    ("val", lambda ls: [], "val1.txt: lists no images"),
    (None, None, "vggctl: error: --fold 11: DTD's partitions are 1 to 10"),
])
def test_bad_dtd_lists_and_partitions_are_one_line_each(dtd, tmp_path, split, edit, line):
    data = tmp_path / "edited" / "dtd" / "dtd"
    (data / "labels").mkdir(parents=True)
    os.symlink(dtd / "dtd" / "dtd" / "images", data / "images")
    for s in ["train", "val", "test"]:
        lines = (dtd / "dtd" / "dtd" / "labels" / f"{s}1.txt").read_text().splitlines()
        (data / "labels" / f"{s}1.txt").write_text("\n".join(edit(lines) if s == split else lines) + "\n")
    fold = ["--fold", "11"] if split is None else []
    r = refused_features("--dataset", "dtd", "--split", "test", "--data-dir", str(tmp_path / "edited"),
                 "--no-download", *fold, "-o", "x.npy", cwd=tmp_path)
    lines = errors(r)
    assert r.returncode == (2 if split is None else 1) and len(lines) == 1 and line in lines[0], r.stderr
    assert not (tmp_path / "x.npy").exists()


@pytest.mark.parametrize("level, file, edit, line", [
    ("variant", "test", lambda ls: ls + ["1000999 Boeing 999"],
     "images_variant_test.txt: line 11: variant 'Boeing 999' is not one of variants.txt's"),
    ("variant", "train", lambda ls: ["1000998"] + ls,
     "images_variant_train.txt: line 1: '1000998' is not '<image id> <variant>'"),
    ("variant", "val", lambda ls: [f"../x {VARIANTS[0]}"] + ls,
     "images_variant_val.txt: line 1: '../x' is not a plain file name"),
    ("variant", "variants", lambda ls: ls[:-1], "variants.txt: 99 variants, where FGVC-Aircraft has 100"),
    ("variant", "variants", lambda ls: ls[:-1] + ls[:1], f"variants.txt: '{VARIANTS[0]}' is listed twice"),
    # A variant is no family; the families are 70.
    ("family", "test", lambda ls: ls + [f"1000999 {VARIANTS[0]}"],
     f"images_family_test.txt: line 11: family '{VARIANTS[0]}' is not one of families.txt's"),
    ("family", "families", lambda ls: ls + ["Boeing 999"], "families.txt: 71 families, where FGVC-Aircraft has 70"),
    ("manufacturer", "manufacturers", lambda ls: ls[:-1],
     "manufacturers.txt: 29 manufacturers, where FGVC-Aircraft has 30"),
])
def test_bad_aircraft_lists_are_one_line_each(aircraft, tmp_path, level, file, edit, line):
    data = tmp_path / "edited" / "fgvc-aircraft-2013b" / "data"
    data.mkdir(parents=True)
    source = aircraft / "fgvc-aircraft-2013b" / "data"
    os.symlink(source / "images", data / "images")
    for f in [AIRCRAFT[level][0], f"images_{level}_train", f"images_{level}_val", f"images_{level}_test"]:
        lines = (source / f"{f}.txt").read_text().splitlines()
        edited = edit(lines) if f.endswith(file) else lines
        (data / f"{f}.txt").write_text("\n".join(edited) + "\n")
    name = "fgvc-aircraft" if level == "variant" else f"fgvc-aircraft-{level}"
    r = refused_features("--dataset", name, "--split", "test", "--data-dir", str(tmp_path / "edited"),
                         "--no-download", "-o", "x.npy", cwd=tmp_path)
    lines = errors(r)
    assert r.returncode == 1 and len(lines) == 1 and line in lines[0], r.stderr
    assert not (tmp_path / "x.npy").exists()


@pytest.mark.parametrize("level", ["family", "manufacturer"])
def test_aircraft_levels_are_torchvisions(aircraft, tmp_path, level):
    """`--dataset fgvc-aircraft-LEVEL` reads torchvision's
    `FGVCAircraft(annotation_level=LEVEL)`: its classes and labels (test;
    train then val), a run's head of as many classes, eval of the run, and
    a file prepared at that level, refused at another."""
    name = f"fgvc-aircraft-{level}"
    ds = {s: torchvision.datasets.FGVCAircraft(str(aircraft), split=s, annotation_level=level)
          for s in ["train", "val", "test"]}
    assert len(ds["test"].classes) == {"family": 70, "manufacturer": 30}[level]
    for split, labels in [("test", ds["test"]._labels), ("train", ds["train"]._labels + ds["val"]._labels)]:
        r = refused_features("--dataset", name, "--split", split, "--data-dir", str(aircraft), "--no-download",
                             "--input", "32", "--layer", "features.0", "--pool", "avg", "-o", f"{split}.safetensors",
                             cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        meta = safe_open(str(tmp_path / f"{split}.safetensors"), "np").metadata()
        assert json.loads(meta["classes"]) == ds["test"].classes and meta["dataset"] == name
        assert load_file(tmp_path / f"{split}.safetensors")["labels"].tolist() == labels

    out = tmp_path / "run"
    r = vggctl("train", "--arch", "vgg11", "--head", "gap", "--dataset", name, "--data-dir", str(aircraft),
               "--no-download", "--input", "32", "--epochs", "1", "--batch-size", "128", "--cache-dir",
               str(tmp_path / "cache"), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert f"on {name} (20 train / 10 val images" in r.stderr, r.stderr
    meta = safe_open(str(out / "last.safetensors"), "np").metadata()
    assert json.loads(meta["class_names"]) == ds["test"].classes
    assert load_file(out / "last.safetensors")["classifier.weight"].shape[0] == len(ds["test"].classes)
    packed = tmp_path / "packed.vggctl"
    r = vggctl("prepare", "--dataset", name, "--data-dir", str(aircraft), "-o", str(packed))
    assert r.returncode == 0 and "prepared 30 images" in r.stdout, r.stderr
    for data in [[], ["--data-dir", str(packed)]]:
        r = vggctl("eval", "--checkpoint", str(out / "last.safetensors"), *data, "--json", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        report = json.loads(r.stdout)
        assert report["dataset"] == name and report["classes"] == ds["test"].classes
        assert report["support"] == np.bincount(ds["test"]._labels, minlength=len(ds["test"].classes)).tolist()
    # The file packs this level's classes: another level's run is refused.
    r = vggctl("train", "--dataset", "fgvc-aircraft", "--data-dir", str(packed), "--input", "32",
               "--out", str(tmp_path / "other"))
    classes = len(ds["test"].classes)
    assert r.returncode == 2 and errors(r) == [
        f"vggctl: error: {packed}: packs {classes} classes, where fgvc-aircraft has 100: give the --dataset it was "
        "prepared from (or prepare --dataset fgvc-aircraft another file)"], r.stderr
    assert not (tmp_path / "other").exists()


def test_val_on_val_trains_on_train_and_validates_on_val(flowers, pets, tmp_path):
    """--val-on val: Oxford 102 Flowers trains on its train split alone and
    validates on its val split; eval of the run reads test, and with
    --val-on val the val split, from the folder and from the packed file.
    Oxford-IIIT Pet, without a val split, validates on the part
    --val-split holds out of trainval (seeded), which eval of the run
    reads again."""
    out = tmp_path / "ft"
    r = vggctl("train", "--arch", "vgg11", "--head", "gap", "--dataset", "flowers102", "--val-on", "val",
               "--data-dir", str(flowers), "--no-download", "--input", "32", "--epochs", "1", "--batch-size", "128",
               "--cache-dir", str(tmp_path / "cache"), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "on flowers102 (10 train / 10 val images" in r.stderr, r.stderr
    assert json.loads((out / "config.json").read_text())["val_on"] == "val"
    logged = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    packed = tmp_path / "packed.vggctl"
    assert vggctl("prepare", "--dataset", "flowers102", "--data-dir", str(flowers), "-o", str(packed)).returncode == 0
    for data in [[], ["--data-dir", str(packed)]]:
        for split, val_on in [("test", []), ("val", ["--val-on", "val"])]:
            r = vggctl("eval", "--checkpoint", str(out / "last.safetensors"), *val_on, *data, "--json", cwd=tmp_path)
            assert r.returncode == 0, r.stderr
            report = json.loads(r.stdout)
            labels = flowers102(flowers, split)._labels
            assert report["split"] == split and report["support"] == np.bincount(labels, minlength=102).tolist()
            if split == "val" and not data:
                # The images the run validated on, read as it read them.
                assert abs(report["loss"] - logged["test_loss"]) <= 1e-5 * logged["test_loss"], (report, logged)

    out = tmp_path / "pets"
    r = vggctl("train", "--arch", "vgg11", "--head", "gap", "--dataset", "oxford-pets", "--val-on", "val",
               "--seed", "3", "--data-dir", str(pets), "--no-download", "--input", "32", "--epochs", "1",
               "--batch-size", "128", "--cache-dir", str(tmp_path / "cache"), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "on oxford-pets (67 train / 7 val images" in r.stderr, r.stderr
    logged = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    r = vggctl("eval", "--checkpoint", str(out / "last.safetensors"), "--val-on", "val", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["images"] == 7 and abs(report["loss"] - logged["test_loss"]) <= 1e-5 * logged["test_loss"]

    # features reads the split --split names; a file of flowers is no DTD.
    r = refused_features("--dataset", "flowers102", "--split", "test", "--val-on", "val", "--data-dir",
                         str(flowers), "-o", "x.npy", cwd=tmp_path)
    assert r.returncode == 2 and errors(r) == [
        "vggctl: error: --val-on: features reads the split --split names (the train split of flowers102, dtd, "
        "fgvc-aircraft* and country211 is train then val)"], r.stderr
    r = vggctl("eval", "--checkpoint", str(out / "last.safetensors"), "--dataset", "dtd", "--data-dir", str(packed))
    assert r.returncode == 1 and errors(r) == [
        f"vggctl: error: {packed}: not a file of DTD (vggctl prepare --dataset dtd makes one)"], r.stderr

    # A folder holds out its validation images already.
    r = vggctl("train", "--dataset", "folder", "--val-on", "val", "--data-dir", str(tmp_path))
    assert r.returncode == 2 and errors(r) == [
        "vggctl: error: --val-on val: --dataset folder validates on --val-dir, or the part --val-split holds out; "
        "leave --val-on out"], r.stderr
    r = vggctl("eval", "--checkpoint", str(out / "last.safetensors"), "--dataset", "imagenet", "--val-on", "val")
    assert r.returncode == 2 and errors(r) == [
        "vggctl: error: --val-on val: --dataset imagenet validates on DIR/val (ImageNet's val split); "
        "leave --val-on out"], r.stderr
    # Only DTD has partitions to pack.
    r = vggctl("prepare", "--dataset", "oxford-pets", "--fold", "2", "--data-dir", str(pets), "-o", str(tmp_path / "f"))
    assert r.returncode == 2 and errors(r) == [
        "vggctl: error: --fold: prepare packs a partition of --dataset dtd only"], r.stderr
    assert not (tmp_path / "f").exists()
