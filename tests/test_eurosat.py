"""`--dataset eurosat` against torchvision's own `EuroSAT` reader on the
same folder: `eurosat/2750/<class>/<image>.jpg`, three 64x64 windows of
real photographs (scikit-image's) for each of the ten land-use classes.

- Downloaded from a mirror on 127.0.0.1 as the zip torchvision downloads
  (with members no reader needs, and one trying to leave the folder),
  then trained on: EuroSAT has no splits, so the run trains on the images
  `--val-split` leaves and validates on the part it holds out, at the
  images' own 64x64. `eval` of the run reads that part again: each of its
  `--predictions` rows names one of torchvision's samples with
  torchvision's class, and they are the images the same `--val-split` and
  seed hold out of the folder read as `--dataset folder`.
- `--val-on val`, a wrong number of class folders and a missing dataset
  are one line each.
"""
import csv
import io
import json
import os
import shutil
import sys
import zipfile

import torchvision
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dataset_helpers import errors, md5, mirror, missing_dataset_error, vggctl, window  # noqa: E402

CLASSES = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture", "PermanentCrop",
           "Residential", "River", "SeaLake"]


def make_eurosat(base):
    """EuroSAT's layout in `base` (`ROOT/eurosat`)."""
    for c, name in enumerate(CLASSES):
        folder = base / "2750" / name
        folder.mkdir(parents=True)
        for k in range(3):
            Image.fromarray(window(3 * c + k)).save(folder / f"{name}_{k + 1}.jpg", format="JPEG")


def serve(base, out):
    """EuroSAT.zip as published (holding `2750/`, with members no reader
    needs and one trying to leave the folder) in `out`; its MD5."""
    out.mkdir()
    with zipfile.ZipFile(out / "EuroSAT.zip", "w") as z:
        for dirpath, _, files in sorted(os.walk(base / "2750")):
            for f in sorted(files):
                full = os.path.join(dirpath, f)
                z.write(full, os.path.relpath(full, base))
        for extra in ["2750/Forest/readme.txt", "2750/../evil.jpg", "2750/Forest/sub/a.jpg", "LICENSE"]:
            z.writestr(extra, b"extra")
    return md5(str(out / "EuroSAT.zip"))


def predictions(*args, cwd):
    r = vggctl("eval", *args, "--predictions", "-", cwd=cwd)
    assert r.returncode == 0, r.stderr
    return list(csv.DictReader(io.StringIO(r.stdout)))


def test_a_download_trains_on_what_val_split_leaves_and_validates_on_its_part(tmp_path):
    make_eurosat(tmp_path / "made" / "eurosat")
    served, data, out = tmp_path / "served", tmp_path / "data", tmp_path / "run"
    env = dict(os.environ, VGGCTL_EUROSAT_MD5=serve(tmp_path / "made" / "eurosat", served))
    with mirror(str(served)) as url:
        r = vggctl("train", "--dataset", "eurosat", "--data-dir", str(data), "--data-url", url, "--arch", "vgg11",
                   "--head", "gap", "--epochs", "1", "--val-split", "0.2", "--seed", "5", "--device", "cpu",
                   "--cache-dir", str(tmp_path / "cache"), "--out", str(out), env=env)
    assert r.returncode == 0, r.stderr
    assert "on eurosat (24 train / 6 val images, 64x64" in r.stderr, r.stderr
    # torchvision keeps the zip beside the folder; only the class folders'
    # images are extracted.
    assert sorted(os.listdir(data / "eurosat")) == ["2750", "EuroSAT.zip"] and os.listdir(data) == ["eurosat"]
    assert sorted(os.listdir(data / "eurosat" / "2750")) == CLASSES
    assert sorted(os.listdir(data / "eurosat" / "2750" / "Forest")) == [f"Forest_{k}.jpg" for k in (1, 2, 3)]
    assert not any((p / "evil.jpg").exists() for p in [tmp_path, data, served])
    config = json.loads((out / "config.json").read_text())
    assert (config["dataset"], config["val_split"], config["seed"]) == ("eurosat", 0.2, 5), config

    rows = predictions("--checkpoint", str(out / "last.safetensors"), cwd=tmp_path)
    ds = torchvision.datasets.EuroSAT(str(data))
    assert ds.classes == CLASSES
    theirs = dict(ds.samples)
    assert len(rows) == 6 and len({r["image"] for r in rows}) == 6
    for row in rows:
        assert theirs[row["image"]] == int(row["label_index"]), row
        assert row["label"] == CLASSES[int(row["label_index"])]
    # The part a folder's --val-split and seed hold out.
    folder = predictions("--checkpoint", str(out / "last.safetensors"), "--dataset", "folder", "--data-dir",
                         str(data / "eurosat" / "2750"), "--val-split", "0.2", "--seed", "5", cwd=tmp_path)
    assert [r["image"] for r in folder] == [r["image"] for r in rows]


def test_val_on_val_wrong_folders_and_missing_data_are_one_line_each(tmp_path):
    make_eurosat(tmp_path / "eurosat")
    r = vggctl("train", "--dataset", "eurosat", "--data-dir", str(tmp_path), "--val-on", "val", cwd=tmp_path)
    assert r.returncode == 2 and errors(r) == [
        "vggctl: error: --val-on val: --dataset eurosat validates on the part --val-split holds out (it has no "
        "test split); leave --val-on out"], r.stderr

    shutil.rmtree(tmp_path / "eurosat" / "2750" / "River")
    r = vggctl("prepare", "--dataset", "eurosat", "--data-dir", str(tmp_path), "--no-download",
               "-o", str(tmp_path / "p.vggdata"))
    assert r.returncode == 1 and len(errors(r)) == 1, r.stderr
    assert f"{tmp_path}/eurosat/2750: 9 class folders, where EuroSAT has 10" in r.stderr, r.stderr
    assert not (tmp_path / "p.vggdata").exists()

    line, empty = missing_dataset_error("eurosat", tmp_path)
    assert (f"no EuroSAT in {empty}: expected {empty}/eurosat/2750/ and downloading is off; put torchvision's "
            "eurosat/ (2750/ of EuroSAT.zip, from https://huggingface.co/datasets/torchgeo/eurosat/") in line, line
