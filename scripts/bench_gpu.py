"""vggctl against PyTorch on one GPU, in one run, on the same synthetic
CIFAR-shaped data (uint8 images, 10 classes):

1. training, VGG16-BN with the CIFAR head, batch 512 and 128:
   vggctl train end to end (device-resident data, augmentation, step; its
   defaults: fp16, channels_last, the fused step, CUDA graphs; then bf16,
   eager steps without graphs, and --no-fused-step, the reference step;
   then each part of the fused step the defaults used, left out in turn
   with --no-fused-step=PART: what each part brings)
   against
   at batch 128 also the defaults in a world of one under NCCL (torchrun's
   variables for one rank: the gradients' all-reduce inside the CUDA
   graph; within 3 % of one process is the target), against
   PyTorch model-only steps on a batch already on the GPU: eager fp32,
   eager bf16 autocast + channels_last, torch.compile of the model (default
   mode and mode="reduce-overhead", both bf16 + channels_last;
   cudagraph_mark_step_begin per step);
2. the recipe's PyTorch loop (per-image transforms, DataLoader with
   num_workers 0 and 8, batch 128);
3. inference, ImageNet-head VGG16 at 224x224, batch 64: vggctl eval
   (32x32 images resized on the GPU; defaults, bf16, and the model run
   layer by layer without graphs) against PyTorch eager bf16 + channels_last;
4. peak GPU memory of each (torch.cuda.max_memory_allocated; vggctl's
   metrics.jsonl reads the same allocator statistic);
5. accuracy: with --digits DIR (tests/fixtures/digits-bin, made by
   scripts/test), vggctl trains VGG11-BN on the real digits in each precision
   (graphed, fp16 eager, and fp16 with --no-fused-step, the reference step)
   with --seeds seeds each; each mode's mean test accuracy must be within 1
   point of fp32's mean (one run is not enough: on an H200 fp32's own seeds
   spanned 2 points of the 297 test images).
6. where vggctl's replayed step's time goes, kernel by kernel (VGG16-BN,
   batch 512, one epoch with --profile: its ops.csv, 10 warm steps), for
   the fused step and the reference step (--no-fused-step).

Prints images/s, ratios and the time each part took. A configuration that
fails is reported and left out, the rest still runs (exit status 1 then). The model is built here
with the same layers as torchvision's (no torchvision needed on the GPU
machine). Not a test: timings vary with the machine."""
import argparse
import csv
import json
import os
import re
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
DEV = torch.device("cuda")
# --time-limit: the moment by which the report must be printed, and the
# seconds kept back for it; a configuration that would start with less
# than START_SECONDS left is left out.
DEADLINE = float("inf")
SECTIONS = ("train", "kernels", "loop", "recipe", "inference", "accuracy")
REPORT_SECONDS, START_SECONDS = 10, 45


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


def vggctl_train(binary, data_dir, out, batch, n, extra, epochs=3, arch=("vgg16", "--bn"), env=None):
    """images/s (median of the epochs after the first), peak bytes, what it ran as, last test top-1."""
    limit = ["--limit-train", str(n)] if n else []
    run([binary, "train", "--arch", arch[0], *arch[1:], "--epochs", str(epochs), "--batch-size", str(batch),
         "--data-dir", data_dir, "--no-download", *limit, "--out", out, "--force", "--quiet", "--device", DEV.type,
         *extra], env=env)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        m = [json.loads(line) for line in f.read().splitlines()]
    speed = statistics.median(e["images_per_s"] for e in m[1:]) if len(m) > 1 else m[0]["images_per_s"]
    return speed, max(e.get("peak_gpu_bytes") or 0 for e in m), m[-1].get("ran_as", "?"), m[-1]["test_top1"]


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


def vggctl_recipe(binary, data_dir, out, smoke):
    """`vggctl train --arch vgg16 --dataset cifar10` with the recipe's
    defaults (100 epochs, batch 128, evaluation every epoch); returns the
    epochs and the test top-1 of the last (the wall time is timed())."""
    small = ["--epochs", "1", "--limit-train", "256", "--limit-test", "64"] if smoke else []
    run([binary, "train", "--arch", "vgg16", "--dataset", "cifar10", "--data-dir", data_dir, "--no-download",
         "--out", out, "--force", "--quiet", "--device", DEV.type, *small], timeout=600)
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


def step_parts(ran_as):
    """The fused step's parts a run used, as its ran_as names them
    ("..., fused step (no-bias, bn-relu, cast-once), ...")."""
    m = re.search(r"fused step \(([^)]*)\)", ran_as or "")
    return m.group(1).split(", ") if m else []


def leave_out_parts(a, root, sec, batch, n, arch, ran_as, attempt, rows):
    """Each part of the fused step that the defaults' run used
    (`ran_as`), left out in turn (--no-fused-step=PART): what each part
    brings is the defaults' images/s over this run's. Returns [(part,
    images/s without it)]."""
    without = []
    # A smoke run on a CPU has no fused step: one part, to run the path.
    for part in step_parts(ran_as) or (["cast-once"] if a.smoke else []):
        out = os.path.join(root, f"run-{batch}-{arch[0]}-without-{part}")
        label = f"vggctl train end to end (--no-fused-step={part})"
        r = attempt(sec, label, vggctl_train, a.vggctl, root, out, batch, n, [f"--no-fused-step={part}"], 3, arch)
        keep_run(a.keep, out)
        if r:
            (speed, peak, ran, _), secs = r
            rows.append((sec, f"vggctl train end to end, without {part} ({ran})", speed, peak, f"{secs:.0f}s"))
            print(f"  {sec}: vggctl without {part}: {speed:,.0f} img/s", file=sys.stderr, flush=True)
            without.append((part, speed))
    return without


def print_parts(parts):
    """What each part of the fused step brings: the defaults' images/s over
    those of the run without it (above 1: the part makes the step faster)."""
    if not parts:
        return
    print("\nthe fused step's parts, each left out in turn (defaults' images/s / without the part; "
          "above 1.00x the part pays):")
    for what, default, without in parts:
        for part, speed in without:
            print(f"  {what:<40} {part:<10} {default / speed:6.3f}x  ({default:,.0f} vs {speed:,.0f} img/s)")


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


def print_ops(batch, rows, step, top=25):
    total = sum(r[1] for r in rows)
    print(f"\nkernels of vggctl's replayed {step}, VGG16-BN, batch {batch} (--profile's ops.csv; "
          f"{total:.2f} ms a step in {sum(r[0] for r in rows):.0f} kernels):")
    for calls, ms, share, name in rows[:top]:
        print(f"  {ms:8.3f} ms {100 * share:5.1f}% {calls:5.0f}x  {name[:110]}")
    if len(rows) > top:
        rest = rows[top:]
        print(f"  {sum(r[1] for r in rest):8.3f} ms {100 * sum(r[2] for r in rest):5.1f}%        "
              f"the other {len(rest)} kernels")


def vggctl_eval(binary, data_dir, weights, batch, n, extra=()):
    """images/s, peak bytes, what it ran as."""
    r = run([binary, "eval", "--checkpoint", weights, "--arch", "vgg16", "--head", "imagenet", "--classes", "10",
             "--data-dir", data_dir, "--no-download", "--input", "224", "--batch-size", str(batch),
             "--limit-test", str(n), "--device", DEV.type, "--json", *extra])
    report = json.loads(r.stdout)
    return report["images_per_s"], report.get("peak_gpu_bytes", 0), report.get("ran_as", "?")


# ---------------------------------------------------------------- report

def keep_run(keep, out):
    """Copies a training run's small files (not its checkpoints) to keep/<run>/."""
    if not keep or not os.path.isdir(out):
        return
    dest = os.path.join(keep, os.path.basename(out))
    os.makedirs(dest, exist_ok=True)
    for name in ("config.json", "metrics.jsonl", "ops.csv"):
        if os.path.exists(os.path.join(out, name)):
            shutil.copy(os.path.join(out, name), dest)


def mib(b):
    return f"{b / 2**20:,.0f} MiB" if b else "-"


def recipe_sections(a, root, data, labels, attempt, add, rows, recipe, parts):
    """--recipe: VGG16 without BatchNorm at batch 128 (vggctl's defaults,
    each part of their fused step left out in turn, and the reference step,
    against PyTorch's model-only steps and the recipe's loop), then the
    recipe end to end on 50,000 training and 10,000 test images."""
    batch = 16 if a.smoke else 128
    sec = f"train, batch {batch}, VGG16 without BN (the recipe's model)"
    modes = [("PyTorch eager bf16 + channels_last (model only)", "bf16")]
    if not a.skip_compile:
        modes.append(("torch.compile reduce-overhead, bf16 + channels_last", "compile-reduce-overhead"))
    for label, mode in modes:
        r = attempt(sec, label, pytorch_train, batch, 1 if a.smoke else 100, mode, False)
        if r:
            add(sec, label, r)
    for extra in ([], ["--no-fused-step"]):
        out = os.path.join(root, "run-recipe-model" + "".join(extra))
        r = attempt(sec, f"vggctl train end to end ({' '.join(extra) or 'defaults'})", vggctl_train, a.vggctl,
                    root, out, batch, 128 if a.smoke else len(labels), extra, 3, ("vgg16",))
        keep_run(a.keep, out)
        if r:
            (speed, peak, ran_as, _), secs = r
            rows.append((sec, f"vggctl train end to end ({ran_as})", speed, peak, f"{secs:.0f}s"))
            recipe["fused" if not extra else "unfused"] = speed
            if not extra:
                without = leave_out_parts(a, root, sec, batch, 128 if a.smoke else len(labels), ("vgg16",), ran_as,
                                          attempt, rows)
                parts.append((f"VGG16 without BN, batch {batch}", speed, without))
    label = "PyTorch recipe loop, DataLoader num_workers=0"
    r = attempt(sec, label, recipe_loop, data, labels, 0, 1 if a.smoke else 20, False)
    if r:
        add(sec, label, r)
        recipe["loop"] = r[0][0]
    sec = "the recipe end to end"
    n_train = 256 if a.smoke else 50000
    here = os.path.join(root, "recipe-data")
    os.makedirs(here)
    reps = -(-(n_train + 10000) // len(labels))
    write_cifar_bin(here, np.tile(data, (reps, 1, 1, 1))[:n_train + 10000],
                    np.tile(labels, reps)[:n_train + 10000], test=10000)
    out = os.path.join(root, "run-recipe")
    r = attempt(sec, "vggctl train --arch vgg16 --dataset cifar10 (defaults)", vggctl_recipe, a.vggctl, here, out,
                a.smoke)
    keep_run(a.keep, out)
    if r:
        (epochs, top1, ran_as), secs = r
        recipe.update(epochs=epochs, secs=secs, ran_as=ran_as, train=n_train)
        rows.append((sec, f"vggctl, {epochs} epochs, wall time ({ran_as})", 0.0, 0, f"{secs:.0f}s"))


def print_recipe(recipe):
    """The recipe's wall time next to the PyTorch loop's, extrapolated
    from its images/s (its training only: its evaluations not counted)."""
    if recipe.get("fused") and recipe.get("unfused"):
        print(f"\nVGG16 without BN, the recipe's batch: the fused step (conv+bias+ReLU in one kernel) "
              f"{recipe['fused'] / recipe['unfused']:.2f}x --no-fused-step")
    if "secs" not in recipe:
        return
    print(f"\nthe recipe end to end ({recipe['ran_as']}): {recipe['epochs']} epochs of {recipe['train']:,} images "
          f"and their evaluations in {recipe['secs']:.0f} s (target: under 60 s on an H100/H200)")
    if recipe.get("loop"):
        loop = recipe["epochs"] * recipe["train"] / recipe["loop"]
        print(f"  the seed's PyTorch loop (num_workers=0, {recipe['loop']:,.0f} img/s), its training alone: "
              f"{loop:,.0f} s ({loop / recipe['secs']:.1f}x vggctl's whole run)")


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser()
    p.add_argument("--vggctl", default=os.path.join(here, "..", "target", "release", "vggctl"))
    p.add_argument("--digits", default=os.path.join(here, "..", "tests", "fixtures", "digits-bin"),
                   help="the real-digits dataset for the accuracy check (skipped when absent)")
    p.add_argument("--skip-compile", action="store_true", help="leave out torch.compile (its builds take minutes)")
    p.add_argument("--quick", action="store_true", help="fewer images and steps")
    p.add_argument("--budget", type=float, default=240,
                   help="seconds after which torch.compile variants are left out (they take minutes to build)")
    p.add_argument("--keep", metavar="DIR",
                   help="copy each vggctl training run's config.json, metrics.jsonl and ops.csv here (per-epoch figures, profile)")
    p.add_argument("--seeds", type=int, default=3, help="training runs per precision in the accuracy check")
    p.add_argument("--profile", action="store_true",
                   help="vggctl training runs with --profile (step time split in the kept metrics.jsonl, "
                        "kernels of 10 replayed steps in ops.csv; "
                        "its synchronisations cost speed)")
    p.add_argument("--recipe", action="store_true",
                   help="also VGG16 without BN at batch 128 (the recipe's model) and the recipe end to end: "
                        "100 epochs of vggctl train's defaults on 50,000/10,000 synthetic images "
                        "(about 2 more minutes)")
    p.add_argument("--only", type=lambda v: v.split(","), metavar="SECTION,...",
                   help=f"run only these sections of {', '.join(SECTIONS)} (e.g. a second, shorter GPU call: "
                        "--only recipe,accuracy)")
    p.add_argument("--time-limit", type=float, metavar="SECS",
                   help="print the report within SECS seconds: configurations that would run past it are "
                        "left out or stopped (gpu-check passes what is left of its budget)")
    p.add_argument("--smoke", action="store_true",
                   help="a tiny run on the CPU that checks this script's plumbing (its figures mean nothing)")
    a = p.parse_args()
    if a.only and set(a.only) - set(SECTIONS):
        p.error(f"--only: unknown section(s) {', '.join(sorted(set(a.only) - set(SECTIONS)))}")
    global DEV, DEADLINE
    if a.time_limit:
        DEADLINE = time.perf_counter() + a.time_limit
    if a.smoke:
        DEV = torch.device("cpu")
        a.skip_compile = True
    elif not torch.cuda.is_available():
        sys.exit("bench-gpu: no CUDA device (--smoke checks the script on the CPU)")
    began = time.perf_counter()
    n = 640 if a.smoke else 20480 if a.quick else 51200
    steps = {512: 20 if a.quick else 50, 128: 40 if a.quick else 100}
    if a.smoke:
        steps = {64: 1, 16: 1}
    rng = np.random.RandomState(0)
    data = rng.randint(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = rng.randint(0, 10, n)
    info = run([a.vggctl, "info"]).stdout.strip().replace("\n", "; ")
    name = torch.cuda.get_device_name(0) if DEV.type == "cuda" else "CPU (smoke run)"
    print(f"device: {name}; PyTorch {torch.__version__}; {info}")
    print(f"synthetic CIFAR-shaped data, {n} images; VGG16-BN cifar head for training\n")
    rows = []  # (section, label, images/s, peak bytes, note)

    def add(section, label, value, note=""):
        (speed, peak), secs = value
        rows.append((section, label, speed, peak, note or f"{secs:.0f}s"))
        print(f"  {section}: {label}: {speed:,.0f} img/s ({rows[-1][4]})", file=sys.stderr, flush=True)

    failures = []
    ops_tables = []  # (batch, kernel rows)
    plain = {}  # batch -> images/s of vggctl's defaults
    world_one = {}  # batch -> (backend, images/s) of a world of one
    unfused = {}  # batch -> images/s of --no-fused-step (today's step, the reference)
    parts = []  # (model and batch, the defaults' images/s, [(part, images/s without it)])
    recipe = {}  # what the recipe's end-to-end run measured

    def attempt(section, label, f, *args):
        """f(*args) timed; a failure is reported and recorded, and the run goes
        on: one GPU slot must give every figure it can. Near --time-limit
        the configuration is left out, so that the report still prints."""
        if seconds_left() < START_SECONDS:
            print(f"  {section}: {label}: left out: --time-limit near", file=sys.stderr, flush=True)
            failures.append((section, label, "left out: --time-limit near"))
            rows.append((section, label, 0.0, 0, "left out"))
            return None
        try:
            return timed(f, *args)
        except Exception as e:  # noqa: BLE001 -- any failure of one configuration
            print(f"  {section}: {label}: FAILED: {e}", file=sys.stderr, flush=True)
            failures.append((section, label, str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)))
            rows.append((section, label, 0.0, 0, "FAILED"))
            return None

    def want(section):
        """Whether this run has `section` (--only, else all but the recipe
        unless --recipe)."""
        return section in a.only if a.only else section != "recipe" or a.recipe

    with tempfile.TemporaryDirectory() as root:
        write_cifar_bin(root, data, labels, test=64 if a.smoke else 3200)
        for batch in (512, 128) if want("train") else ():
            sec = f"train, batch {batch}"
            if a.smoke:
                batch = batch // 8
            for label, mode in (("PyTorch eager fp32 (model only)", "fp32"),
                                ("PyTorch eager bf16 + channels_last (model only)", "bf16")):
                r = attempt(sec, label, pytorch_train, batch, steps[batch], mode)
                if r:
                    add(sec, label, r)
            if not a.skip_compile and time.perf_counter() - began > a.budget:
                print(f"  {sec}: torch.compile left out: {a.budget:.0f}s budget spent", file=sys.stderr)
            elif not a.skip_compile:
                for label, mode in (("torch.compile, bf16 + channels_last (model only)", "compile"),
                                    ("torch.compile reduce-overhead, bf16 + channels_last", "compile-reduce-overhead")):
                    r = attempt(sec, label, pytorch_train, batch, steps[batch], mode)
                    if r:
                        add(sec, label, r)
            # The defaults (fp16, channels_last, CUDA graphs), bf16, and eager
            # steps: the figures behind the defaults.
            for extra in ([], ["--precision", "bf16"], ["--no-cuda-graphs"], ["--no-fused-step"]):
                out = os.path.join(root, f"run-{batch}-{'-'.join(x.strip('-') for x in extra) or 'default'}")
                label = f"vggctl train end to end ({' '.join(extra) or 'defaults'})"
                r = attempt(sec, label, vggctl_train, a.vggctl, root, out, batch, 128 if a.smoke else n,
                            extra + ["--profile"] * a.profile)
                keep_run(a.keep, out)
                if r:
                    (speed, peak, ran_as, _), secs = r
                    rows.append((sec, f"vggctl train end to end ({ran_as})", speed, peak, f"{secs:.0f}s"))
                    print(f"  {sec}: vggctl {ran_as}: {speed:,.0f} img/s", file=sys.stderr, flush=True)
                    if not extra:
                        plain[batch], plain_as = speed, ran_as
                    elif extra == ["--no-fused-step"]:
                        unfused[batch] = speed
            if batch in plain:
                without = leave_out_parts(a, root, sec, batch, 128 if a.smoke else n, ("vgg16", "--bn"), plain_as,
                                          attempt, rows)
                parts.append((f"VGG16-BN, batch {batch}", plain[batch], without))
            if batch == (16 if a.smoke else 128):
                # A world of one under NCCL (Gloo in a smoke run): the same
                # step with its all-reduce inside the CUDA graph.
                backend = "gloo" if a.smoke else "nccl"
                out = os.path.join(root, f"run-{batch}-{backend}")
                r = attempt(sec, f"{backend} world of one", lambda: vggctl_train(
                    a.vggctl, root, out, batch, 128 if a.smoke else n, ["--dist-backend", backend],
                    env=world_of_one()))
                keep_run(a.keep, out)
                if r:
                    (speed, peak, ran_as, _), secs = r
                    rows.append((sec, f"{backend} world of one: vggctl ({ran_as})", speed, peak, f"{secs:.0f}s"))
                    print(f"  {sec}: {backend} world of one: {speed:,.0f} img/s", file=sys.stderr, flush=True)
                    world_one[batch] = (backend, speed)

        # Where the replayed step's time goes, kernel by kernel.
        # The fused step's and the reference step's, side by side: what each
        # lever of the fused step removed or replaced.
        for batch in ((64,) if a.smoke else (512,)) if want("kernels") else ():
            for step, extra in (("fused step", []), ("reference step (--no-fused-step)", ["--no-fused-step"])):
                out = os.path.join(root, f"run-{batch}-ops" + "-reference" * bool(extra))
                r = attempt(f"train, batch {batch}", f"vggctl --profile kernels, {step}", vggctl_ops,
                            a.vggctl, root, out, batch, extra)
                keep_run(a.keep, out)
                if r:
                    ops_tables.append((batch, step, r[0]))

        sec = "recipe loop, batch 128"
        for workers in (0, 8) if want("loop") else ():
            label = f"PyTorch recipe loop, DataLoader num_workers={workers}"
            r = attempt(sec, label, recipe_loop, data, labels, workers, 1 if a.smoke else 20 if workers == 0 else 60)
            if r:
                add(sec, label, r)

        if want("recipe"):
            recipe_sections(a, root, data, labels, attempt, add, rows, recipe, parts)

        sec = "inference 224x224, batch 64"
        ib = 4 if a.smoke else 64
        label = "PyTorch eager bf16 + channels_last (model only)"
        r = attempt(sec, label, pytorch_infer, ib, 1 if a.smoke else 30 if a.quick else 60) if want("inference") else None
        if r:
            add(sec, label, r)
        weights = os.path.join(root, "vgg16-10.safetensors")
        write_safetensors(weights, vgg16(False, "imagenet", 10).state_dict())
        for extra in ([], ["--precision", "bf16"], ["--layerwise", "--no-cuda-graphs"]) if want("inference") else ():
            label = f"vggctl eval ({' '.join(extra) or 'defaults'})"
            r = attempt(sec, label, vggctl_eval, a.vggctl, root, weights, ib, 3 * ib if a.smoke else 3200, extra)
            if r:
                (speed, peak, ran_as), secs = r
                add(sec, f"vggctl eval ({ran_as})", ((speed, peak), secs))

        accuracy = []  # (what it ran as, [test top-1 per seed])
        seeds = [7, 1, 2, 3, 4][:max(1, min(a.seeds, 2) if a.smoke else a.seeds)]
        if want("accuracy") and os.path.isdir(a.digits):
            digits = os.path.dirname(a.digits) if a.digits.endswith("cifar-10-batches-bin") else a.digits
            for extra in (["--precision", "fp32"], ["--precision", "tf32"], ["--precision", "fp16"],
                          ["--precision", "bf16"], ["--precision", "fp16", "--no-cuda-graphs"],
                          ["--precision", "fp16", "--no-fused-step"]):
                top1s, ran = [], "?"
                for seed in seeds:
                    out = os.path.join(root, "digits-" + "-".join(x.strip("-") for x in extra) + f"-seed{seed}")
                    r = attempt("accuracy", f"{' '.join(extra)} seed {seed}", vggctl_train, a.vggctl, digits, out,
                                32, 320 if a.smoke else None, extra + ["--seed", str(seed), "--scheduler", "cosine"],
                                1 if a.smoke else 5, ("vgg11", "--bn"))
                    keep_run(a.keep, out)
                    if r:
                        (_, _, ran, top1), _ = r
                        top1s.append(top1)
                if top1s:
                    accuracy.append((ran, top1s))

    # Training rows: the model's arithmetic per second (VGG16, 32x32) and
    # its share of the GPU's dense fp16 peak.
    flops, top = train_flops_per_image(), dense_fp16_peak()
    print(f"{'configuration':<72} {'images/s':>10} {'peak memory':>12}  {'took':>5}  {'TFLOP/s':>8} {'of peak':>8}")
    for section in dict.fromkeys(r[0] for r in rows):
        print(f"-- {section}")
        for s, label, speed, peak, note in rows:
            if s == section:
                arith = ""
                if s.startswith("train") and speed > 0:
                    tf = speed * flops / 1e12
                    arith = f"  {tf:>8.1f} {f'{tf * 1e12 / top:.1%}' if top else 'n/a':>8}"
                rate = f"{speed:>10,.0f}" if speed else f"{'-':>10}"
                print(f"{label:<72} {rate} {mib(peak):>12}  {note:>5}{arith}")
    print(f"(TFLOP/s: {flops / 1e9:.2f} GFLOP per training image, VGG16 at 32x32, forward and backward; "
          f"peak: {'989 TFLOP/s dense fp16' if top else 'unknown for this GPU'})")
    print_recipe(recipe)

    def best(section, prefix):
        vals = [r[2] for r in rows if r[0] == section and r[1].startswith(prefix) and r[2] > 0]
        return max(vals) if vals else None

    print("\nratios (vggctl's best configuration / the reference; target in brackets):")
    targets = []
    for batch in (512, 128):
        sec = f"train, batch {batch}"
        ours = best(sec, "vggctl")
        targets.append((f"batch {batch} vs PyTorch eager bf16 + channels_last", ours, best(sec, "PyTorch eager bf16"),
                        1.25 if batch == 512 else 3.0))
        if best(sec, "torch.compile") is not None:
            targets.append((f"batch {batch} vs torch.compile's best", ours, best(sec, "torch.compile"), 1.1))
        if batch == 128:
            targets.append(("batch 128 vs PyTorch's best model-only", ours,
                            max((r[2] for r in rows if r[0] == sec and r[1].startswith(("PyTorch", "torch"))),
                                default=None), 1.1))
            targets.append(("batch 128 vs the recipe loop, num_workers=0", ours,
                            best("recipe loop, batch 128", "PyTorch recipe loop, DataLoader num_workers=0"), 24.0))
    for batch, speed in unfused.items():
        targets.append((f"batch {batch}, fused step vs --no-fused-step", plain.get(batch), speed, 1.0))
    for batch, (backend, speed) in world_one.items():
        targets.append((f"batch {batch}, {backend} world of one vs one process", speed, plain.get(batch), 0.97))
    sec = "inference 224x224, batch 64"
    targets.append(("inference vs PyTorch eager bf16 + channels_last", best(sec, "vggctl"), best(sec, "PyTorch"), 1.1))
    for label, ours, ref, target in targets:
        if not ours or not ref:
            print(f"  {label:<52}    n/a  [>= {target}x: a figure is missing]")
            continue
        ratio = ours / ref
        print(f"  {label:<52} {ratio:6.2f}x  [>= {target}x: {'met' if ratio >= target else 'NOT met'}]")

    print_parts(parts)
    for batch, step, ops in ops_tables:
        print_ops(batch, ops, step)

    if accuracy:
        print(f"\naccuracy, VGG11-BN on the real digits, 5 epochs, seeds {seeds} "
              "(test top-1; the mean must be within 1 point of fp32's):")
        ref = statistics.mean(accuracy[0][1])
        for ran_as, top1s in accuracy:
            top1 = statistics.mean(top1s)
            runs = " ".join(f"{t:6.2f}" for t in top1s)
            ok = abs(top1 - ref) <= 1.0
            print(f"  {ran_as:<50} {top1:6.2f}%  {top1 - ref:+5.2f}  {'ok' if ok else 'NOT ok'}   (runs: {runs})")
    else:
        print(f"\naccuracy check skipped: no {a.digits}")
    if failures:
        print("\nFAILED or left-out configurations (the rest of the run went on):")
        for section, label, why in failures:
            print(f"  {section}: {label}: {why}")
    print(f"\nbench-gpu took {time.perf_counter() - began:.0f}s")
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
