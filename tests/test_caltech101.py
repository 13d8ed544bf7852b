"""`--dataset caltech101` against torchvision's own `Caltech101` reader on
the same folder: `caltech101/101_ObjectCategories/<class>/image_KKKK.jpg`,
its 101 class folders (in case-mixed names, `Faces_easy` beside
`accordion`) holding one to three 32x32 JPEG windows of real photographs
(scikit-image's), and `BACKGROUND_Google`, which is no class.

- Downloaded from a mirror on 127.0.0.1 as the zip torchvision downloads
  (`caltech-101/101_ObjectCategories.tar.gz` beside the annotations'
  archive and a stray member), then packed: the file `prepare` writes lists
  torchvision's samples, the same files with the same classes in the same
  order; the images' archive taken from the zip is not left behind, and a
  second run reads the folder without the zip.
- A damaged inner archive is one line, and the next run downloads again;
  `--val-on val`, a class folder too few and a missing dataset are one
  line each.
"""
import io
import os
import shutil
import sys
import tarfile
import zipfile

import torchvision
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dataset_helpers import errors, md5, mirror, missing_dataset_error, packed_index, vggctl, window  # noqa: E402

CLASSES = sorted([f"class{c:03d}" for c in range(97)] + ["Faces", "Faces_easy", "Motorbikes", "airplanes"])


def make_caltech(images):
    """Caltech-101's class folders in `images` (`101_ObjectCategories`)."""
    for c, name in enumerate(CLASSES + ["BACKGROUND_Google"]):
        (images / name).mkdir(parents=True)
        for k in range(1 + c % 3):
            Image.fromarray(window(c + 200 * k, 32, 32)).save(images / name / f"image_{k + 1:04d}.jpg")


def serve(tmp_path, out, damaged=False):
    """caltech-101.zip as published in `out`: the images' tar.gz (cut
    short where `damaged`), the annotations' tar and a stray file, all in
    `caltech-101/`; its MD5."""
    made = tmp_path / "made"
    if not made.exists():
        make_caltech(made / "101_ObjectCategories")
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as tar:
        tar.add(made / "101_ObjectCategories", arcname="101_ObjectCategories")
    data = inner.getvalue()[:200] if damaged else inner.getvalue()
    out.mkdir(exist_ok=True)
    with zipfile.ZipFile(out / "caltech-101.zip", "w") as z:
        z.writestr("caltech-101/101_ObjectCategories.tar.gz", data)
        z.writestr("caltech-101/Annotations.tar", b"annotations")
        z.writestr("caltech-101/show_annotation.m", b"% matlab")
    return md5(str(out / "caltech-101.zip"))


def test_a_download_lists_torchvisions_samples(tmp_path):
    served, data = tmp_path / "served", tmp_path / "data"
    sums = serve(tmp_path, served)
    packed = tmp_path / "caltech.vggdata"
    with mirror(str(served)) as url:
        env = dict(os.environ, VGGCTL_CALTECH101_URL=url, VGGCTL_CALTECH101_MD5=sums)
        r = vggctl("prepare", "--dataset", "caltech101", "--data-dir", str(data), "-o", str(packed), env=env)
    assert r.returncode == 0, r.stderr
    # The zip is kept, the images' archive taken from it is not.
    assert sorted(os.listdir(data / "caltech101")) == ["101_ObjectCategories", "caltech-101.zip"]
    ds = torchvision.datasets.Caltech101(str(data))
    assert ds.categories == CLASSES
    theirs = [(f"{CLASSES[y]}/image_{i:04d}.jpg", y) for y, i in zip(ds.y, ds.index)]
    index = packed_index(packed)
    assert index["classes"] == CLASSES and index.get("val") is None
    assert [(e["name"], e["label"]) for e in index["train"]] == theirs and len(theirs) == 201

    # torchvision's own download removes the zip: the folder alone is read.
    os.remove(data / "caltech101" / "caltech-101.zip")
    r = vggctl("train", "--dataset", "caltech101", "--data-dir", str(data), "--no-download", "--arch", "vgg11",
               "--head", "gap", "--epochs", "1", "--batch-size", "256", "--device", "cpu",
               "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    assert "on caltech101 (181 train / 20 val images, 32x32" in r.stderr, r.stderr


def test_damaged_and_missing_data_and_val_on_val_are_one_line_each(tmp_path):
    served, data = tmp_path / "served", tmp_path / "data"
    sums = serve(tmp_path, served, damaged=True)
    with mirror(str(served)) as url:
        env = dict(os.environ, VGGCTL_CALTECH101_URL=url, VGGCTL_CALTECH101_MD5=sums)
        r = vggctl("prepare", "--dataset", "caltech101", "--data-dir", str(data), "-o", str(tmp_path / "p"),
                   env=env)
        assert r.returncode == 1 and len(errors(r)) == 1, r.stderr
        assert "could not extract Caltech-101's images from caltech-101.zip" in r.stderr, r.stderr
        assert sorted(os.listdir(data / "caltech101")) == ["caltech-101.zip"]
        # The next run takes the archive from a good zip again.
        env["VGGCTL_CALTECH101_MD5"] = serve(tmp_path, served)
        os.remove(data / "caltech101" / "caltech-101.zip")
        r = vggctl("prepare", "--dataset", "caltech101", "--data-dir", str(data), "-o", str(tmp_path / "p"),
                   env=env)
        assert r.returncode == 0 and "prepared 201 images" in r.stdout, r.stderr

    r = vggctl("train", "--dataset", "caltech101", "--data-dir", str(data), "--val-on", "val", cwd=tmp_path)
    assert r.returncode == 2 and errors(r) == [
        "vggctl: error: --val-on val: --dataset caltech101 validates on the part --val-split holds out (it has no "
        "test split); leave --val-on out"], r.stderr
    shutil.rmtree(data / "caltech101" / "101_ObjectCategories" / "airplanes")
    r = vggctl("prepare", "--dataset", "caltech101", "--data-dir", str(data), "--no-download", "-o",
               str(tmp_path / "q"))
    assert r.returncode == 1 and len(errors(r)) == 1, r.stderr
    assert "101_ObjectCategories: 100 class folders (but BACKGROUND_Google), where Caltech-101 has 101" in r.stderr
    line, empty = missing_dataset_error("caltech101", tmp_path)
    assert (f"no Caltech-101 in {empty}: expected {empty}/caltech101/101_ObjectCategories and downloading is off; "
            "put torchvision's caltech101/ (101_ObjectCategories/ of caltech-101.zip, from "
            "https://data.caltech.edu/records/mzrjq-6wc02/files/)") in line, line
