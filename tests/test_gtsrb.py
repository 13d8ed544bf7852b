"""`--dataset gtsrb` against torchvision's own `GTSRB` reader on the same
folders. The layout is torchvision's, made of real photographs
(scikit-image's) cut into distinct windows and stored as PPM (lossless, as
GTSRB's are):

- `gtsrb/GTSRB/Training/000NN/000NN_0000K.ppm`, two images of each of the
  43 signs, of various sizes (GTSRB's are 15 to 250 pixels a side), each
  folder with its `GT-000NN.csv` (no image) and one with a `.png`, which
  torchvision's reader (`.ppm` only) leaves out;
- `gtsrb/GTSRB/Final_Test/Images/NNNNN.ppm`, 43 test images (64x64, so
  that both sides read them without a resize) in shuffled class order,
  and one the list leaves out;
- `gtsrb/GT-final_test.csv`, `;`-separated as published (with the
  columns no reader needs, and spaces after some separators).

- Downloaded from a mirror on 127.0.0.1 as the three zips torchvision
  downloads (with members no reader needs, and one trying to leave the
  folder), then read: `features --split test` saves the signs' names,
  torchvision's targets in its order, and rows equal to torchvision's VGG11
  on its images within 1e-5; `--split train` gives its training targets.
  Only the images, the list and the zips are left in the data directory.
- `train` on it validates on the test images, never mirrors them, and
  `eval` of its checkpoint counts the 43 test images under the signs' names.
- Bad lists and class folders, a missing dataset, a wrong MD5 and a damaged
  zip get one line each and leave nothing behind.
"""
import json
import os
import shutil
import sys
import zipfile

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from safetensors import safe_open
from safetensors.numpy import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dataset_helpers import FIX, errors, md5, mirror, vggctl, window  # noqa: E402

WEIGHTS = os.path.join(FIX, "pth", "vgg11.legacy.pth")
# For runs refused before the data is read: no ImageNet head to load.
SMALL = os.path.join(FIX, "pth", "vgg11-cifar.legacy.pth")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# The test images' classes, in the list's (shuffled) order.
TEST_CLASSES = np.random.default_rng(11).permutation(43).tolist()
FILES = ["GTSRB-Training_fixed.zip", "GTSRB_Final_Test_Images.zip", "GTSRB_Final_Test_GT.zip"]
HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"


def save_window(path, k, h, w):
    """The k-th distinct h x w window of the photographs, as PPM."""
    Image.fromarray(window(k, h, w)).save(path, format="PPM")


def make_gtsrb(base):
    """GTSRB's layout in `base` (`ROOT/gtsrb`)."""
    training, test = base / "GTSRB" / "Training", base / "GTSRB" / "Final_Test" / "Images"
    test.mkdir(parents=True)
    for c in range(43):
        folder = training / f"{c:05d}"
        folder.mkdir(parents=True)
        for k in range(2):
            side = 20 + (7 * c + 31 * k) % 60
            save_window(folder / f"{c:05d}_{k:05d}.ppm", 2 * c + k, side, side + (c % 5) - 2)
        (folder / f"GT-{c:05d}.csv").write_text(HEADER + "\n")
    save_window(training / "00003" / "extra.png", 200, 30, 30)
    rows = [HEADER]
    for i, c in enumerate(TEST_CLASSES):
        save_window(test / f"{i:05d}.ppm", 100 + i, 64, 64)
        rows.append(f"{i:05d}.ppm;64;64;5;5;{'' if i % 2 else ' '}58;58;{c}")
    save_window(test / "00043.ppm", 150, 64, 64)
    (test / "GT-final_test.test.csv").write_text(HEADER.rsplit(";", 1)[0] + "\n")
    (base / "GT-final_test.csv").write_text("\r\n".join(rows) + "\r\n")


@pytest.fixture(scope="module")
def gtsrb(tmp_path_factory):
    root = tmp_path_factory.mktemp("gtsrb")
    make_gtsrb(root / "gtsrb")
    return root


def zip_folder(path, base, folder, extras):
    """`base/folder`'s files as the zip `path` holds them (named by their
    paths from `base`), with the extra members `extras`."""
    with zipfile.ZipFile(path, "w") as z:
        for dirpath, _, files in sorted(os.walk(base / folder)):
            for f in sorted(files):
                full = os.path.join(dirpath, f)
                z.write(full, os.path.relpath(full, base))
        for extra in extras:
            z.writestr(extra, b"extra")


def serve_gtsrb(base, out):
    """GTSRB's three zips as published in `out`; their MD5s."""
    out.mkdir()
    zip_folder(out / FILES[0], base, "GTSRB/Training",
               ["GTSRB/Readme-Images.txt", "GTSRB/Training/00000/../../../evil.ppm", "GTSRB/Training/a.ppm"])
    zip_folder(out / FILES[1], base, "GTSRB/Final_Test", ["GTSRB/Readme-Images-Final-test.txt"])
    with zipfile.ZipFile(out / FILES[2], "w") as z:
        z.write(base / "GT-final_test.csv", "GT-final_test.csv")
        z.writestr("readme.txt", b"extra")
    return [md5(str(out / f)) for f in FILES]


def features(*args, cwd, env=None, weights=WEIGHTS):
    return vggctl("features", "--device", "cpu", "--weights", weights, *args, cwd=cwd, env=env)


def listing(path):
    return sorted(os.listdir(path))


def test_a_download_is_read_as_torchvision_reads_it(gtsrb, tmp_path):
    served, data = tmp_path / "served", tmp_path / "data"
    sums = serve_gtsrb(gtsrb / "gtsrb", served)
    env = dict(os.environ, VGGCTL_GTSRB_MD5=",".join(sums))
    with mirror(str(served)) as url:
        r = features("--dataset", "gtsrb", "--split", "test", "--data-dir", str(data), "--data-url", url,
                     "--input", "64", "--val-resize-size", "64", "--layer", "classifier.6",
                     "-o", "test.safetensors", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    # torchvision's folders and the zips, with only the images and the list.
    base = data / "gtsrb"
    assert listing(data) == ["gtsrb"] and listing(base) == sorted(["GT-final_test.csv", "GTSRB", *FILES])
    assert listing(base / "GTSRB") == ["Final_Test", "Training"]
    assert listing(base / "GTSRB" / "Training") == [f"{c:05d}" for c in range(43)]
    assert listing(base / "GTSRB" / "Training" / "00003") == ["00003_00000.ppm", "00003_00001.ppm"]
    assert listing(base / "GTSRB" / "Final_Test") == ["Images"]
    assert listing(base / "GTSRB" / "Final_Test" / "Images") == [f"{i:05d}.ppm" for i in range(44)]
    assert not any((p / "evil.ppm").exists() for p in [tmp_path, data, served, base])

    ds = torchvision.datasets.GTSRB(str(data), split="test")
    saved = load_file(tmp_path / "test.safetensors")
    meta = safe_open(str(tmp_path / "test.safetensors"), "np").metadata()
    classes = json.loads(meta["classes"])
    assert len(classes) == 43 and classes[14] == "Stop" and classes[38] == "Keep right"
    assert saved["labels"].tolist() == [t for _, t in ds._samples] == TEST_CLASSES
    model = torchvision.models.vgg11()
    model.load_state_dict(torch.load(WEIGHTS, weights_only=True))
    x = torch.stack([torch.from_numpy(np.array(ds[i][0])).permute(2, 0, 1) for i in range(len(ds))])
    with torch.no_grad():
        theirs = model.eval()(torchvision.transforms.functional.normalize(x.float() / 255, MEAN, STD)).numpy()
    ours = saved["classifier.6"]
    assert ours.shape == theirs.shape == (43, 1000)
    err = np.abs(ours - theirs).max() / np.abs(theirs).max()
    assert err <= 1e-5, err

    # --split train: ImageFolder's order of the .ppm files.
    r = features("--dataset", "gtsrb", "--split", "train", "--data-dir", str(data), "--no-download",
                 "--input", "32", "--layer", "features.0", "--pool", "avg", "-o", "train.safetensors", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    train = [t for _, t in torchvision.datasets.GTSRB(str(data), split="train")._samples]
    assert load_file(tmp_path / "train.safetensors")["labels"].tolist() == train == sorted(2 * list(range(43)))


def test_training_validates_on_the_test_images_unmirrored(gtsrb, tmp_path):
    out = tmp_path / "run"
    r = vggctl("train", "--arch", "vgg11", "--head", "gap", "--dataset", "gtsrb", "--data-dir", str(gtsrb),
               "--no-download", "--epochs", "1", "--batch-size", "32", "--device", "cpu",
               "--cache-dir", str(tmp_path / "cache"), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "on gtsrb (86 train / 43 val images" in r.stderr, r.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["dataset"] == "gtsrb" and config["hflip"] == 0, config
    r = vggctl("eval", "--checkpoint", str(out / "last.safetensors"), "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["images"] == 43 and report["support"] == [1] * 43, report
    assert report["classes"][0] == "Speed limit (20km/h)" and report["classes"][42].startswith("End of no passing")


def edited(gtsrb, tmp_path, edit):
    """A copy of the dataset (images copied) changed by `edit(base)`."""
    root = tmp_path / "edited"
    shutil.copytree(gtsrb, root)
    edit(root / "gtsrb")
    return root


def rewrite_list(f):
    def edit(base):
        path = base / "GT-final_test.csv"
        path.write_text("\n".join(f(path.read_text().splitlines())) + "\n")
    return edit


@pytest.mark.parametrize("edit, line", [
    (rewrite_list(lambda ls: [ls[0].replace("ClassId", "Class")] + ls[1:]),
     "GT-final_test.csv: its header names no Filename and ClassId columns"),
    (rewrite_list(lambda ls: ls[:3] + ["00099.ppm;64;64;5;5;58;58;43"] + ls[3:]),
     "GT-final_test.csv: line 4: ClassId '43' is not one of 0 to 42"),
    (rewrite_list(lambda ls: ls[:2] + ["../x.ppm;64;64;5;5;58;58;3"] + ls[2:]),
     "GT-final_test.csv: line 3: '../x.ppm' is not a plain file name"),
    (rewrite_list(lambda ls: ls + ["00099.ppm;64"]), "GT-final_test.csv: line 45: 2 fields, too few for its header's"),
    (rewrite_list(lambda ls: ls[:1]), "GT-final_test.csv: lists no images"),
    (lambda b: shutil.copytree(b / "GTSRB" / "Training" / "00042", b / "GTSRB" / "Training" / "00043"),
     "Training: '00043' is not one of GTSRB's class folders (00000 to 00042)"),
    (lambda b: shutil.rmtree(b / "GTSRB" / "Training" / "00042"),
     "Training: 42 class folders, where GTSRB has 43 (00000 to 00042)"),
    (lambda b: [os.remove(b / "GTSRB" / "Training" / "00003" / f"00003_0000{k}.ppm") for k in range(2)],
     "Training: no .ppm images in class folder(s) 00003"),
])
def test_bad_lists_and_folders_are_one_line_each(gtsrb, tmp_path, edit, line):
    root = edited(gtsrb, tmp_path, edit)
    r = vggctl("prepare", "--dataset", "gtsrb", "--data-dir", str(root), "--no-download",
               "-o", str(tmp_path / "p.vggdata"))
    lines = errors(r)
    assert r.returncode == 1 and len(lines) == 1 and line in lines[0], r.stderr
    assert not (tmp_path / "p.vggdata").exists()


def test_missing_data_wrong_downloads_and_damaged_zips_are_refused(gtsrb, tmp_path):
    def run(data, *args, env=None):
        return features("--dataset", "gtsrb", "--split", "test", "--data-dir", str(data), "-o", "x.npy", *args,
                        cwd=tmp_path, env=env, weights=SMALL)

    empty = tmp_path / "empty"
    empty.mkdir()
    r = run(empty, "--no-download")
    assert r.returncode == 1 and len(errors(r)) == 1, r.stderr
    assert (f"no GTSRB in {empty}: expected {empty}/gtsrb/GTSRB/Training/ and downloading is off; put torchvision's "
            f"gtsrb/ (GTSRB/Training/ of {FILES[0]}, GTSRB/Final_Test/Images/ of {FILES[1]}, GT-final_test.csv of "
            f"{FILES[2]}, from https://sid.erda.dk/") in r.stderr, r.stderr
    assert os.listdir(empty) == []

    # A wrong MD5 for the last zip: it is refused, the others (checked and
    # extracted) stay for the next run.
    served, data = tmp_path / "served", tmp_path / "data"
    sums = serve_gtsrb(gtsrb / "gtsrb", served)
    with mirror(str(served)) as url:
        env = dict(os.environ, VGGCTL_GTSRB_MD5=",".join(sums[:2] + ["0" * 32]))
        r = run(data, "--data-url", url, env=env)
        assert r.returncode == 1 and len(errors(r)) == 1, r.stderr
        assert "could not download GTSRB" in r.stderr and "MD5" in r.stderr, r.stderr
        assert listing(data / "gtsrb") == sorted(["GTSRB", *FILES[:2]])

        # A damaged zip whose MD5 is the one given: one line, nothing of it kept.
        (served / FILES[2]).write_bytes((served / FILES[2]).read_bytes()[:-30])
        env = dict(os.environ, VGGCTL_GTSRB_MD5=",".join(sums[:2] + [md5(str(served / FILES[2]))]))
        r = run(data, "--data-url", url, env=env)
        assert r.returncode == 1 and len(errors(r)) == 1, r.stderr
        assert f"{data}/gtsrb/{FILES[2]}: not a zip archive, or a damaged one" in r.stderr, r.stderr
        assert listing(data / "gtsrb") == sorted(["GTSRB", *FILES[:2]])

        # The training images' zip alone, into a fresh directory: the
        # folders made for it go again when it is damaged.
        (served / FILES[0]).write_bytes(b"PK\x03\x04" + b"\0" * 100)
        env = dict(os.environ, VGGCTL_GTSRB_MD5=",".join([md5(str(served / FILES[0]))] + sums[1:]))
        r = run(tmp_path / "fresh", "--data-url", url, env=env)
        assert r.returncode == 1 and len(errors(r)) == 1 and "not a zip archive" in r.stderr, r.stderr
        assert not (tmp_path / "fresh").exists()
    assert not (tmp_path / "x.npy").exists()
