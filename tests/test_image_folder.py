"""An image folder is read as torchvision's `ImageFolder` reads it.

The reference is `torchvision.datasets.ImageFolder` itself, on a tree of
real photographs (scikit-image's) in every format it takes (JPEG, PNG,
BMP, PPM, PGM, TIFF, WebP; upper-case extensions too), in subfolders of
their class folders at several depths, with names whose string order is not
their path order (`x y` sorts before `x/z` as a string, after it by path
components), beside files it does not take (.gif, .txt):

- the same classes and the same files with the same labels in the same
  order (vggctl's list is read from `vggctl prepare --raw`'s index);
- the same pixels as its loader (PIL's `convert("RGB")`): equal for every
  losslessly stored image (grayscale, palette, CMYK, RGBA, 16-bit colour
  and lossy WebP included: image-webp decodes as libwebp does), and for
  JPEG data within 10 levels and 0.5 on average (zune-jpeg against
  libjpeg-turbo, which round chroma upsampling differently: measured on 63
  photo JPEGs at most 8 levels, at the right edge of a partly filled MCU,
  and 0.11-0.37 on average; 4:4:4 data within 1);
- `predict DIR` takes a class folder's images in the same order;
- `prepare` replaces an existing file only with `--force`;
- a run resumes only on the classes it trained on (a class folder added or
  renamed since is one error naming the difference, the run untouched);
- a class folder without images is refused naming it, as ImageFolder
  refuses it; so is a class folder whose name is not UTF-8 (ImageFolder
  takes it, but a checkpoint's class names are text).

Where vggctl does not follow it, on purpose: folders whose names start
with a dot are skipped (ImageFolder takes `.ipynb_checkpoints` as a class),
a folder reached twice through links is read once (ImageFolder follows a
link loop until the path is too long, listing its files again each time),
and a file that cannot be read (here a broken link) is skipped and counted
where ImageFolder's loader would stop the run; all checked below. 16-bit
grayscale keeps its high byte, where PIL clips it at 255 (white).
"""
import json
import os
import struct
import subprocess

import numpy as np
import pytest
import skimage.data as skdata
import torchvision
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("VGGCTL_BIN", os.path.join(ROOT, "target", "release", "vggctl"))
PTH = os.path.join(ROOT, "tests", "fixtures", "pth", "vgg11.legacy.pth")
LIMIT = 300


def run(*args, cwd):
    return subprocess.run([BIN, *args], capture_output=True, text=True, cwd=cwd, timeout=LIMIT)


def photo(name, size):
    return Image.fromarray(getattr(skdata, name)()).convert("RGB").resize(size, Image.BILINEAR)


def sixteen_bit_png(path, seed):
    """A 16-bit RGB PNG (PIL cannot write one): random samples."""
    import zlib
    h, w = 23, 31
    a = np.random.default_rng(seed).integers(0, 65536, (h, w, 3), dtype=np.uint16)
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    rows = b"".join(b"\0" + a[y].astype(">u2").tobytes() for y in range(h))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def make_tree(root):
    astro, coffee, cat = photo("astronaut", (64, 48)), photo("coffee", (60, 40)), photo("chelsea", (50, 44))
    files = {
        "b/a.png": lambda p: astro.save(p),
        "b/B.JPG": lambda p: coffee.save(p, quality=90),
        "b/c.bmp": lambda p: cat.save(p),
        "b/d.ppm": lambda p: astro.save(p),
        "b/e.TIFF": lambda p: coffee.save(p, compression="tiff_lzw"),
        "b/notes.txt": lambda p: p.write_text("not an image"),
        "b/f.gif": lambda p: cat.save(p),
        "b/x y/g.webp": lambda p: astro.save(p, quality=70),
        "b/x/z/h.pgm": lambda p: coffee.convert("L").save(p),
        "b/x/i.tif": lambda p: cat.convert("CMYK").save(p),
        "b b/j.png": lambda p: astro.convert("P").save(p),
        "b b/k.webp": lambda p: coffee.save(p, lossless=True),
        "b b/deep/er/l.bmp": lambda p: cat.convert("L").save(p),
        "b b/deep/m.png": lambda p: astro.convert("RGBA").save(p),
        "b b/deep/n.png": lambda p: sixteen_bit_png(p, 0),
        "c/o.jpeg": lambda p: cat.save(p, quality=85),
        "c/p.tif": lambda p: astro.save(p, compression="jpeg"),
        "c/q.tiff": lambda p: coffee.save(p, compression="tiff_adobe_deflate"),
    }
    for name, make in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        make(path)


def prepared_index(path):
    """The index of a file `vggctl prepare` wrote, and the file's bytes."""
    data = path.read_bytes()
    assert data[:16] == b"VGGCTL-PREPARED1" and data[-8:] == b"VGGCTLPX"
    offset, length = struct.unpack("<QQ", data[-28:-12])
    return json.loads(data[offset:offset + length]), data


def listed(tmp_path, tree, *extra):
    out = tmp_path / "t.vggdata"
    r = run("prepare", "--dataset", "folder", "--data-dir", str(tree), "--raw", "--max-side", "4096",
            "--out", str(out), *extra, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    index, data = prepared_index(out)
    out.unlink()
    return index, data, r


def test_a_folder_is_read_as_imagefolder_reads_it(tmp_path):
    tree = tmp_path / "photos"
    make_tree(tree)
    reference = torchvision.datasets.ImageFolder(str(tree))
    index, data, _ = listed(tmp_path, tree)
    assert index["classes"] == reference.classes == ["b", "b b", "c"]
    ours = [(e["name"], e["label"]) for e in index["train"]]
    theirs = [(os.path.relpath(p, tree), label) for p, label in reference.samples]
    assert ours == theirs
    # The string order of folders: b/x, b/x y, b/x/z (by path components: b/x, b/x/z, b/x y).
    assert len(ours) == 16 and ours.index(("b/x y/g.webp", 0)) < ours.index(("b/x/z/h.pgm", 0))

    jpeg_data = {"b/B.JPG", "c/o.jpeg", "c/p.tif"}
    for entry, (path, _) in zip(index["train"], reference.samples):
        h, w = entry["raw"]
        mine = np.frombuffer(data[entry["offset"]:entry["offset"] + entry["len"]], np.uint8).reshape(h, w, 3)
        pil = np.asarray(reference.loader(path))
        assert mine.shape == pil.shape, entry["name"]
        diff = np.abs(mine.astype(int) - pil.astype(int))
        if entry["name"] in jpeg_data:
            assert diff.max() <= 10 and diff.mean() <= 0.5, (entry["name"], diff.max(), diff.mean())
        else:
            assert diff.max() == 0, (entry["name"], diff.max())

    # An existing file is replaced only with --force.
    out = tmp_path / "t.vggdata"
    out.write_bytes(b"keep me")
    r = run("prepare", "--data-dir", str(tree), "--out", str(out), cwd=tmp_path)
    assert (r.returncode, r.stderr) == (1, f"vggctl: error: {out} already exists (use --force to overwrite)\n")
    assert out.read_bytes() == b"keep me"
    r = run("prepare", "--data-dir", str(tree), "--out", str(out), "--force", cwd=tmp_path)
    assert r.returncode == 0 and prepared_index(out)[0]["classes"] == reference.classes, r.stderr
    out.unlink()

    # predict takes a class folder's images in the same order.
    r = run("predict", "--weights", PTH, "--input", "32", "--device", "cpu", "--json", "--topk", "1",
            str(tree / "b"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert [p["image"] for p in json.loads(r.stdout)] == [p for p, label in reference.samples if label == 0]

    # Where vggctl does not follow ImageFolder: dot folders, link loops and
    # unreadable files leave the list as it was (a broken link is counted).
    (tree / ".ipynb_checkpoints").mkdir()
    photo("rocket", (40, 40)).save(tree / ".ipynb_checkpoints" / "r.png")
    (tree / "b" / ".thumbs").mkdir()
    photo("rocket", (40, 40)).save(tree / "b" / ".thumbs" / "r.png")
    (tree / "b" / "x" / "loop").symlink_to("..")
    (tree / "c" / "to-b").symlink_to(tree / "b" / "x" / "z")
    (tree / "c" / "gone.jpg").symlink_to(tree / "nowhere.jpg")
    again, _, r = listed(tmp_path, tree)
    to_b = [("c/to-b/h.pgm", 2)]
    assert [(e["name"], e["label"]) for e in again["train"]] == ours + to_b
    assert "skipped 1 unreadable image(s)" in r.stderr and "gone.jpg" in r.stderr, r.stderr
    strict = run("prepare", "--dataset", "folder", "--data-dir", str(tree), "--strict",
                 "--out", str(tmp_path / "s.vggdata"), cwd=tmp_path)
    assert strict.returncode == 1 and "gone.jpg" in strict.stderr, strict.stderr
    assert not (tmp_path / "s.vggdata").exists()


def test_class_folders_vggctl_cannot_take_are_refused(tmp_path):
    tree = tmp_path / "photos"
    for c in ["a", "b"]:
        (tree / c).mkdir(parents=True)
        photo("astronaut", (40, 40)).save(tree / c / "x.png")
    (tree / "empty" / "sub").mkdir(parents=True)
    (tree / "empty" / "sub" / "notes.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match="empty"):
        torchvision.datasets.ImageFolder(str(tree))
    for args in (["prepare", "--out", str(tmp_path / "t.vggdata")],
                 ["train", "--epochs", "1", "--out", str(tmp_path / "run")]):
        r = run(*args, "--dataset", "folder", "--data-dir", str(tree), cwd=tmp_path)
        assert r.returncode == 1, r.stderr
        assert r.stderr.strip().splitlines() == [
            f"vggctl: error: {tree}: no images in class folder(s) empty: every class needs one "
            "(images are .jpg, .jpeg, .png, .ppm, .bmp, .pgm, .tif, .tiff, .webp)"], r.stderr
    assert not (tmp_path / "t.vggdata").exists() and not (tmp_path / "run").exists()

    # A class name that is not UTF-8 cannot go into a checkpoint: named.
    os.rename(tree / "empty", os.path.join(os.fsencode(tree), b"caf\xe9"))
    photo("astronaut", (40, 40)).save(os.path.join(os.fsencode(tree), b"caf\xe9", b"x.png"))
    assert len(torchvision.datasets.ImageFolder(str(tree)).classes) == 3
    r = run("prepare", "--out", str(tmp_path / "t.vggdata"), "--dataset", "folder", "--data-dir", str(tree),
            cwd=tmp_path)
    assert r.returncode == 1 and r.stderr == (
        f"vggctl: error: {tree}/caf\ufffd: a class folder's name is not UTF-8 (class names go into the "
        "checkpoint as text): rename it\n"), r.stderr


def test_a_run_resumes_on_its_own_classes(tmp_path):
    tree = tmp_path / "photos"
    for c, name in [("cat", "chelsea"), ("dog", "astronaut")]:
        (tree / c).mkdir(parents=True)
        for i in range(3):
            photo(name, (40 + i, 40)).save(tree / c / f"{i}.png")
    r = run("train", "--dataset", "folder", "--data-dir", str(tree), "--arch", "vgg11", "--epochs", "1",
            "--batch-size", "2", "--out", "run", "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    before = (tmp_path / "run" / "resume.safetensors").read_bytes()
    (tree / "bird").mkdir()
    photo("rocket", (40, 40)).save(tree / "bird" / "0.png")
    r = run("train", "--resume", "run", "--epochs", "2", cwd=tmp_path)
    assert (r.returncode, r.stderr) == (1, f"vggctl: error: run: the run trained on 2 classes; {tree} now has "
                                           "3: a run resumes on the classes it started with\n")
    (tree / "bird" / "0.png").unlink()
    (tree / "bird").rmdir()
    (tree / "dog").rename(tree / "dogs")
    r = run("train", "--resume", "run", "--epochs", "2", cwd=tmp_path)
    assert (r.returncode, r.stderr) == (1, f"vggctl: error: run: the run's class 1 is \"dog\"; in {tree} it is "
                                           "\"dogs\": a run resumes on the classes it started with\n")
    assert (tmp_path / "run" / "resume.safetensors").read_bytes() == before
    (tree / "dogs").rename(tree / "dog")
    r = run("train", "--resume", "run", "--epochs", "2", "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr


def test_eval_of_a_run_reads_the_part_the_run_held_out(tmp_path):
    """A folder split by --val-split: eval of the run's checkpoint reads the
    images the run validated on (its seed and fraction, from its
    config.json), with or without --data-dir, not another draw."""
    tree = tmp_path / "photos"
    for c, name in [("cat", "chelsea"), ("dog", "astronaut"), ("cup", "coffee")]:
        (tree / c).mkdir(parents=True)
        for i in range(8):
            photo(name, (40 + i, 40 + 2 * i)).save(tree / c / f"{i}.png")
    r = run("train", "--dataset", "folder", "--data-dir", str(tree), "--arch", "vgg11", "--input", "32",
            "--epochs", "1", "--seed", "5", "--val-split", "0.25", "--cache-dir", str(tmp_path / "cache"),
            "--out", "run", "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    logged = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert logged["test_images"] == 6

    def evaluated(*args):
        out = tmp_path / f"p{len(os.listdir(tmp_path))}.csv"
        r = run("eval", "--checkpoint", "run/best.safetensors", "--cache-dir", str(tmp_path / "cache"),
                "--predictions", str(out), "--json", *args, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        images = [line.split(",")[0] for line in out.read_text().splitlines()[1:]]
        return images, json.loads(r.stdout)["loss"]

    held, loss = evaluated()
    assert abs(loss - logged["test_loss"]) <= 1e-5 * logged["test_loss"], (loss, logged)
    assert evaluated("--data-dir", str(tree)) == (held, loss)
    assert evaluated("--seed", "5", "--val-split", "0.25")[0] == held
    # Another seed or fraction draws other images.
    assert evaluated("--seed", "0")[0] != held and len(evaluated("--val-split", "0.5")[0]) == 12
