"""`--dataset cifar100` against torchvision's `datasets.CIFAR100` itself, on
the fixtures' real digits written as CIFAR-100 in both published layouts
(`make_datasets.py`: fine labels 10*d + 3, coarse labels d // 2, so a
reader that took the coarse byte or CIFAR-10's single label would train on
other targets). VGG11 with the cifar head (100 classes) trained by vggctl
for 2 epochs on each layout equals PyTorch's training loop
(`ddp_reference.py --cifar100`: torchvision's images and fine labels,
CIFAR-100's mean and deviation) within 1e-5; the checkpoint names
torchvision's 100 classes; `eval` of the reference's weights on the test
split gives the loss and top-1 that torchvision's test images and labels
give in PyTorch (loss within 1e-5, the count exact)."""
import json
import os
import subprocess
import sys

import torch
from safetensors import safe_open
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dataset_helpers import BIN, ENV, FIX, apart, initial_model, reference  # noqa: E402
from ddp_reference import CIFAR100_NORM, cifar100, normalize  # noqa: E402

LIMIT, BATCH, EPOCHS = 64, 16, 2


def test_cifar100_trains_and_evaluates_as_torchvision_reads_it(tmp_path):
    init = str(tmp_path / "init.safetensors")
    model = initial_model(init, 3, classes=100)
    want_path = reference(tmp_path / "ref.safetensors", init, os.path.join(FIX, "digits-py"), "--cifar100",
                          limit=LIMIT, batch=BATCH, epochs=EPOCHS)
    want = load_file(want_path)
    assert apart(want, load_file(init)) > 1e-3, "the reference did not train"

    test = cifar100(os.path.join(FIX, "digits-py"), train=False)
    for layout in ["digits-py", "digits-bin"]:
        out = tmp_path / layout
        r = subprocess.run(
            [BIN, "train", "--dataset", "cifar100", "--data-dir", os.path.join(FIX, layout), "--no-download",
             "--arch", "vgg11", "--head", "cifar", "--initial-checkpoint", init, "--no-augment",
             "--limit-train", str(LIMIT), "--limit-test", "16", "--epochs", str(EPOCHS),
             "--batch-size", str(BATCH), "--device", "cpu", "--quiet", "--out", str(out)],
            capture_output=True, text=True, timeout=300, env=ENV)
        assert r.returncode == 0, r.stderr
        ours = load_file(str(out / "last.safetensors"))
        assert set(ours) == set(want) and ours["classifier.3.weight"].shape == (100, 512)
        assert apart(ours, want) < 1e-5, layout
        meta = safe_open(str(out / "last.safetensors"), "pt").metadata()
        assert json.loads(meta["class_names"]) == test.classes and meta["dataset"] == "cifar100"

    # The reference's weights evaluated on the whole test split.
    model.load_state_dict(want)
    model.eval()
    x = normalize(torch.from_numpy(test.data).permute(0, 3, 1, 2), *CIFAR100_NORM)
    y = torch.tensor(test.targets)
    with torch.no_grad():
        logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits, y).item()
    correct = (logits.argmax(1) == y).sum().item()
    r = subprocess.run(
        [BIN, "eval", "--checkpoint", want_path, "--dataset", "cifar100", "--data-dir", os.path.join(FIX, "digits-bin"),
         "--no-download", "--device", "cpu", "--json"],
        capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["images"] == len(y) == 297
    assert round(report["top1"] * len(y) / 100) == correct
    assert abs(report["loss"] - loss) <= 1e-5 * max(1.0, abs(loss))
