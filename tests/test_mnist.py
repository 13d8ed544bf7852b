"""`--dataset mnist` and `fashion-mnist` against torchvision's own `MNIST` and
`FashionMNIST` classes, on the fixtures' real digits written in their
layout (`make_datasets.py`: 28x28 gray IDX files under MNIST/raw/ and
FashionMNIST/raw/, Fashion-MNIST's label of digit d being 9 - d; digits-bin
holds the files, digits-py only their .gz).

- VGG11 trained by vggctl for 2 epochs from each layout equals PyTorch's
  loop over torchvision's images (`ddp_reference.py --mnist`: resized to
  32x32 by `F.resize(antialias=True)`, three channels, the dataset's
  normalization) within 1e-5, with the recipe's default augmentation made
  by torchvision's transforms from vggctl's draws: RandomCrop(32,
  padding=4), then RandomHorizontalFlip with p 0 for MNIST (a mirrored digit
  is no digit), 0.5 for Fashion-MNIST, and `--hflip 1` mirroring every image.
- The checkpoint names torchvision's classes; `eval` of the reference's
  weights gives PyTorch's test loss (within 1e-5) and its exact top-1 count;
  `predict` on test images saved as 28x28 gray PNGs gives PyTorch's
  probabilities within 1e-5 (the PNG is resized as training's images were).
- A download from a mirror on 127.0.0.1 leaves the folder torchvision's
  `MNIST(root)` reads (the .gz files and each extracted), with its images;
  a file whose MD5 differs leaves nothing behind, with one error line.
- The built-in digits are not mirrored by default either.
- `--dataset kmnist` (the fixtures' MNIST files under KMNIST/raw/) trains
  as PyTorch does on torchvision's `KMNIST`, not mirrored, normalized by
  the training images' own mean and deviation (recorded within 1e-12 of
  numpy's in float64), with KMNIST's class names.
- `--dataset emnist-letters` (a gzip.zip in EMNIST's layout, of the
  fixtures' digits stored transposed, labelled 1..10) downloads the zip,
  leaves the folder torchvision's `EMNIST(split="letters")` reads, and
  trains as PyTorch does on its images turned upright, for torchvision's 27
  classes ("N/A" first), normalized by its own training images;
  `emnist-byclass` is then extracted from the zip kept there, with
  torchvision's 62 classes; a split the zip lacks is one line naming it.
- `--dataset qmnist` (the fixtures' digits as QMNIST's files, labels as
  int32 rows of eight whose other columns are not the digit) downloads the
  four .gz, leaves the folder torchvision's `QMNIST` reads, and trains as
  PyTorch does on its images and first label column; labels in MNIST's
  one-byte file instead are one line naming it."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dataset_helpers import BIN, ENV, FIX, apart, initial_model, md5, mirror, reference  # noqa: E402
from ddp_reference import MNIST_NORM, mnist, mnist_images, mnist_norm, normalize  # noqa: E402

LIMIT, BATCH, EPOCHS = 48, 16, 2


def trained_by_pytorch(tmp_path, name, init, flip):
    return reference(tmp_path / f"ref-{name}-{flip}.safetensors", init, os.path.join(FIX, "digits-bin"),
                     "--mnist", name, "--crop-flip", str(flip), limit=LIMIT, batch=BATCH, epochs=EPOCHS)


def train(out, name, layout, init, *extra):
    r = subprocess.run(
        [BIN, "train", "--dataset", name, "--data-dir", os.path.join(FIX, layout), "--no-download",
         "--arch", "vgg11", "--head", "cifar", "--initial-checkpoint", init, "--limit-train", str(LIMIT),
         "--limit-test", "16", "--epochs", str(EPOCHS), "--batch-size", str(BATCH), "--device", "cpu",
         "--quiet", "--out", str(out), *extra],
        capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr
    return load_file(str(out / "last.safetensors"))


@pytest.mark.parametrize("name,flip", [("mnist", 0.0), ("fashion-mnist", 0.5)])
def test_mnist_trains_and_evaluates_as_torchvision_reads_it(tmp_path, name, flip):
    init = str(tmp_path / "init.safetensors")
    model = initial_model(init, 5)
    want_path = trained_by_pytorch(tmp_path, name, init, flip)
    want = load_file(want_path)
    assert apart(want, load_file(init)) > 1e-3, "the reference did not train"

    test = mnist(os.path.join(FIX, "digits-bin"), name, train=False)
    for layout in ["digits-bin", "digits-py"]:
        out = tmp_path / layout
        ours = train(out, name, layout, init)
        assert apart(ours, want) < 1e-5, layout
        meta = safe_open(str(out / "last.safetensors"), "pt").metadata()
        assert json.loads(meta["class_names"]) == test.classes and meta["dataset"] == name
        assert json.loads(meta["mean"]) == list(MNIST_NORM[name][0])

    # The flip is the only difference between the two probabilities' runs.
    other = 1.0 if flip == 0.0 else 0.0
    mirrored = train(tmp_path / "other", name, "digits-bin", init, "--hflip", str(other))
    assert apart(mirrored, want) > 1e-4
    assert apart(mirrored, load_file(trained_by_pytorch(tmp_path, name, init, other))) < 1e-5

    # The reference's weights evaluated on the whole test split.
    model.load_state_dict(want)
    model.eval()
    x = normalize(mnist_images(test), *MNIST_NORM[name])
    with torch.no_grad():
        logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits, test.targets).item()
    correct = (logits.argmax(1) == test.targets).sum().item()
    r = subprocess.run(
        [BIN, "eval", "--checkpoint", want_path, "--dataset", name, "--data-dir", os.path.join(FIX, "digits-py"),
         "--no-download", "--device", "cpu", "--json"],
        capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["images"] == len(test.targets) == 297
    assert round(report["top1"] * 297 / 100) == correct
    assert abs(report["loss"] - loss) <= 1e-5 * max(1.0, abs(loss))

    # `predict` on test images saved as 28x28 gray PNGs sees what training
    # saw: the probabilities of PyTorch's logits within 1e-5.
    pngs = []
    for i in range(4):
        pngs.append(str(tmp_path / f"t{i}.png"))
        Image.fromarray(test.data[i].numpy(), mode="L").save(pngs[-1])
    trained = str(tmp_path / "digits-py" / "last.safetensors")
    r = subprocess.run([BIN, "predict", "--checkpoint", trained, "--device", "cpu", "--json", "--topk", "10", *pngs],
                       capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr
    model.load_state_dict(load_file(trained))
    with torch.no_grad():
        probs = model(x[:4]).softmax(1)
    for i, got in enumerate(json.loads(r.stdout)):
        assert got["top"][0]["label"] == test.classes[int(probs[i].argmax())]
        assert max(abs(g["probability"] - probs[i, g["index"]].item()) for g in got["top"]) < 1e-5


FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


@pytest.fixture
def served():
    """The fixtures' .gz files served on 127.0.0.1, as a mirror serves MNIST's."""
    raw = os.path.join(FIX, "digits-py", "MNIST", "raw")
    with mirror(raw) as url:
        yield url, raw


def test_a_download_leaves_what_torchvision_reads(tmp_path, served):
    url, raw = served
    sums = [md5(os.path.join(raw, f + ".gz")) for f in FILES]
    data = tmp_path / "data"
    # A mirror that does not answer comes first: the next one is tried.
    env = dict(ENV, VGGCTL_MNIST_URL=f"http://127.0.0.1:9/,{url}", VGGCTL_MNIST_MD5=",".join(sums),
               VGGCTL_HTTP_TIMEOUT="5")
    r = subprocess.run(
        [BIN, "train", "--dataset", "mnist", "--data-dir", str(data), "--arch", "vgg11", "--epochs", "1",
         "--limit-train", "16", "--limit-test", "8", "--batch-size", "8", "--device", "cpu", "--quiet",
         "--out", str(tmp_path / "ok")],
        capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    got = sorted(os.listdir(data / "MNIST" / "raw"))
    assert got == sorted(FILES + [f + ".gz" for f in FILES])
    for split in [True, False]:
        ours, theirs = mnist(str(data), "mnist", split), mnist(os.path.join(FIX, "digits-bin"), "mnist", split)
        assert torch.equal(ours.data, theirs.data) and torch.equal(ours.targets, theirs.targets)

    # One wrong MD5: an error line naming it, and no folder left behind.
    bad = tmp_path / "bad"
    env["VGGCTL_MNIST_MD5"] = ",".join(sums[:3] + ["0" * 32])
    r = subprocess.run(
        [BIN, "train", "--dataset", "mnist", "--data-dir", str(bad), "--epochs", "1", "--device", "cpu",
         "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "t10k-labels-idx1-ubyte.gz" in lines[0] and "MD5" in lines[0].upper(), r.stderr
    left = sorted(os.listdir(bad / "MNIST" / "raw")) if bad.exists() else []
    assert all(not f.startswith("t10k-labels") for f in left), left
    assert not (tmp_path / "run").exists()


def test_the_built_in_digits_are_not_mirrored_by_default(tmp_path):
    """`--dataset digits` trains as with `--hflip 0` (weights equal bit for
    bit) and not as with torchvision's 0.5; the run records its 0."""
    def run(name, *extra):
        out = tmp_path / name
        r = subprocess.run(
            [BIN, "train", "--dataset", "digits", "--arch", "vgg11", "--epochs", "1", "--limit-train", "32",
             "--limit-test", "8", "--batch-size", "16", "--device", "cpu", "--quiet", "--out", str(out), *extra],
            capture_output=True, text=True, timeout=300, env=ENV)
        assert r.returncode == 0, r.stderr
        return out, load_file(str(out / "last.safetensors"))

    out, default = run("default")
    assert json.loads((out / "config.json").read_text())["hflip"] == 0.0
    _, never = run("never", "--hflip", "0")
    _, half = run("half", "--hflip", "0.5")
    assert all(torch.equal(default[k], never[k]) for k in default)
    assert apart(default, half) > 1e-4


def test_a_gray_model_reads_colour_images_as_pil_makes_them_gray(tmp_path):
    """A model trained on MNIST reads a colour image as PIL's
    `convert("L")` makes it gray (then as its training images: 32x32,
    three channels): `predict` gives PyTorch's probabilities of those
    images within 1e-5, and `eval` of a folder of them (streamed, each
    squeezed whole) PyTorch's loss (1e-5) and top-1 count. The images are
    the test digits drawn in colour over a real photograph; read in colour
    they would score otherwise (by more than 1e-3)."""
    import numpy as np
    from skimage import data as photos
    from types import SimpleNamespace
    from torchvision.transforms.functional import resize

    out = tmp_path / "run"
    r = subprocess.run(
        [BIN, "train", "--dataset", "mnist", "--data-dir", os.path.join(FIX, "digits-bin"), "--no-download",
         "--arch", "vgg11", "--head", "cifar", "--epochs", "1", "--limit-train", "32", "--limit-test", "8",
         "--batch-size", "16", "--device", "cpu", "--quiet", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr
    # The run's metadata (an MNIST model) over weights whose last layer is
    # scaled up: a run this short scores every image near 1/10, where
    # inputs hardly show in the probabilities.
    weights = load_file(str(out / "last.safetensors"))
    last = max((k for k in weights if k.startswith("classifier.") and k.endswith(".weight")),
               key=lambda k: int(k.split(".")[1]))
    weights[last] = weights[last] * 200
    checkpoint = str(tmp_path / "sharp.safetensors")
    save_file(weights, checkpoint, metadata=safe_open(str(out / "last.safetensors"), "pt").metadata())

    test = mnist(os.path.join(FIX, "digits-bin"), "mnist", train=False)
    picked = [i for c in range(10) for i in (test.targets == c).nonzero().flatten()[:2].tolist()]
    background = np.asarray(Image.fromarray(photos.astronaut()).resize((28, 28), Image.BILINEAR), dtype=np.float64)
    files, gray, colour = [], [], []
    for k, i in enumerate(picked):
        ink = test.data[i].numpy()[..., None] / 255.0
        pen = np.array([[255, 40, 0], [20, 200, 60], [30, 60, 255], [250, 220, 30]][k % 4], dtype=np.float64)
        rgb = Image.fromarray(np.round(background * (1 - ink) + pen * ink).astype(np.uint8), mode="RGB")
        path = tmp_path / "colour" / test.classes[int(test.targets[i])] / f"{k}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        rgb.save(path)
        files.append(str(path))
        gray.append(torch.from_numpy(np.array(rgb.convert("L"))))
        colour.append(torch.from_numpy(np.array(rgb)).permute(2, 0, 1))
    labels = test.targets[picked]

    model = initial_model(tmp_path / "unused.safetensors", 0)
    model.load_state_dict(load_file(checkpoint))
    model.eval()
    x = normalize(mnist_images(SimpleNamespace(data=torch.stack(gray))), *MNIST_NORM["mnist"])
    x_colour = normalize(resize(torch.stack(colour), [32, 32], antialias=True), *MNIST_NORM["mnist"])
    with torch.no_grad():
        logits = model(x)
        in_colour = model(x_colour).softmax(1)
    probs = logits.softmax(1)
    assert (probs - in_colour).abs().max() > 1e-3, "colour and gray score alike: proves nothing"
    assert probs.max(1).values.min() > 0.2, "near-uniform scores: the comparisons would see little"

    r = subprocess.run([BIN, "predict", "--checkpoint", checkpoint, "--device", "cpu", "--json", "--topk", "10",
                        *files], capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr
    for i, got in enumerate(json.loads(r.stdout)):
        assert max(abs(g["probability"] - probs[i, g["index"]].item()) for g in got["top"]) < 1e-5, i

    r = subprocess.run([BIN, "eval", "--checkpoint", checkpoint, "--dataset", "folder", "--val-dir",
                        str(tmp_path / "colour"), "--device", "cpu", "--json"],
                       capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    loss = torch.nn.functional.cross_entropy(logits, labels).item()
    assert report["images"] == 20
    assert round(report["top1"] * 20 / 100) == (logits.argmax(1) == labels).sum().item()
    assert abs(report["loss"] - loss) <= 1e-5 * max(1.0, abs(loss)), (report["loss"], loss)


def idx(a):
    """An IDX file of unsigned bytes (make_datasets.py's layout)."""
    return bytes([0, 0, 8, a.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in a.shape) + a.tobytes()


def test_bad_mnist_files_are_one_line_naming_the_file(tmp_path):
    """A label outside 0..9, fewer labels than images, a file cut short, a
    damaged .gz and a missing file: one error line naming the file, exit 1,
    no run directory."""
    import gzip
    import numpy as np
    src = os.path.join(FIX, "digits-bin", "MNIST", "raw")
    labels = np.fromfile(os.path.join(src, "t10k-labels-idx1-ubyte"), dtype=np.uint8)[8:]
    images = open(os.path.join(src, "t10k-images-idx3-ubyte"), "rb").read()
    cases = [
        ("t10k-labels-idx1-ubyte", idx(np.where(np.arange(len(labels)) == 5, 10, labels).astype(np.uint8)),
         "label 5 is 10, outside 0..9"),
        ("t10k-labels-idx1-ubyte", idx(labels[:-1]), "296 labels for the 297 images"),
        ("t10k-images-idx3-ubyte", images[:-100], "bytes follow it (truncated?)"),
        ("t10k-images-idx3-ubyte.gz", gzip.compress(images)[:-50], "not a gzip file, or a damaged one"),
        ("t10k-images-idx3-ubyte", None, "downloading is off"),
    ]
    for k, (name, content, needle) in enumerate(cases):
        raw = tmp_path / f"d{k}" / "MNIST" / "raw"
        raw.mkdir(parents=True)
        for f in FILES:
            os.symlink(os.path.join(src, f), raw / f)
        plain = raw / name.removesuffix(".gz")
        os.unlink(plain)
        if content is not None:
            (raw / name).write_bytes(content)
        r = subprocess.run([BIN, "train", "--dataset", "mnist", "--data-dir", str(tmp_path / f"d{k}"), "--no-download",
                            "--device", "cpu", "--out", str(tmp_path / "run")],
                           capture_output=True, text=True, timeout=120, env=ENV)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1 and needle in lines[0], (name, r.stderr)
        assert name.removesuffix(".gz") in lines[0] and not (tmp_path / "run").exists()


def test_kmnist_is_normalized_by_its_own_training_images(tmp_path):
    raw = tmp_path / "data" / "KMNIST" / "raw"
    shutil.copytree(os.path.join(FIX, "digits-bin", "MNIST", "raw"), raw)
    init = str(tmp_path / "init.safetensors")
    initial_model(init, 9)
    want = load_file(reference(tmp_path / "ref.safetensors", init, str(tmp_path / "data"), "--mnist", "kmnist",
                               "--crop-flip", "0", limit=LIMIT, batch=BATCH, epochs=EPOCHS))
    assert apart(want, load_file(init)) > 1e-3, "the reference did not train"
    out = tmp_path / "run"
    r = subprocess.run(
        [BIN, "train", "--dataset", "kmnist", "--data-dir", str(tmp_path / "data"), "--no-download",
         "--arch", "vgg11", "--head", "cifar", "--initial-checkpoint", init, "--limit-train", str(LIMIT),
         "--limit-test", "16", "--epochs", str(EPOCHS), "--batch-size", str(BATCH), "--device", "cpu",
         "--quiet", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr
    assert apart(load_file(str(out / "last.safetensors")), want) < 1e-5
    ds = mnist(str(tmp_path / "data"), "kmnist")
    meta = safe_open(str(out / "last.safetensors"), "pt").metadata()
    assert json.loads(meta["class_names"]) == ds.classes and meta["dataset"] == "kmnist"
    mean, std = mnist_norm(ds, "kmnist")
    assert max(abs(a - b) for a, b in zip(json.loads(meta["mean"]), mean)) < 1e-12
    assert max(abs(a - b) for a, b in zip(json.loads(meta["std"]), std)) < 1e-12
    assert abs(mean[0] - MNIST_NORM["mnist"][0][0]) > 0.01, "the test cannot tell the images' own mean from MNIST's"


def emnist_zip(path, splits):
    """EMNIST's gzip.zip made of the fixtures' MNIST files: for each split,
    its four files' .gz under gzip/, the images stored transposed (as
    EMNIST's are), the labels `splits[split](digit)`."""
    import gzip
    import zipfile

    import numpy as np
    raw = os.path.join(FIX, "digits-bin", "MNIST", "raw")
    with zipfile.ZipFile(path, "w") as z:
        for split, label in splits.items():
            for part, prefix in [("train", "train"), ("test", "t10k")]:
                images = open(os.path.join(raw, f"{prefix}-images-idx3-ubyte"), "rb").read()
                x = np.frombuffer(images[16:], np.uint8).reshape(-1, 28, 28).transpose(0, 2, 1)
                labels = open(os.path.join(raw, f"{prefix}-labels-idx1-ubyte"), "rb").read()
                y = label(np.frombuffer(labels[8:], np.uint8)).astype(np.uint8)
                for kind, content in [("images-idx3", images[:16] + x.tobytes()), ("labels-idx1", labels[:8] + y.tobytes())]:
                    z.writestr(f"gzip/emnist-{split}-{part}-{kind}-ubyte.gz", gzip.compress(content))


def test_emnist_downloads_its_zip_and_trains_upright_as_pytorch_does(tmp_path):
    import torchvision
    served = tmp_path / "served"
    served.mkdir()
    emnist_zip(served / "gzip.zip", {"letters": lambda y: y + 1, "byclass": lambda y: y})
    data = tmp_path / "data"
    init = str(tmp_path / "init.safetensors")
    initial_model(init, 11, classes=27)
    out = tmp_path / "run"
    with mirror(str(served)) as url:
        env = dict(ENV, VGGCTL_EMNIST_URL=url, VGGCTL_EMNIST_MD5=md5(served / "gzip.zip"))
        r = subprocess.run(
            [BIN, "train", "--dataset", "emnist-letters", "--data-dir", str(data), "--arch", "vgg11", "--head",
             "cifar", "--initial-checkpoint", init, "--limit-train", str(LIMIT), "--limit-test", "16", "--epochs",
             str(EPOCHS), "--batch-size", str(BATCH), "--device", "cpu", "--quiet", "--out", str(out)],
            capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    raw = data / "EMNIST" / "raw"
    files = [f"emnist-letters-{p}-{k}-ubyte" for p in ["train", "test"] for k in ["images-idx3", "labels-idx1"]]
    assert sorted(os.listdir(raw)) == sorted(["gzip.zip", *files])
    # torchvision reads what vggctl left; PyTorch trains on its images upright.
    want = load_file(reference(tmp_path / "ref.safetensors", init, str(data), "--mnist", "emnist-letters",
                               "--crop-flip", "0", limit=LIMIT, batch=BATCH, epochs=EPOCHS))
    assert apart(want, load_file(init)) > 1e-3, "the reference did not train"
    assert apart(load_file(str(out / "last.safetensors")), want) < 1e-5
    ds = mnist(str(data), "emnist-letters")
    assert int(ds.targets.min()) == 1 and len(ds.classes) == 27
    meta = safe_open(str(out / "last.safetensors"), "pt").metadata()
    assert json.loads(meta["class_names"]) == ds.classes and meta["dataset"] == "emnist-letters"
    mean, std = mnist_norm(ds, "emnist-letters")
    assert max(abs(a - b) for a, b in zip(json.loads(meta["std"]), std)) < 1e-12

    def train_offline(dataset):
        return subprocess.run(
            [BIN, "train", "--dataset", dataset, "--data-dir", str(data), "--no-download", "--arch", "vgg11",
             "--head", "gap", "--epochs", "1", "--limit-train", "8", "--limit-test", "8", "--batch-size", "8",
             "--device", "cpu", "--quiet", "--out", str(tmp_path / dataset)],
            capture_output=True, text=True, timeout=300, env=ENV)

    # Another split comes out of the zip kept there.
    r = train_offline("emnist-byclass")
    assert r.returncode == 0, r.stderr
    meta = safe_open(str(tmp_path / "emnist-byclass" / "last.safetensors"), "pt").metadata()
    assert json.loads(meta["class_names"]) == torchvision.datasets.EMNIST.classes_split_dict["byclass"]
    # A split the zip lacks, and no split named: one line each.
    r = train_offline("emnist-digits")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert "gzip.zip: no gzip/emnist-digits-train-images-idx3-ubyte.gz in it" in lines[0], lines[0]
    assert not (tmp_path / "emnist-digits").exists() and not (raw / "emnist-digits-train-images-idx3-ubyte").exists()
    r = train_offline("emnist")
    assert r.returncode == 2 and "--dataset emnist: name the split, one of emnist-byclass," in r.stderr, r.stderr
    # Neither the split's files nor the zip, and no download: one line.
    data = tmp_path / "none"
    r = train_offline("emnist-letters")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert (f"no emnist-letters in {data}: {data}/EMNIST/raw lacks emnist-letters-train-images-idx3-ubyte, "
            "emnist-letters-train-labels-idx1-ubyte, emnist-letters-test-images-idx3-ubyte, "
            "emnist-letters-test-labels-idx1-ubyte, gzip.zip and downloading is off") in lines[0], lines[0]
    assert not data.exists()
    # A damaged zip: one line naming it, no split file and no run left.
    data = tmp_path / "damaged"
    (data / "EMNIST" / "raw").mkdir(parents=True)
    (data / "EMNIST" / "raw" / "gzip.zip").write_bytes((served / "gzip.zip").read_bytes()[:-100])
    r = train_offline("emnist-letters")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert f"{data}/EMNIST/raw/gzip.zip: not a zip archive, or a damaged one" in lines[0], lines[0]
    assert os.listdir(data / "EMNIST" / "raw") == ["gzip.zip"] and not (tmp_path / "emnist-letters").exists()


def test_qmnist_downloads_and_trains_on_its_first_label_column(tmp_path):
    import gzip

    import numpy as np
    src = os.path.join(FIX, "digits-bin", "MNIST", "raw")
    served = tmp_path / "served"
    served.mkdir()
    files = []
    for part, prefix in [("train", "train"), ("test", "t10k")]:
        images = open(os.path.join(src, f"{prefix}-images-idx3-ubyte"), "rb").read()
        digits = np.frombuffer(open(os.path.join(src, f"{prefix}-labels-idx1-ubyte"), "rb").read()[8:], np.uint8)
        digits = digits.astype(np.int64)
        # QMNIST's rows: the class, then NIST's ids (here anything but it).
        rows = np.stack([digits, *[(digits + k) % 7 + 100 * k for k in range(1, 8)]], 1).astype(">i4")
        labels = b"\0\0\x0c\x02" + len(rows).to_bytes(4, "big") + (8).to_bytes(4, "big") + rows.tobytes()
        for name, content in [(f"qmnist-{part}-images-idx3-ubyte", images), (f"qmnist-{part}-labels-idx2-int", labels)]:
            (served / f"{name}.gz").write_bytes(gzip.compress(content))
            files.append(name)
    data = tmp_path / "data"
    init = str(tmp_path / "init.safetensors")
    initial_model(init, 13)
    out = tmp_path / "run"
    with mirror(str(served)) as url:
        env = dict(ENV, VGGCTL_QMNIST_URL=url, VGGCTL_QMNIST_MD5=",".join(md5(served / f"{f}.gz") for f in files))
        r = subprocess.run(
            [BIN, "train", "--dataset", "qmnist", "--data-dir", str(data), "--arch", "vgg11", "--head", "cifar",
             "--initial-checkpoint", init, "--limit-train", str(LIMIT), "--limit-test", "16", "--epochs",
             str(EPOCHS), "--batch-size", str(BATCH), "--device", "cpu", "--quiet", "--out", str(out)],
            capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    raw = data / "QMNIST" / "raw"
    assert sorted(os.listdir(raw)) == sorted(files + [f"{f}.gz" for f in files])
    want = load_file(reference(tmp_path / "ref.safetensors", init, str(data), "--mnist", "qmnist",
                               "--crop-flip", "0", limit=LIMIT, batch=BATCH, epochs=EPOCHS))
    assert apart(want, load_file(init)) > 1e-3, "the reference did not train"
    assert apart(load_file(str(out / "last.safetensors")), want) < 1e-5
    meta = safe_open(str(out / "last.safetensors"), "pt").metadata()
    assert json.loads(meta["class_names"]) == mnist(str(data), "qmnist").classes and meta["dataset"] == "qmnist"
    assert json.loads(meta["mean"]) == list(MNIST_NORM["qmnist"][0])

    # MNIST's one-byte labels where QMNIST's rows belong: one line.
    os.remove(raw / "qmnist-test-labels-idx2-int")
    shutil.copy(os.path.join(src, "t10k-labels-idx1-ubyte"), raw / "qmnist-test-labels-idx2-int")
    r = subprocess.run([BIN, "train", "--dataset", "qmnist", "--data-dir", str(data), "--no-download", "--device",
                        "cpu", "--out", str(tmp_path / "bad")], capture_output=True, text=True, timeout=120, env=ENV)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert "qmnist-test-labels-idx2-int: not an IDX file of int32 labels" in lines[0], lines[0]
    assert not (tmp_path / "bad").exists()
