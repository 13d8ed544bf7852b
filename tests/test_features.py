"""`vggctl features` against torchvision's `create_feature_extractor` on the
same weights and the same input: real photographs (scikit-image's, from the
fixtures) cut to 224x224 PNGs, read with `--val-resize-size 224` so that
the resize and the centre crop leave every pixel as it is and both sides
normalize the same bytes. Each saved module's rows equal torchvision's
node outputs within 1e-5 of their largest value (the same libtorch CPU
kernels; measured up to 1.7e-6), also with `--channels-last`: VGG11 (features after a pool, avgpool,
flatten, fc6 after its ReLU, the logits, and the default, fc7 =
`classifier.4`) in one safetensors file over batches of 2 (rows land in
their place across batches: 5 images = 2 + 2 + 1), the images' order in
its metadata and on stdout; VGG16-BN's BatchNorm output into a .npy
file that numpy loads; `--pool avg`/`max` equal the mean/amax over
height and width. Bad requests get one line each, exit 2 or 1, and leave
no file behind."""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from safetensors import safe_open
from safetensors.numpy import load_file
from safetensors.torch import load_file as load_tensors
from torchvision.models.feature_extraction import create_feature_extractor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ddp_reference  # noqa: E402
import vgg_reference  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("VGGCTL_BIN", os.path.join(ROOT, "target", "release", "vggctl"))
FIX = os.path.join(ROOT, "tests", "fixtures")
PHOTOS = ["cat/cat_01.png", "astronaut/astronaut_02.png", "coffee/coffee_04.png",
          "cat/cat_05.png", "astronaut/astronaut_07.png"]
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def squares(tmp_path):
    """The photos' central 224x224 squares as PNGs, in the order given."""
    out = []
    for i, rel in enumerate(PHOTOS):
        img = Image.open(os.path.join(FIX, "photos", rel)).convert("RGB")
        w, h = img.size
        s = min(w, h, 224)
        box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
        img = img.crop(box).resize((224, 224), Image.BILINEAR) if s < 224 else img.crop(box)
        path = tmp_path / f"{i}.png"
        img.save(path)
        out.append(str(path))
    return out


def batch_of(paths):
    x = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1)
                     for p in paths])
    return torchvision.transforms.functional.normalize(x.float() / 255.0, MEAN, STD)


def vggctl(*args, cwd, side=224):
    return subprocess.run([BIN, "features", "--device", "cpu", "--input", str(side),
                           "--val-resize-size", str(side), *args],
                          capture_output=True, text=True, cwd=cwd)


def close(ours, theirs, name):
    theirs = theirs.numpy()
    assert ours.shape == theirs.shape, name
    err = np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-12)
    assert err <= 1e-5, f"{name}: {err}"


def reference(arch, weights):
    model = getattr(torchvision.models, arch)()
    model.load_state_dict(torch.load(weights, weights_only=True))
    return model.eval()


def test_features_equal_torchvisions_feature_extractor(tmp_path):
    images = squares(tmp_path)
    weights = os.path.join(FIX, "pth", "vgg11.legacy.pth")
    nodes = ["features.5", "avgpool", "flatten", "classifier.1", "classifier.6", "classifier.4"]
    out = vggctl("--weights", weights, "--layer", ",".join(nodes[:3]), "--layer", ",".join(nodes[3:]),
                 "--batch-size", "2", "-o", "f.safetensors", *images, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == images
    assert out.stderr.splitlines()[-1] == (
        "wrote f.safetensors (features.5 5x128x56x56, avgpool 5x512x7x7, flatten 5x25088, "
        "classifier.1 5x4096, classifier.6 5x1000, classifier.4 5x4096 of vgg11; "
        "row i is the i-th image listed on stdout)")
    ours = load_file(tmp_path / "f.safetensors")
    meta = safe_open(tmp_path / "f.safetensors", "np").metadata()
    assert json.loads(meta["images"]) == images and meta["model"] == "vgg11"
    with torch.no_grad():
        theirs = create_feature_extractor(reference("vgg11", weights), return_nodes=nodes)(batch_of(images))
    assert list(ours) != [] and sorted(ours) == sorted(nodes)
    for name in nodes:
        close(ours[name], theirs[name], name)

    # The default is what the last linear layer reads (fc7), the same rows.
    out = vggctl("--weights", weights, "-o", "fc7.npy", "--json", *images, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["arrays"] == {"classifier.4": [5, 4096]} and doc["images"] == images
    close(np.load(tmp_path / "fc7.npy"), theirs["classifier.4"], "default")

    # NHWC on the CPU computes the same (the rows come out in NCHW order).
    out = vggctl("--weights", weights, "--layer", "features.5", "--channels-last", "-o", "nhwc.npy",
                 *images, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    close(np.load(tmp_path / "nhwc.npy"), theirs["features.5"], "channels_last")

    # Global pooling of a feature map.
    for pool, f in [("avg", lambda t: t.mean((2, 3))), ("max", lambda t: t.amax((2, 3)))]:
        out = vggctl("--weights", weights, "--layer", "features.5", "--pool", pool, "-o", f"{pool}.npy",
                     *images, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        close(np.load(tmp_path / f"{pool}.npy"), f(theirs["features.5"]), pool)


def test_batchnorm_features_in_npy_equal_torchvisions(tmp_path):
    images = squares(tmp_path)[:3]
    weights = os.path.join(FIX, "pth", "vgg16_bn.zip.pth")
    out = vggctl("--weights", weights, "--layer", "features.1", "-o", "bn.npy", *images, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    ours = np.load(tmp_path / "bn.npy")
    with torch.no_grad():
        theirs = create_feature_extractor(reference("vgg16_bn", weights),
                                          return_nodes=["features.1"])(batch_of(images))
    close(ours, theirs["features.1"], "features.1")


def cifar10(root, train):
    """torchvision's CIFAR10 over the Python layout in `root`, its MD5s the files' own."""
    def md5(name):
        with open(os.path.join(root, "cifar-10-batches-py", name), "rb") as f:
            return hashlib.md5(f.read()).hexdigest()

    base = torchvision.datasets.CIFAR10

    class Local(base):
        train_list = [[f, md5(f)] for f, _ in base.train_list]
        test_list = [[f, md5(f)] for f, _ in base.test_list]
        meta = {**base.meta, "md5": md5(base.meta["filename"])}

    return Local(root, train=train, download=False)


def test_a_datasets_split_is_read_as_torchvision_and_eval_read_it(tmp_path):
    """`--dataset NAME --split S` saves the rows of torchvision's dataset in
    its order, read as eval reads it, and its targets as `labels`: CIFAR-10's
    training split (the fixture's 1,500 images) through a vggctl checkpoint,
    normalized by the mean and std its metadata records; MNIST's test split
    through a plain state dict, normalized as the dataset is (MNIST's
    constants), its 28x28 images resized to 32x32 RGB, the first 100 only
    (`--limit`). Rows within 1e-5 of
    the reference's largest value, labels exactly; the metadata and --json
    name the dataset and split; no images are listed on stdout."""
    run = tmp_path / "run"
    r = subprocess.run([BIN, "train", "--dataset", "digits", "--arch", "vgg11", "--epochs", "1", "--limit-train", "32",
                        "--limit-test", "32", "--device", "cpu", "--quiet", "--out", str(run)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ckpt = str(run / "last.safetensors")
    meta = safe_open(ckpt, "pt").metadata()
    mean, std = json.loads(meta["mean"]), json.loads(meta["std"])
    assert meta["dataset"] == "digits"
    plain = os.path.join(FIX, "models", "vgg11-cifar.safetensors")
    cases = [
        (["--checkpoint", ckpt, "--dataset", "cifar10", "--data-dir", os.path.join(FIX, "digits-py"),
          "--split", "train"], ckpt, "cifar10", "train"),
        (["--weights", plain, "--dataset", "mnist", "--data-dir", os.path.join(FIX, "digits-bin"), "--split", "test",
          "--json", "--limit", "100"], plain, "mnist", "test"),
    ]
    for args, weights, name, split in cases:
        out = tmp_path / f"{name}.safetensors"
        r = subprocess.run([BIN, "features", *args, "--no-download", "--device", "cpu", "-o", str(out)],
                           capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        if name == "cifar10":
            ds = cifar10(os.path.join(FIX, "digits-py"), train=True)
            images = torch.from_numpy(ds.data).permute(0, 3, 1, 2)
            assert r.stdout == "" and "row i is image i of the train split of cifar10" in r.stderr, r.stderr
        else:
            ds = ddp_reference.mnist(os.path.join(FIX, "digits-bin"), "mnist", train=False)
            assert len(ds) > 100
            ds.data, ds.targets = ds.data[:100], ds.targets[:100]
            images = ddp_reference.mnist_images(ds)
            mean, std = ddp_reference.MNIST_NORM["mnist"]
            said = json.loads(r.stdout)
            assert said["dataset"] == {"name": "mnist", "split": "test"} and "images" not in said
            assert said["arrays"] == {"classifier.1": [100, 512], "labels": [100]}
            assert said["labels"] == list(map(int, ds.targets))
        model = vgg_reference.build("vgg11", False, "cifar", 10)
        model.load_state_dict(load_tensors(weights))
        with torch.no_grad():
            theirs = create_feature_extractor(model.eval(), return_nodes=["classifier.1"])(
                ddp_reference.normalize(images, mean, std))
        saved = load_file(str(out))
        close(saved["classifier.1"], theirs["classifier.1"], f"{name} classifier.1")
        assert saved["labels"].dtype == np.int64 and saved["labels"].tolist() == list(map(int, ds.targets))
        said = safe_open(str(out), "np").metadata()
        assert (said["dataset"], said["split"]) == (name, split) and json.loads(said["classes"]) == ds.classes


def test_class_folders_give_imagefolders_labels(tmp_path):
    """One directory of class folders (no images of its own) is read as
    torchvision's ImageFolder reads it: its rows in ImageFolder's order
    (a class's nested folder before a class whose name extends it), a
    safetensors `labels` int64 array equal to its `targets` and its
    `classes` in the metadata, the rows bit for bit those of the same
    files given one by one (read at 64x64, which is all the order and the
    labels need). A .npy file holds the rows only (the labels in
    --json); a directory with images of its own, or a class folder without
    images (a warning), gives no labels. `predict` lists the directory in
    the same order."""
    images = squares(tmp_path)
    weights = os.path.join(FIX, "pth", "vgg11.legacy.pth")
    lab = tmp_path / "lab"
    places = ["cat/a.png", "coffee/sub/b.png", "coffee-b/c.png", "cat/d.png", "coffee/e.png"]
    for image, place in zip(images, places):
        (lab / place).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(image, lab / place)
    folder = torchvision.datasets.ImageFolder(str(lab))
    order = [p for p, _ in folder.samples]
    assert order != sorted(order), "the layout does not tell ImageFolder's order from the paths'"
    out = vggctl("--weights", weights, "--batch-size", "2", "-o", "lab.safetensors", str(lab), cwd=tmp_path, side=64)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == order
    assert out.stderr.splitlines()[-1] == (
        "wrote lab.safetensors (classifier.4 5x4096 of vgg11, and the labels of 3 class folders; "
        "row i is the i-th image listed on stdout)")
    ours = load_file(tmp_path / "lab.safetensors")
    meta = safe_open(tmp_path / "lab.safetensors", "np").metadata()
    assert ours["labels"].dtype == np.int64 and ours["labels"].tolist() == folder.targets
    assert json.loads(meta["classes"]) == folder.classes and json.loads(meta["images"]) == order
    out = vggctl("--weights", weights, "--batch-size", "2", "-o", "flat.safetensors", *order, cwd=tmp_path, side=64)
    assert out.returncode == 0, out.stderr
    flat = load_file(tmp_path / "flat.safetensors")
    assert sorted(flat) == ["classifier.4"] and "classes" not in safe_open(tmp_path / "flat.safetensors", "np").metadata()
    assert np.array_equal(flat["classifier.4"], ours["classifier.4"])
    # predict lists a directory of class folders in the same order.
    out = subprocess.run([BIN, "predict", "--device", "cpu", "--input", "64", "--weights", weights, "--json", str(lab)],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert [p["image"] for p in json.loads(out.stdout)] == order

    # --limit 3: the first three, in that order, and their labels.
    out = vggctl("--weights", weights, "-o", "lab.npy", "--json", "--limit", "3", str(lab), cwd=tmp_path, side=64)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["arrays"] == {"classifier.4": [3, 4096]}
    assert (doc["images"], doc["labels"], doc["classes"]) == (order[:3], folder.targets[:3], folder.classes)
    assert np.load(tmp_path / "lab.npy").shape == (3, 4096)

    os.symlink(images[0], lab / "loose.png")
    out = vggctl("--weights", weights, "-o", "loose.safetensors", "--json", str(lab), cwd=tmp_path, side=64)
    assert out.returncode == 0, out.stderr
    assert "labels" not in json.loads(out.stdout) and "labels" not in load_file(tmp_path / "loose.safetensors")
    os.remove(lab / "loose.png")
    (lab / "empty").mkdir()
    out = vggctl("--weights", weights, "-o", "empty.safetensors", str(lab), cwd=tmp_path, side=64)
    assert out.returncode == 0, out.stderr
    assert f"warning: no labels saved: {lab}: no images in class folder(s) empty: every class needs one" \
        in out.stderr, out.stderr
    assert "labels" not in load_file(tmp_path / "empty.safetensors")


@pytest.mark.parametrize("args,code,line", [
    (["--layer", "classifier.9", "-o", "x.npy"], 2,
     "vggctl: error: --layer classifier.9: vgg11 (imagenet head) has no module of that name; "
     "its modules are features.0, features.1,"),
    (["--layer", "avgpool,flatten", "-o", "x.npy"], 2,
     "vggctl: error: --out x.npy: a .npy file holds one array; save 2 layers to a .safetensors file"),
    (["--layer", "avgpool,avgpool", "-o", "x.safetensors"], 2,
     "vggctl: error: --layer avgpool is named twice"),
    (["--layer", "classifier.4", "--pool", "avg", "-o", "x.npy"], 2,
     "vggctl: error: --pool: classifier.4 gives a vector per image, with no height and width to pool"),
    (["-o", "x.csv"], 2, "vggctl: error: --out x.csv: the extension names the format: .npy or .safetensors"),
    (["-o", "taken.npy"], 1, "vggctl: error: taken.npy already exists (use --force to overwrite)"),
    (["-o", "x.npy", "BROKEN"], 1, "vggctl: error: BROKEN: not a readable image: truncated JPEG"),
    (["--split", "test", "-o", "x.npy"], 2, "vggctl: error: --split reads a split of a --dataset, not image files"),
    (["--limit", "0", "-o", "x.npy"], 2, "vggctl: error: --limit must be at least 1"),
    (["--dataset", "digits", "--split", "test", "-o", "x.npy"], 2,
     "vggctl: error: the argument '--dataset <DATASET>' cannot be used with '[IMAGES]...'"),
    (["--dataset", "digits", "-o", "x.npy", "NOIMAGES"], 2,
     "vggctl: error: --dataset digits: name the split to read with --split train or --split test"),
    (["--dataset", "folder", "--split", "test", "-o", "x.npy", "NOIMAGES"], 2,
     "vggctl: error: --dataset folder: give the folder itself as the images argument"),
    (["--dataset", "stl10", "--split", "train", "--fold", "10", "-o", "x.npy", "NOIMAGES"], 2,
     "vggctl: error: --fold 10: STL-10's folds are 0 to 9"),
])
def test_bad_requests_say_why_and_leave_nothing(tmp_path, args, code, line):
    images = squares(tmp_path)[:1] if "NOIMAGES" not in args else []
    args = [a for a in args if a != "NOIMAGES"]
    (tmp_path / "taken.npy").write_bytes(b"mine")
    args = [os.path.join(FIX, "photos", "cat", "broken.jpg") if a == "BROKEN" else a for a in args]
    before = sorted(os.listdir(tmp_path))
    out = vggctl("--weights", os.path.join(FIX, "pth", "vgg11.legacy.pth"), *args, *images, cwd=tmp_path)
    assert out.returncode == code, out.stderr
    errors = [l for l in out.stderr.splitlines() if l.startswith("vggctl: error")]
    assert len(errors) == 1 and errors[0].startswith(line.replace("BROKEN", args[-1])), out.stderr
    assert sorted(os.listdir(tmp_path)) == before
    assert (tmp_path / "taken.npy").read_bytes() == b"mine"
    assert out.stdout == ""
