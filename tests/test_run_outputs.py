"""What a run directory tells people besides its weights, read back by the
tools people read them with: `--tensorboard`'s event files through
TensorBoard's own EventAccumulator (which checks every record's CRC-32C and
reads all files of a directory as one run: the resumed run's file too),
whose scalars are exactly metrics.jsonl's figures (as float32) at each
epoch, the moving average's included; `confusion.svg`, whose cells hold
exactly the confusion counts that `vggctl eval --json` computes for the last
weights; and the warning that a validation split of 40 images cannot pick a
best epoch reliably."""
import json
import os
import subprocess
import xml.etree.ElementTree as ET

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("VGGCTL_BIN", os.path.join(ROOT, "target", "release", "vggctl"))
ENV = dict(os.environ, OMP_NUM_THREADS="1")
TAGS = {"loss/train": "train_loss", "loss/val": "test_loss", "accuracy/train": "train_acc",
        "accuracy/val_top1": "test_top1", "accuracy/val_top5": "test_top5", "lr": "lr"}


def vggctl(*args):
    r = subprocess.run([BIN, *args], capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs") / "run"
    first = vggctl("train", "--dataset", "digits", "--arch", "vgg11", "--epochs", "2", "--limit-train", "128",
                   "--limit-test", "40", "-b", "32", "--lr", "0.05", "--tensorboard", "--model-ema",
                   "--model-ema-steps", "1", "--out", str(out))
    vggctl("train", "--resume", str(out), "--epochs", "3", "--quiet")
    return out, first.stderr


def test_tensorboard_reads_every_epochs_figures(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out, _ = run
    assert len([f for f in os.listdir(out) if f.startswith("events.out.tfevents.")]) == 2
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    acc = EventAccumulator(str(out))
    acc.Reload()
    for tag, key in [*TAGS.items(), ("accuracy/val_ema_top1", "ema.top1"), ("loss/val_ema", "ema.loss")]:
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [1, 2, 3], tag
        want = [m[key] if "." not in key else m["ema"][key.split(".")[1]] for m in metrics]
        assert [e.value for e in events] == [float(np.float32(w)) for w in want], tag


def test_confusion_picture_holds_evals_counts(run):
    out, _ = run
    svg = ET.parse(out / "confusion.svg").getroot()
    cells = [e for e in svg.iter() if e.get("data-count") is not None]
    assert len(cells) == 100
    drawn = np.zeros((10, 10), dtype=np.int64)
    for c in cells:
        drawn[int(c.get("data-true")), int(c.get("data-predicted"))] = int(c.get("data-count"))
    r = vggctl("eval", "--checkpoint", str(out / "last.safetensors"), "--limit-test", "40", "--json")
    confusion = np.array(json.loads(r.stdout)["confusion"])
    assert drawn.sum() == 40
    assert (drawn == confusion).all()
    texts = "".join(svg.itertext())
    assert "after epoch 3" in texts and "predicted class" in texts and "true class" in texts


def test_a_small_validation_split_is_named(run):
    _, stderr = run
    assert ("warning: the validation split holds only 40 images: its top-1 moves in steps of 2.50%"
            in stderr), stderr
