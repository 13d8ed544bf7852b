"""`--dataset country211` against torchvision's own `Country211` reader on
the same folder: `country211/{train,valid,test}/<country>/`, the 211
country folders of each split holding one or two 32x32 windows of real
photographs (scikit-image's), as JPEG or PNG.

- Downloaded from a mirror on 127.0.0.1 as the tgz torchvision downloads
  (with a member trying to leave the folder), then packed: the file
  `prepare` writes lists torchvision's train samples then its valid
  samples to train on, its test samples to validate on, and its classes.
- `--val-on val` trains on train alone and validates on valid; `eval --val-on
  val` of the run reads valid again (the logged loss), `eval` reads test.
- A split without one country and a missing dataset are one line each.
"""
import itertools
import json
import os
import shutil
import sys
import tarfile

import torchvision
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dataset_helpers import errors, md5, mirror, missing_dataset_error, packed_index, vggctl, window  # noqa: E402

COUNTRIES = ["".join(p) for p in itertools.product("ABCDEFGHIJKLMNOPQRSTUVWXYZ", repeat=2)][:211]
SPLITS = {"train": 0, "valid": 1000, "test": 2001}


def make_country(base):
    """Country211's layout in `base` (`ROOT/country211`)."""
    for split, offset in SPLITS.items():
        for c, country in enumerate(COUNTRIES):
            d = base / split / country
            d.mkdir(parents=True)
            for k in range(1 + (c + offset) % 2 * (split != "train")):
                ext = "png" if c % 5 == 0 else "jpg"
                Image.fromarray(window(offset + c + 300 * k, 32, 32)).save(d / f"{c * 7 + k}.{ext}")


def samples(root, split):
    ds = torchvision.datasets.Country211(str(root), split=split)
    return ds.classes, [(os.path.relpath(p, root / "country211"), y) for p, y in ds.samples]


def test_a_download_lists_torchvisions_samples(tmp_path):
    made, served, data = tmp_path / "made", tmp_path / "served", tmp_path / "data"
    make_country(made / "country211")
    served.mkdir()
    with tarfile.open(served / "country211.tgz", "w:gz") as tar:
        tar.add(made / "country211", arcname="country211")
        tar.add(made / "country211" / "train" / "AA" / "0.png", arcname="country211/../evil.jpg")
    packed = tmp_path / "country.vggdata"
    with mirror(str(served)) as url:
        env = dict(os.environ, VGGCTL_COUNTRY211_URL=url, VGGCTL_COUNTRY211_MD5=md5(str(served / "country211.tgz")))
        r = vggctl("prepare", "--dataset", "country211", "--data-dir", str(data), "-o", str(packed), env=env)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(data)) == ["country211", "country211.tgz"] and not (tmp_path / "evil.jpg").exists()
    index = packed_index(packed)
    (classes, train), (_, valid), (_, test) = (samples(data, s) for s in SPLITS)
    assert classes == COUNTRIES == index["classes"]
    assert [(e["name"], e["label"]) for e in index["train"]] == train + valid
    assert [(e["name"], e["label"]) for e in index["val"]] == test
    assert (len(train), len(valid), len(test)) == (211, 316, 317)


def test_val_on_val_trains_on_train_and_validates_on_valid(tmp_path):
    make_country(tmp_path / "country211")
    out = tmp_path / "run"
    r = vggctl("train", "--dataset", "country211", "--data-dir", str(tmp_path), "--val-on", "val", "--arch", "vgg11",
               "--head", "gap", "--epochs", "1", "--batch-size", "256", "--device", "cpu",
               "--cache-dir", str(tmp_path / "cache"), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "on country211 (211 train / 316 val images, 32x32" in r.stderr, r.stderr
    logged = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    r = vggctl("eval", "--checkpoint", str(out / "last.safetensors"), "--val-on", "val", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["images"] == 316 and abs(report["loss"] - logged["test_loss"]) <= 1e-5 * logged["test_loss"]
    r = vggctl("eval", "--checkpoint", str(out / "last.safetensors"), "--json", cwd=tmp_path)
    assert r.returncode == 0 and json.loads(r.stdout)["images"] == 317, r.stderr

    shutil.rmtree(tmp_path / "country211" / "test" / COUNTRIES[-1])
    r = vggctl("prepare", "--dataset", "country211", "--data-dir", str(tmp_path), "--no-download", "-o",
               str(tmp_path / "p.vggdata"))
    assert r.returncode == 1 and len(errors(r)) == 1, r.stderr
    assert f"{tmp_path}/country211/test: 210 country folders, where Country211 has 211" in r.stderr, r.stderr
    assert not (tmp_path / "p.vggdata").exists()
    line, empty = missing_dataset_error("country211", tmp_path)
    assert line == (
        f"vggctl: error: no Country211 in {empty}: expected {empty}/country211/ and downloading is off; put "
        "torchvision's country211/ of country211.tgz (from https://openaipublic.azureedge.net/clip/data/) into "
        f"{empty} by hand, or point --data-dir at a copy (--data-url names a mirror)"), line
