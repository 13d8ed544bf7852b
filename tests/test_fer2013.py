"""`--dataset fer2013` against torchvision's own `FER2013` class, on
scikit-learn's real 8x8 digits written as FER2013's CSV (each image
enlarged to 48x48 with a little noise, its emotion the digit modulo 7):
400 rows in `fer2013/fer2013.csv`, `Usage` Training (300), PublicTest and
PrivateTest (50 each) interleaved, so that a split is the file's rows of
its usage in their order; the same rows as `icml_face_data.csv` (spaced
column names, unquoted pixels, another column order).

- VGG11 trained by vggctl for 2 epochs equals PyTorch's loop over
  torchvision's faces (`ddp_reference.py --fer2013`: 48x48, three
  channels, normalized by the training faces' own mean and deviation,
  RandomCrop(48, padding=4) and mirrored with p 0.5) within 1e-5; the
  recorded mean and deviation are numpy's within 1e-12, the classes the
  seven emotions.
- `eval` of the reference's weights gives PyTorch's test loss (within
  1e-5) and its exact top-1 count over the 100 test faces, from
  fer2013.csv and from icml_face_data.csv alone.
- A missing folder (naming Kaggle), Kaggle's train.csv and test.csv, a
  pixel over 255 and a row of 2,303 pixels are one error line each,
  naming the file (and the line), leaving no run directory."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dataset_helpers import BIN, ENV, apart, errors, initial_model, reference, reference_scores  # noqa: E402
from ddp_reference import fer2013  # noqa: E402

LIMIT, BATCH, EPOCHS = 48, 16, 2
EMOTIONS = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]


def rows():
    """(emotion, pixels, usage) of 400 faces made of scikit-learn's digits."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    x = np.kron(digits.images[:400], np.ones((6, 6))) * 255 / 16
    noise = np.random.default_rng(5).normal(0, 6, x.shape)
    x = np.clip(np.rint(x + noise), 0, 255).astype(np.uint8)
    usage = ["Training"] * 300 + ["PublicTest"] * 50 + ["PrivateTest"] * 50
    np.random.default_rng(6).shuffle(usage)
    return [(int(y) % 7, " ".join(map(str, face.ravel())), u) for face, y, u in zip(x, digits.target, usage)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """`fer` (fer2013/fer2013.csv) and `icml` (fer2013/icml_face_data.csv)."""
    root = tmp_path_factory.mktemp("fer")
    (root / "fer" / "fer2013").mkdir(parents=True)
    (root / "icml" / "fer2013").mkdir(parents=True)
    faces = rows()
    text = "emotion,pixels,Usage\n" + "".join(f'{e},"{p}",{u}\n' for e, p, u in faces)
    (root / "fer" / "fer2013" / "fer2013.csv").write_text(text)
    text = "emotion, Usage, pixels\r\n" + "".join(f"{e},{u},{p}\r\n" for e, p, u in faces)
    (root / "icml" / "fer2013" / "icml_face_data.csv").write_text(text)
    return root


def vggctl(*args):
    return subprocess.run([BIN, *args], capture_output=True, text=True, timeout=300, env=ENV)


def test_fer2013_trains_and_evaluates_as_torchvision_reads_it(data, tmp_path):
    fer = str(data / "fer")
    init = str(tmp_path / "init.safetensors")
    model = initial_model(init, 13, classes=7)
    want_path = reference(tmp_path / "ref.safetensors", init, fer, "--fer2013", "--crop-flip", "0.5",
                          limit=LIMIT, batch=BATCH, epochs=EPOCHS)
    want = load_file(want_path)
    assert apart(want, load_file(init)) > 1e-3, "the reference did not train"
    out = tmp_path / "run"
    r = vggctl("train", "--dataset", "fer2013", "--data-dir", fer, "--arch", "vgg11", "--head", "cifar",
               "--initial-checkpoint", init, "--limit-train", str(LIMIT), "--limit-test", "16",
               "--epochs", str(EPOCHS), "--batch-size", str(BATCH), "--device", "cpu", "--quiet", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert apart(load_file(str(out / "last.safetensors")), want) < 1e-5
    meta = safe_open(str(out / "last.safetensors"), "pt").metadata()
    assert json.loads(meta["class_names"]) == EMOTIONS and meta["dataset"] == "fer2013"
    _, _, (mean, std) = fer2013(fer)
    assert max(abs(a - b) for a, b in zip(json.loads(meta["mean"]), mean)) < 1e-12
    assert max(abs(a - b) for a, b in zip(json.loads(meta["std"]), std)) < 1e-12
    config = json.loads((out / "config.json").read_text())
    assert "hflip" not in config and config["input_size"] == 48, config  # hflip: the default 0.5

    # The reference's weights evaluated on the whole test split, read from
    # either file.
    images, targets, norm = fer2013(fer, train=False)
    loss, correct = reference_scores(model, want, images, targets, norm)
    for root in (fer, str(data / "icml")):
        r = vggctl("eval", "--checkpoint", want_path, "--dataset", "fer2013", "--data-dir", root,
                   "--device", "cpu", "--json")
        assert r.returncode == 0, r.stderr
        report = json.loads(r.stdout)
        assert report["images"] == len(targets) == 100 and round(report["top1"]) == correct, root
        assert abs(report["loss"] - loss) <= 1e-5 * max(1.0, abs(loss)), root


def test_missing_and_bad_files_are_one_line(data, tmp_path):
    def train(root):
        shutil.rmtree(tmp_path / "run", ignore_errors=True)
        r = vggctl("train", "--dataset", "fer2013", "--data-dir", str(root), "--device", "cpu",
                   "--out", str(tmp_path / "run"))
        assert r.returncode == 1 and len(errors(r)) == 1, r.stderr
        assert not (tmp_path / "run").exists()
        return errors(r)[0]

    line = train(tmp_path / "none")
    assert f"{tmp_path / 'none' / 'fer2013'}: no fer2013.csv or icml_face_data.csv" in line, line
    assert "https://www.kaggle.com/c/challenges-in-representation-learning-facial-expression-recognition" in line

    kaggle = tmp_path / "kaggle" / "fer2013"
    kaggle.mkdir(parents=True)
    faces = rows()
    (kaggle / "train.csv").write_text("emotion,pixels\n" + "".join(f'{e},"{p}"\n' for e, p, _ in faces[:10]))
    (kaggle / "test.csv").write_text("pixels\n" + "".join(f'"{p}"\n' for _, p, _ in faces[10:20]))
    line = train(tmp_path / "kaggle")
    assert f"{kaggle / 'train.csv'}: Kaggle's train.csv and test.csv cannot be read" in line, line
    assert "put fer2013.csv or icml_face_data.csv" in line, line

    text = (data / "fer" / "fer2013" / "fer2013.csv").read_text().splitlines(keepends=True)
    head, pixels, tail = text[3].split('"')
    over = f'{head}"300 {pixels.split(" ", 1)[1]}"{tail}'
    for bad_line, needle in [
        (over, "line 4: pixel '300' is not 0 to 255"),
        (text[3].rsplit(" ", 1)[0] + '",Training\n', "line 4: 2303 pixels, where a face of FER2013 has 2304"),
    ]:
        bad = tmp_path / "bad" / "fer2013"
        shutil.rmtree(bad, ignore_errors=True)
        bad.mkdir(parents=True)
        (bad / "fer2013.csv").write_text("".join(text[:3] + [bad_line] + text[4:]))
        line = train(bad.parent)
        assert f"{bad / 'fer2013.csv'}: " in line and needle in line, line
