"""`--dataset caltech256` against torchvision's own `Caltech256` reader on
the same folder: `caltech256/256_ObjectCategories/<NNN.name>/NNN_KKKK.jpg`,
the 257 class folders (`257.clutter` last) holding one to three 32x32
windows of real photographs (scikit-image's), and what torchvision does
not read: a subfolder (`056.dog/greg/`, as the real one has), a file not
named `.jpg` (`198.spider/RENAME2`) and a `.JPG`.

- Downloaded from a mirror on 127.0.0.1 as the plain `.tar` torchvision
  downloads (with those members, one trying to leave the folder), then
  packed: the file `prepare` writes lists torchvision's samples, the same
  files with the same classes in the same order.
- `train` on the folder validates on the part `--val-split` holds out, and
  `eval` of its checkpoint reads that part again.
- `--val-on val`, a class folder too few and a missing dataset are one
  line each.
"""
import json
import os
import shutil
import sys
import tarfile

import torchvision
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dataset_helpers import errors, md5, mirror, missing_dataset_error, packed_index, vggctl, window  # noqa: E402

CLASSES = [f"{c:03d}.class{c}" for c in range(1, 257)] + ["257.clutter"]
CLASSES[55], CLASSES[197] = "056.dog", "198.spider"


def make_caltech(base):
    """Caltech-256's layout in `base` (`ROOT/caltech256`)."""
    images = base / "256_ObjectCategories"
    for c, name in enumerate(CLASSES):
        (images / name).mkdir(parents=True)
        for k in range(1 + c % 3):
            Image.fromarray(window(c + 300 * k, 32, 32)).save(images / name / f"{c + 1:03d}_{k + 1:04d}.jpg")
    (images / "056.dog" / "greg").mkdir()
    Image.fromarray(window(999, 32, 32)).save(images / "056.dog" / "greg" / "056_0099.jpg")
    (images / "198.spider" / "RENAME2").write_text("not an image")
    Image.fromarray(window(998, 32, 32)).save(images / "001.class1" / "001_0100.JPG", format="JPEG")


def serve(base, out):
    """256_ObjectCategories.tar as published (a plain tar, with one member
    trying to leave the folder) in `out`; its MD5."""
    out.mkdir()
    path = out / "256_ObjectCategories.tar"
    with tarfile.open(path, "w") as tar:
        tar.add(base / "256_ObjectCategories", arcname="256_ObjectCategories")
        tar.add(base / "256_ObjectCategories" / "001.class1" / "001_0001.jpg",
                arcname="256_ObjectCategories/001.class1/../../evil.jpg")
    return md5(str(path))


def test_a_download_lists_torchvisions_samples(tmp_path):
    make_caltech(tmp_path / "made" / "caltech256")
    served, data = tmp_path / "served", tmp_path / "data"
    sums = serve(tmp_path / "made" / "caltech256", served)
    packed = tmp_path / "caltech.vggdata"
    with mirror(str(served)) as url:
        env = dict(os.environ, VGGCTL_CALTECH256_URL=url, VGGCTL_CALTECH256_MD5=sums)
        r = vggctl("prepare", "--dataset", "caltech256", "--data-dir", str(data), "-o", str(packed), env=env)
    assert r.returncode == 0, r.stderr
    images = data / "caltech256" / "256_ObjectCategories"
    assert sorted(os.listdir(data / "caltech256")) == ["256_ObjectCategories", "256_ObjectCategories.tar"]
    assert sorted(os.listdir(images)) == CLASSES
    # Only the class folders' .jpg files are extracted.
    assert sorted(os.listdir(images / "056.dog")) == ["056_0001.jpg", "056_0002.jpg"]
    assert sorted(os.listdir(images / "198.spider")) == [f"198_{k:04d}.jpg" for k in (1, 2, 3)]
    assert sorted(os.listdir(images / "001.class1")) == ["001_0001.jpg"]
    assert not any((p / "evil.jpg").exists() for p in [tmp_path, data, served, data / "caltech256"])

    ds = torchvision.datasets.Caltech256(str(data))
    assert ds.categories == CLASSES
    theirs = [(f"{CLASSES[y]}/{y + 1:03d}_{i:04d}.jpg", y) for y, i in zip(ds.y, ds.index)]
    index = packed_index(packed)
    assert index["classes"] == CLASSES and index.get("val") is None
    assert [(e["name"], e["label"]) for e in index["train"]] == theirs
    assert f"prepared {len(theirs)} images" in r.stdout and len(theirs) == 513


def test_training_validates_on_the_part_val_split_holds_out(tmp_path):
    make_caltech(tmp_path / "caltech256")
    out = tmp_path / "run"
    r = vggctl("train", "--dataset", "caltech256", "--data-dir", str(tmp_path), "--no-download", "--arch", "vgg11",
               "--head", "gap", "--epochs", "1", "--batch-size", "256", "--device", "cpu",
               "--cache-dir", str(tmp_path / "cache"), "--out", str(out))
    assert r.returncode == 0, r.stderr
    # The 513 images torchvision reads (not greg/'s, RENAME2 or the .JPG): 51 held out.
    assert "on caltech256 (462 train / 51 val images, 32x32" in r.stderr, r.stderr
    r = vggctl("eval", "--checkpoint", str(out / "last.safetensors"), "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["images"] == 51 and len(report["classes"]) == 257 and report["classes"][-1] == "257.clutter"

    r = vggctl("train", "--dataset", "caltech256", "--data-dir", str(tmp_path), "--val-on", "val", cwd=tmp_path)
    assert r.returncode == 2 and errors(r) == [
        "vggctl: error: --val-on val: --dataset caltech256 validates on the part --val-split holds out (it has no "
        "test split); leave --val-on out"], r.stderr
    shutil.rmtree(tmp_path / "caltech256" / "256_ObjectCategories" / "257.clutter")
    r = vggctl("prepare", "--dataset", "caltech256", "--data-dir", str(tmp_path), "--no-download", "-o",
               str(tmp_path / "p.vggdata"))
    assert r.returncode == 1 and len(errors(r)) == 1, r.stderr
    assert "256_ObjectCategories: 256 class folders, where Caltech-256 has 257" in r.stderr, r.stderr
    assert not (tmp_path / "p.vggdata").exists()
    line, empty = missing_dataset_error("caltech256", tmp_path)
    assert (f"no Caltech-256 in {empty}: expected {empty}/caltech256/256_ObjectCategories/ and downloading is "
            "off; put torchvision's caltech256/ (256_ObjectCategories/ of 256_ObjectCategories.tar, from "
            "https://data.caltech.edu/records/nyy15-4j048/files/)") in line, line
