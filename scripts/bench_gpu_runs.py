"""What bench-gpu (scripts/bench_gpu.py) times, on synthetic CIFAR-shaped
data: PyTorch's own steps (model-only training, the recipe's DataLoader
loop, inference) and vggctl's runs (train, the recipe end to end, eval,
the kernels of a profiled epoch), each returning its images/s and peak GPU
memory; the data files they read; the model's arithmetic. The model is
built here with the same layers as torchvision's (no torchvision needed on
the GPU machine)."""
import csv
import json
import os
import re
import shutil
import socket
import statistics
import struct
import subprocess
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
# Set by bench_gpu.main: the device (the CPU in a smoke run), with
# --time-limit the moment by which the report must be printed (a vggctl run
# is stopped REPORT_SECONDS before it), and --leave-out's fused-step parts
# (left out of every vggctl training run).
DEV = torch.device("cuda")
DEADLINE = float("inf")
LEAVE_OUT = []
REPORT_SECONDS = 10


# ---------------------------------------------------------------- device

def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def reset_peak():
    if DEV.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak():
    return torch.cuda.max_memory_allocated() if DEV.type == "cuda" else 0


class VGG(nn.Module):
    """torchvision's VGG layout and state-dict names (features, avgpool,
    classifier), with the CIFAR head as an option."""

    def __init__(self, bn, head, classes):
        super().__init__()
        layers, c = [], 3
        for v in VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            layers.append(nn.Conv2d(c, v, 3, padding=1))
            if bn:
                layers.append(nn.BatchNorm2d(v))
            layers.append(nn.ReLU(inplace=True))
            c = v
        self.features = nn.Sequential(*layers)
        if head == "cifar":
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Sequential(nn.Linear(512, 512), nn.ReLU(True), nn.Dropout(0.5), nn.Linear(512, classes))
        else:
            self.avgpool = nn.AdaptiveAvgPool2d(7)
            self.classifier = nn.Sequential(nn.Linear(25088, 4096), nn.ReLU(True), nn.Dropout(0.5),
                                            nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(0.5), nn.Linear(4096, classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def vgg16(bn, head, classes):
    return VGG(bn, head, classes)


def timed(f, *args):
    t = time.perf_counter()
    out = f(*args)
    return out, time.perf_counter() - t

# ---------------------------------------------------------------- PyTorch

def pytorch_train(batch, steps, mode, bn=True):
    """Model-only SGD steps; returns (images/s, peak bytes)."""
    torch.manual_seed(0)
    model = vgg16(bn, "cifar", 10).to(DEV).train()
    half = mode != "fp32"
    x = torch.randn(batch, 3, 32, 32, device=DEV)
    if half:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=DEV)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    fwd = model
    if mode == "compile":
        fwd = torch.compile(model)
    elif mode == "compile-reduce-overhead":
        fwd = torch.compile(model, mode="reduce-overhead")

    def step():
        if mode == "compile-reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=half):
            loss = F.cross_entropy(fwd(x), y)
        loss.backward()
        opt.step()

    for _ in range(5):
        step()
    sync()
    reset_peak()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return batch * steps / (time.perf_counter() - t), peak()


def pytorch_infer(batch, steps):
    model = vgg16(False, "imagenet", 1000).to(DEV).eval().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 224, 224, device=DEV).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(3):
            model(x)
        sync()
        reset_peak()
        t = time.perf_counter()
        for _ in range(steps):
            model(x)
        sync()
    return batch * steps / (time.perf_counter() - t), peak()


class RecipeDataset(torch.utils.data.Dataset):
    """What torchvision's CIFAR10 + RandomCrop(32, 4) + RandomHorizontalFlip
    + ToTensor + Normalize do per image (torchvision's transforms when
    installed, the same arithmetic in numpy otherwise)."""

    def __init__(self, data, labels):
        self.data, self.labels = data, labels
        try:
            import torchvision.transforms as T
            from PIL import Image

            t = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])
            self.transform = lambda a: t(Image.fromarray(a))
        except ImportError:
            mean, std = np.array(MEAN, np.float32), np.array(STD, np.float32)

            def numpy_transform(a):
                p = np.pad(a, ((4, 4), (4, 4), (0, 0)))
                i, j = np.random.randint(0, 9, 2)
                a = p[i:i + 32, j:j + 32]
                if np.random.rand() < 0.5:
                    a = a[:, ::-1]
                return torch.from_numpy(((a / np.float32(255) - mean) / std).transpose(2, 0, 1).copy())

            self.transform = numpy_transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(self.data[i]), int(self.labels[i])


def recipe_loop(data, labels, workers, batches, bn=True):
    loader = torch.utils.data.DataLoader(RecipeDataset(data, labels), batch_size=128, shuffle=True,
                                         num_workers=workers, drop_last=True)
    model = vgg16(bn, "cifar", 10).to(DEV).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    seen, t0 = 0, None
    reset_peak()
    for i, (x, y) in enumerate(loader):
        if i == 2:  # warm: cuDNN, workers
            sync()
            t0, seen = time.perf_counter(), 0
        if i == batches + 2:
            break
        x, y = x.to(DEV), y.to(DEV)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        seen += len(y)
    sync()
    return seen / (time.perf_counter() - t0), peak()

# ---------------------------------------------------------------- vggctl

def write_cifar_bin(root, data, labels, test):
    d = os.path.join(root, "cifar-10-batches-bin")
    os.makedirs(d)
    recs = np.concatenate([labels.astype(np.uint8)[:, None], data.transpose(0, 3, 1, 2).reshape(len(labels), -1)], 1)
    for i in range(1, 6):
        recs[(i - 1) * len(recs) // 5: i * len(recs) // 5].tofile(os.path.join(d, f"data_batch_{i}.bin"))
    recs[:test].tofile(os.path.join(d, "test_batch.bin"))
    with open(os.path.join(d, "batches.meta.txt"), "w") as f:
        f.write("\n".join(f"class{i}" for i in range(10)) + "\n")


def write_safetensors(path, tensors):
    """The format, written directly (no safetensors package needed)."""
    names = {torch.float32: "F32", torch.int64: "I64"}
    header, blobs, offset = {}, [], 0
    for k, t in tensors.items():
        b = t.detach().cpu().contiguous().numpy().tobytes()
        header[k] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for b in blobs:
            f.write(b)


def seconds_left():
    """Seconds to --time-limit (infinite without one)."""
    return DEADLINE - time.perf_counter()


def run(cmd, timeout=180, env=None):
    """Runs vggctl; a run past `timeout` seconds (a hang), or one that
    would end too near --time-limit to print the report, fails that
    configuration only."""
    timeout = max(1.0, min(timeout, seconds_left() - REPORT_SECONDS))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}\n{r.stderr.strip()}")
    return r


def with_left_out(extra):
    """`extra` with --leave-out's parts left out of the fused step as well
    (merged into its --no-fused-step=PART; a bare --no-fused-step, the
    reference step, already leaves every part out)."""
    if not LEAVE_OUT or "--no-fused-step" in extra:
        return list(extra)
    parts = ",".join(LEAVE_OUT)
    merged = [f"{a},{parts}" if a.startswith("--no-fused-step=") else a for a in extra]
    return merged if merged != list(extra) else [*extra, f"--no-fused-step={parts}"]


def vggctl_train(binary, data_dir, out, batch, n, extra, epochs=3, arch=("vgg16", "--bn"), env=None):
    """images/s (median of the epochs after the first), peak bytes, what it ran as, last test top-1."""
    limit = ["--limit-train", str(n)] if n else []
    run([binary, "train", "--arch", arch[0], *arch[1:], "--epochs", str(epochs), "--batch-size", str(batch),
         "--data-dir", data_dir, "--no-download", *limit, "--out", out, "--force", "--quiet", "--device", DEV.type,
         *with_left_out(extra)], env=env)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        m = [json.loads(line) for line in f.read().splitlines()]
    speed = statistics.median(e["images_per_s"] for e in m[1:]) if len(m) > 1 else m[0]["images_per_s"]
    return speed, max(e.get("peak_gpu_bytes") or 0 for e in m), m[-1].get("ran_as", "?"), m[-1]["test_top1"]


def vggctl_recipe(binary, data_dir, out, smoke):
    """`vggctl train --arch vgg16 --dataset cifar10` with the recipe's
    defaults (100 epochs, batch 128, evaluation every epoch); returns the
    epochs and the test top-1 of the last (the wall time is timed())."""
    small = ["--epochs", "1", "--limit-train", "256", "--limit-test", "64"] if smoke else []
    run([binary, "train", "--arch", "vgg16", "--dataset", "cifar10", "--data-dir", data_dir, "--no-download",
         "--out", out, "--force", "--quiet", "--device", DEV.type, *small, *with_left_out([])], timeout=600)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        m = [json.loads(line) for line in f.read().splitlines()]
    return len(m), m[-1]["test_top1"], m[-1].get("ran_as", "?")


def world_of_one():
    """The environment torchrun gives the one rank of `--nproc-per-node 1`
    (a free port on 127.0.0.1; rank 0 serves the store)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port))


def vggctl_ops(binary, data_dir, out, batch, extra=()):
    """The kernels of the replayed step (the fused one, or with
    --no-fused-step the reference step issue #18 starts from): one epoch
    of 16 full batches with --profile, whose ops.csv holds 10 warm steps;
    returns its GPU rows (or, on the CPU, its operators) as (calls a step,
    ms a step, share, name)."""
    vggctl_train(binary, data_dir, out, batch, 16 * batch, ["--profile", *extra], epochs=1)
    with open(os.path.join(out, "ops.csv")) as f:
        rows = list(csv.DictReader(f))
    device = "cuda" if any(r["device"] == "cuda" for r in rows) else "cpu"
    return [(float(r["calls_per_step"]), float(r["ms_per_step"]), float(r["share"]), r["name"])
            for r in rows if r["device"] == device]


def vggctl_eval(binary, data_dir, weights, batch, n, extra=()):
    """images/s, peak bytes, what it ran as."""
    # --dataset: a state dict with the ImageNet head would default to ImageNet's layout.
    r = run([binary, "eval", "--checkpoint", weights, "--arch", "vgg16", "--head", "imagenet", "--classes", "10",
             "--dataset", "cifar10", "--data-dir", data_dir, "--no-download", "--input", "224", "--batch-size", str(batch),
             "--limit-test", str(n), "--device", DEV.type, "--json", *extra])
    report = json.loads(r.stdout)
    return report["images_per_s"], report.get("peak_gpu_bytes", 0), report.get("ran_as", "?")


def train_flops_per_image(size=32, head_in=512, head=(512, 10)):
    """FLOPs of one training image through VGG16 (CIFAR head) at size x
    size: 2 per multiply-add forward, and backward twice the forward (input
    and weight gradients); BatchNorm, pooling and the update are left out
    (bandwidth, not arithmetic). 1.88 GFLOP at 32x32."""
    macs, c, hw = 0, 3, size * size
    for v in VGG16:
        if v == "M":
            hw //= 4
            continue
        macs += hw * c * v * 9
        c = v
    prev = head_in
    for n in head:
        macs += prev * n
        prev = n
    return 3 * 2 * macs


def dense_fp16_peak():
    """The GPU's dense fp16/bf16 tensor-core peak in FLOP/s, where known
    (H100/H200 SXM: 989 TFLOP/s), else None."""
    name = torch.cuda.get_device_name(0) if DEV.type == "cuda" else ""
    return 989e12 if ("H100" in name or "H200" in name) else None


def step_parts(ran_as):
    """The fused step's parts a run used, as its ran_as names them
    ("..., fused step (no-bias, bn-relu, cast-once), ...")."""
    m = re.search(r"fused step \(([^)]*)\)", ran_as or "")
    return m.group(1).split(", ") if m else []


def keep_run(keep, out):
    """Copies a training run's small files (not its checkpoints) to keep/<run>/."""
    if not keep or not os.path.isdir(out):
        return
    dest = os.path.join(keep, os.path.basename(out))
    os.makedirs(dest, exist_ok=True)
    for name in ("config.json", "metrics.jsonl", "ops.csv"):
        if os.path.exists(os.path.join(out, name)):
            shutil.copy(os.path.join(out, name), dest)
