"""Training throughput, vggctl against PyTorch, in one run on one device, on
the same synthetic CIFAR-shaped data (VGG16, cifar head, SGD step):

  (a) the recipe's own PyTorch loop: torchvision transforms (RandomCrop 32
      pad 4, RandomHorizontalFlip, ToTensor, Normalize) on PIL images, a
      DataLoader with num_workers=0 (and 8 on a GPU), batch 128;
  (b) PyTorch model-only steps on a normalized batch already on the device;
  (c) vggctl train end to end (device-resident data, augmentation, step),
      read from its metrics.jsonl (epochs after the first, so warm).

With --bf16, also (b) and (c) in bfloat16: PyTorch under
torch.autocast(bfloat16) with channels_last model and batch, vggctl with
--precision bf16 (on a CPU, this needs native bf16: AVX512-BF16 or AMX).

Each figure is the median of --repeat measurements: on a shared machine
single runs vary by +-15%.

Prints images/s and the ratios. Not a test: timings vary with the machine."""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from vgg_reference import build  # noqa: E402

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class RecipeDataset(torch.utils.data.Dataset):
    """What torchvision's CIFAR10.__getitem__ does: PIL image, then the transform."""

    def __init__(self, data, labels, transform):
        self.data, self.labels, self.transform = data, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.data[i])), int(self.labels[i])


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def recipe_loop(data, labels, dev, batch, workers, bn):
    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])
    loader = torch.utils.data.DataLoader(
        RecipeDataset(data, labels, transform), batch_size=batch, shuffle=True, num_workers=workers
    )
    model = build("vgg16", bn, "cifar", 10).to(dev).train()
    opt, crit = sgd(model), nn.CrossEntropyLoss()
    seen, t0 = 0, None
    for i, (x, y) in enumerate(loader):
        if i == 1:  # the first batch warms up (cuDNN, workers)
            sync(dev)
            t0, seen = time.perf_counter(), 0
        x, y = x.to(dev), y.to(dev)
        opt.zero_grad()
        crit(model(x), y).backward()
        opt.step()
        seen += len(y)
    sync(dev)
    return seen / (time.perf_counter() - t0)


def model_only(dev, batch, steps, bn, bf16=False):
    model = build("vgg16", bn, "cifar", 10).to(dev).train()
    opt, crit = sgd(model), nn.CrossEntropyLoss()
    x = torch.randn(batch, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)
    if bf16:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    for i in range(steps + 2):
        if i == 2:
            sync(dev)
            t0 = time.perf_counter()
        opt.zero_grad()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            loss = crit(model(x), y)
        loss.backward()
        opt.step()
    sync(dev)
    return batch * steps / (time.perf_counter() - t0)


def write_bin_dataset(root, data, labels):
    d = os.path.join(root, "cifar-10-batches-bin")
    os.makedirs(d)
    recs = np.concatenate([labels.astype(np.uint8)[:, None], data.transpose(0, 3, 1, 2).reshape(len(labels), -1)], 1)
    for i in range(1, 6):
        part = recs[(i - 1) * len(recs) // 5: i * len(recs) // 5]
        part.tofile(os.path.join(d, f"data_batch_{i}.bin"))
    recs[:100].tofile(os.path.join(d, "test_batch.bin"))
    with open(os.path.join(d, "batches.meta.txt"), "w") as f:
        f.write("\n".join(f"class{i}" for i in range(10)) + "\n")


def vggctl_loop(binary, root, dev, batch, n, bn, repeat, bf16=False):
    out = os.path.join(root, "run-bf16" if bf16 else "run")
    cmd = [binary, "train", "--arch", "vgg16", "--epochs", str(repeat + 1), "--batch-size", str(batch), "--data-dir", root,
           "--no-download", "--limit-train", str(n), "--limit-test", "100", "--out", out, "--force", "--quiet",
           "--device", "cuda" if dev.type == "cuda" else "cpu"] + (["--bn"] if bn else [])
    cmd += ["--precision", "bf16" if bf16 else "fp32"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return statistics.median(json.loads(line)["images_per_s"] for line in f.read().splitlines()[1:])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--images", type=int, default=None, help="training images per measurement")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--bn", action="store_true", help="VGG16-BN instead of the recipe's VGG16")
    p.add_argument("--repeat", type=int, default=3, help="measurements per configuration (median)")
    p.add_argument("--bf16", action="store_true", help="also PyTorch bf16 autocast + channels_last and vggctl --precision bf16")
    p.add_argument("--vggctl", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target", "release", "vggctl"))
    a = p.parse_args()
    dev = torch.device(a.device)
    n = a.images or (20480 if dev.type == "cuda" else 768)
    rng = np.random.RandomState(0)
    data = rng.randint(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = rng.randint(0, 10, n)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; VGG16{'-BN' if a.bn else ''} cifar head, batch {a.batch}, {n} images per measurement, median of {a.repeat}")

    def median(f):
        return statistics.median(f() for _ in range(a.repeat))

    rows = []
    rows.append(("PyTorch recipe loop (DataLoader, num_workers=0)", median(lambda: recipe_loop(data, labels, dev, a.batch, 0, a.bn))))
    if dev.type == "cuda":
        rows.append(("PyTorch recipe loop (DataLoader, num_workers=8)", median(lambda: recipe_loop(data, labels, dev, a.batch, 8, a.bn))))
    steps = max(4, n // a.batch // 2)
    rows.append(("PyTorch eager model-only, fp32, data on device", median(lambda: model_only(dev, a.batch, steps, a.bn))))
    if a.bf16:
        rows.append(("PyTorch eager model-only, bf16 + channels_last", median(lambda: model_only(dev, a.batch, steps, a.bn, True))))
    with tempfile.TemporaryDirectory() as root:
        write_bin_dataset(root, data, labels)
        ours = [("vggctl fp32", vggctl_loop(a.vggctl, root, dev, a.batch, n, a.bn, a.repeat))]
        if a.bf16:
            ours.append(("vggctl bf16", vggctl_loop(a.vggctl, root, dev, a.batch, n, a.bn, a.repeat, True)))
    print(f"{'configuration':<52} {'images/s':>10} " + " ".join(f"{name + ' is':>14}" for name, _ in ours))
    for label, v in rows:
        print(f"{label:<52} {v:>10.1f} " + " ".join(f"{o / v:>13.2f}x" for _, o in ours))
    for name, o in ours:
        print(f"{name + ' train, end to end (device pipeline + step)':<52} {o:>10.1f}")


if __name__ == "__main__":
    main()
