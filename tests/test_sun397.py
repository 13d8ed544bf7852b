"""`--dataset sun397` against torchvision's own `SUN397` reader on the same
folder: `SUN397/ClassName.txt` naming 397 class folders (`/a/abbey`, and
`/a/apartment_building/outdoor` a level deeper, as the real list has),
each holding one or two 32x32 windows of real photographs (scikit-image's)
as `sun_<id>.jpg`, and files torchvision does not read (`.JPG`, a name
not starting with `sun_`, a text file).

- Downloaded from a mirror on 127.0.0.1 as the tar.gz torchvision
  downloads (with a README and a member trying to leave the folder), then
  packed: the file `prepare` writes lists torchvision's samples, the same
  files with the same classes (in class order, where torchvision's follow
  the file system's), and its classes.
- `train` validates on the part `--val-split` holds out (SUN397 has no
  splits), and `eval` of the run reads that part again.
- `--val-on val`, a class list of 396 lines, a line that is no class folder
  and a missing dataset are one line each.
"""
import json
import os
import sys
import tarfile

import torchvision
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dataset_helpers import errors, md5, mirror, missing_dataset_error, packed_index, vggctl, window  # noqa: E402

FOLDERS = ["/a/abbey", "/a/apartment_building/outdoor"] + [f"/{chr(97 + c % 26)}/scene_{c}" for c in range(2, 397)]


def make_sun(base, folders=FOLDERS):
    """SUN397's layout in `base` (`ROOT/SUN397`)."""
    base.mkdir(parents=True)
    (base / "ClassName.txt").write_text("".join(f + "\n" for f in folders))
    for c, folder in enumerate(folders):
        d = base / folder.lstrip("/")
        d.mkdir(parents=True)
        for k in range(1 + c % 2):
            Image.fromarray(window(c + 400 * k, 32, 32)).save(d / f"sun_{c:03d}{'ab'[k]}.jpg")
    abbey = base / "a" / "abbey"
    Image.fromarray(window(998, 32, 32)).save(abbey / "sun_upper.JPG", format="JPEG")
    Image.fromarray(window(999, 32, 32)).save(abbey / "other.jpg")
    (abbey / "notes.txt").write_text("not an image")


def test_a_download_lists_torchvisions_samples(tmp_path):
    made, served, data = tmp_path / "made", tmp_path / "served", tmp_path / "data"
    make_sun(made / "SUN397")
    (made / "SUN397" / "README.txt").write_text("SUN397")
    served.mkdir()
    with tarfile.open(served / "SUN397.tar.gz", "w:gz") as tar:
        tar.add(made / "SUN397", arcname="SUN397")
        tar.add(made / "SUN397" / "README.txt", arcname="SUN397/../evil.jpg")
    packed = tmp_path / "sun.vggdata"
    with mirror(str(served)) as url:
        env = dict(os.environ, VGGCTL_SUN397_URL=url, VGGCTL_SUN397_MD5=md5(str(served / "SUN397.tar.gz")))
        r = vggctl("prepare", "--dataset", "sun397", "--data-dir", str(data), "-o", str(packed), env=env)
    assert r.returncode == 0, r.stderr
    # The archive is kept beside the folder, as torchvision keeps it; only
    # the class list and the photographs are extracted.
    assert sorted(os.listdir(data)) == ["SUN397", "SUN397.tar.gz"]
    assert sorted(os.listdir(data / "SUN397" / "a" / "abbey")) == ["sun_000a.jpg"]
    assert not (data / "SUN397" / "README.txt").exists() and not (tmp_path / "evil.jpg").exists()

    ds = torchvision.datasets.SUN397(str(data))
    index = packed_index(packed)
    assert index["classes"] == ds.classes and ds.classes[:2] == ["abbey", "apartment_building/outdoor"]
    theirs = sorted((str(p.relative_to(data / "SUN397")), y) for p, y in zip(ds._image_files, ds._labels))
    ours = [(e["name"], e["label"]) for e in index["train"]]
    assert sorted(ours) == theirs and len(theirs) == 595 and index.get("val") is None
    # In class order, each class's photographs by name.
    assert ours == sorted(ours, key=lambda e: (e[1], e[0]))


def test_training_validates_on_the_part_val_split_holds_out(tmp_path):
    make_sun(tmp_path / "SUN397")
    out = tmp_path / "run"
    r = vggctl("train", "--dataset", "sun397", "--data-dir", str(tmp_path), "--no-download", "--arch", "vgg11",
               "--head", "gap", "--epochs", "1", "--batch-size", "256", "--device", "cpu",
               "--cache-dir", str(tmp_path / "cache"), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "on sun397 (535 train / 60 val images, 32x32" in r.stderr, r.stderr
    r = vggctl("eval", "--checkpoint", str(out / "last.safetensors"), "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["images"] == 60 and len(report["classes"]) == 397 and report["classes"][0] == "abbey"

    r = vggctl("train", "--dataset", "sun397", "--data-dir", str(tmp_path), "--val-on", "val", cwd=tmp_path)
    assert r.returncode == 2 and errors(r) == [
        "vggctl: error: --val-on val: --dataset sun397 validates on the part --val-split holds out (it has no "
        "test split); leave --val-on out"], r.stderr
    for name, folders, message in [
        ("short", FOLDERS[:-1], "SUN397/ClassName.txt: 396 classes, where SUN397 has 397"),
        ("odd", FOLDERS[:5] + ["/a/../x"] + FOLDERS[6:], "SUN397/ClassName.txt line 6: '/a/../x' is not a class "
         "folder (/<letter>/<class>)"),
    ]:
        make_sun(tmp_path / name / "SUN397", folders)
        r = vggctl("prepare", "--dataset", "sun397", "--data-dir", str(tmp_path / name), "--no-download", "-o",
                   str(tmp_path / "p.vggdata"))
        assert r.returncode == 1 and len(errors(r)) == 1 and f"{tmp_path / name}/{message}" in r.stderr, r.stderr
        assert not (tmp_path / "p.vggdata").exists()
    line, empty = missing_dataset_error("sun397", tmp_path)
    assert line == (
        f"vggctl: error: no SUN397 in {empty}: expected {empty}/SUN397/ and downloading is off; put torchvision's "
        "SUN397/ of SUN397.tar.gz (from http://vision.princeton.edu/projects/2010/SUN/) into "
        f"{empty} by hand, or point --data-dir at a copy (--data-url names a mirror)"), line
