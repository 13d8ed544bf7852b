"""The image pipeline alone, vggctl against torchvision, in one run on this
machine's cores: images/s from JPEG files to ready uint8 224x224 batches.

Data: a generated folder of JPEGs with ImageNet-like sizes and quality
(random crops of scikit-image's real photographs at about 500x375, quality
90, 10 class folders; made once and kept in --dir).

  (a) torchvision: ImageFolder (PIL decode) + DataLoader(num_workers=cores,
      batch 256, shuffle), transform RandomResizedCrop(224) +
      RandomHorizontalFlip + PILToTensor (training) or Resize(256) +
      CenterCrop(224) + PILToTensor (evaluation);
  (b) vggctl streaming the folder (`--cache-mem` too small: worker threads
      decode, crop and resize each batch; tests/bench_data.rs);
  (c) vggctl streaming a prepared file of the same folder (`vggctl prepare`,
      timed separately): with --max-side 512 every image keeps its own bytes
      (the same pixels as the folder); with --max-side 256 they are stored
      resized to a shorter side of 256, as FFCV stores them (fewer pixels to
      decode; crops of the smaller image), and with --raw as decoded pixels
      (nothing to decode; about ten times the size).

Then `--auto-augment` alone (no files): each policy on batches of 128
random uint8 32x32 images, vggctl's batched ops (one CPU thread; on CUDA
too where there is a GPU) against torchvision's transform applied to each
image in turn on one thread (what one DataLoader worker does; N workers
would run N such loops side by side). --augment-only runs just this.

Peak RSS: vggctl's process; torchvision's main process plus its workers
(sampled). Streaming is measured at two folder sizes, so that its memory
can be seen not to grow with the folder.

Usage: scripts/bench-data [--images 5000] [--dir DIR] [--workers N]
Prints images/s, the ratios and peak RSS. Not a test: figures vary.

On a GPU machine (scripts/gpu-check; no Rust, maybe no torchvision):
--bench-bin and --vggctl name the kit's binaries, --epochs reads its small
folder several times, and without torchvision only vggctl's rows print.
--make-only makes the folder and stops (scripts/gpu-kit)."""
import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
          "immunohistochemistry", "retina", "colorwheel"]
SHAPES = [(500, 375), (375, 500), (500, 333), (450, 450), (640, 480), (400, 300)]


def make_folder(root, n):
    """n JPEGs (quality 90) in 10 class folders: random windows of the
    photographs resized to ImageNet-like shapes (seeded)."""
    stamp = os.path.join(root, f".complete-{n}")
    if os.path.exists(stamp):
        return
    from PIL import Image
    from skimage import data as skdata

    rng = random.Random(0)
    photos = [Image.fromarray(getattr(skdata, p)()).convert("RGB") for p in PHOTOS]
    for i in range(n):
        img = rng.choice(photos)
        w, h = img.size
        cw, ch = rng.randint(w // 2, w), rng.randint(h // 2, h)
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        size = rng.choice(SHAPES)
        d = os.path.join(root, f"class{i % 10}")
        os.makedirs(d, exist_ok=True)
        img.crop((x, y, x + cw, y + ch)).resize(size, Image.BILINEAR).save(
            os.path.join(d, f"{i:06d}.jpg"), quality=90)
    open(stamp, "w").close()


class TreeRss:
    """Peak of the summed RSS of this process and its children, sampled."""

    def __init__(self):
        self.peak, self.stop = 0, False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    @staticmethod
    def rss(pid):
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def run(self):
        me = os.getpid()
        while not self.stop:
            kids = []
            try:
                with open(f"/proc/{me}/task/{me}/children") as f:
                    kids = [int(p) for p in f.read().split()]
            except OSError:
                pass
            self.peak = max(self.peak, self.rss(me) + sum(self.rss(k) for k in kids))
            time.sleep(0.05)

    def done(self):
        self.stop = True
        self.thread.join()
        return self.peak / 2**20


def torchvision_run(folder, train, workers, epochs, batch=256):
    import torch
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    tf = (T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.PILToTensor()]) if train
          else T.Compose([T.Resize(256), T.CenterCrop(224), T.PILToTensor()]))
    ds = ImageFolder(folder, transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=train, num_workers=workers,
                                         persistent_workers=workers > 0)
    meter = TreeRss()
    t0 = time.perf_counter()
    n = 0
    for _ in range(epochs):
        for x, _ in loader:
            assert x.dtype == torch.uint8 and x.shape[1:] == (3, 224, 224)
            n += x.shape[0]
    seconds = time.perf_counter() - t0
    return {"images": n, "seconds": seconds, "images_per_s": n / seconds, "peak_rss_mb": meter.done()}


def vggctl_run(args, data, mode, workers, limit=None):
    env = dict(os.environ, BENCH_DATA=data, BENCH_MODE=mode, BENCH_WORKERS=str(workers),
               BENCH_LIMIT=str(limit or ""), BENCH_EPOCHS=str(args.epochs))
    cmd = ([args.bench_bin] if args.bench_bin else
           ["cargo", "test", "--release", "-q", "--test", "bench_data", "--"])
    out = subprocess.run(cmd + ["--ignored", "--nocapture", "--exact", "bench"],
                         cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(next(l for l in out.splitlines() if l.startswith("{")))


AUGMENT_POLICIES = ["cifar10", "imagenet", "ra", "ta_wide", "augmix"]


def torchvision_augment(policy, batch=128, side=32, steps=5):
    import torch
    import torchvision.transforms as T

    torch.set_num_threads(1)
    torch.manual_seed(0)
    tf = {"ra": T.RandAugment(), "ta_wide": T.TrivialAugmentWide(), "augmix": T.AugMix()}.get(policy)
    tf = tf or T.AutoAugment(T.AutoAugmentPolicy(policy))
    x = torch.randint(0, 256, (batch, 3, side, side), dtype=torch.uint8)
    t0 = time.perf_counter()
    for _ in range(steps):
        torch.stack([tf(img) for img in x])
    seconds = time.perf_counter() - t0
    return {"images": batch * steps, "seconds": seconds, "images_per_s": batch * steps / seconds}


def vggctl_augment(args, policy, device):
    env = dict(os.environ, BENCH_POLICY=policy, BENCH_DEVICE=device)
    cmd = ([args.bench_bin] if args.bench_bin else
           ["cargo", "test", "--release", "-q", "--test", "bench_data", "--"])
    out = subprocess.run(cmd + ["--ignored", "--nocapture", "--exact", "augment"],
                         cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(next(l for l in out.splitlines() if l.startswith("{")))


def augment_table(args):
    import torch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    tv_ok = has_torchvision()
    print("\n--auto-augment alone, images/s on batches of 128 uint8 32x32 images"
          " (vggctl batched; torchvision image by image, one thread):")
    for policy in AUGMENT_POLICIES:
        tv = torchvision_augment(policy) if tv_ok else None
        cells = [f"torchvision {tv['images_per_s']:8.0f}" if tv else "torchvision        -"]
        for dev in devices:
            r = vggctl_augment(args, policy, dev)
            ratio = f" ({r['images_per_s'] / tv['images_per_s']:5.2f}x)" if tv else ""
            cells.append(f"vggctl {dev} {r['images_per_s']:8.0f}{ratio}")
        print(f"  {policy:9s} " + "   ".join(cells))


def has_torchvision():
    try:
        import torchvision  # noqa: F401
        return True
    except ImportError:
        return False


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--dir", default=os.path.join(ROOT, "target", "bench-data"))
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--epochs", type=int, default=1, help="passes over the folder per measurement")
    ap.add_argument("--vggctl", default=os.path.join(ROOT, "scripts", "vggctl"))
    ap.add_argument("--bench-bin", default=None, help="tests/bench_data.rs built (else cargo runs it)")
    ap.add_argument("--make-only", action="store_true")
    ap.add_argument("--augment-only", action="store_true", help="only the --auto-augment table")
    args = ap.parse_args()
    if args.augment_only:
        augment_table(args)
        return
    folder = os.path.join(args.dir, f"jpeg-{args.images}")
    t0 = time.perf_counter()
    make_folder(folder, args.images)
    print(f"data: {args.images} JPEGs in {folder} ({time.perf_counter() - t0:.0f} s to make or find)")
    if args.make_only:
        return
    packed = {}
    for side, raw in [(512, False), (256, False), (256, True)]:
        key = (side, raw)
        packed[key] = os.path.join(args.dir, f"jpeg-{args.images}-{side}{'-raw' if raw else ''}.vggdata")
        t0 = time.perf_counter()
        subprocess.run([args.vggctl, "prepare", "--data-dir", folder,
                        "--out", packed[key], "--max-side", str(side)] + (["--raw"] if raw else []),
                       check=True)
        print(f"vggctl prepare --max-side {side}{' --raw' if raw else ''}: {time.perf_counter() - t0:.1f} s")
    if not args.bench_bin:
        subprocess.run(["cargo", "test", "--release", "-q", "--test", "bench_data", "--no-run"],
                       cwd=ROOT, check=True, capture_output=True)
    w = args.workers
    tv_ok = has_torchvision()
    print(f"{w} workers; images/s to ready uint8 224x224 batches of 256; peak RSS"
          + ("" if tv_ok else "; torchvision is not installed: vggctl's rows only"))
    for mode in ["train", "eval"]:
        tv = torchvision_run(folder, mode == "train", w, args.epochs) if tv_ok else None
        rows = [("torchvision ImageFolder + DataLoader", tv),
                ("vggctl streaming the folder", vggctl_run(args, folder, mode, w)),
                ("vggctl, prepared file (--max-side 512)", vggctl_run(args, packed[512, False], mode, w)),
                ("vggctl, prepared file (--max-side 256)", vggctl_run(args, packed[256, False], mode, w)),
                ("vggctl, prepared file (--max-side 256 --raw)", vggctl_run(args, packed[256, True], mode, w))]
        if mode == "train":
            rows.append(("vggctl streaming the folder, first quarter",
                         vggctl_run(args, folder, mode, w, args.images // 4)))
        print(f"\n{mode}:")
        for name, r in rows:
            if r is None:
                continue
            ratio = f"{r['images_per_s'] / tv['images_per_s']:5.2f}x" if tv else "    -"
            print(f"  {name:44s} {r['images_per_s']:8.0f} img/s  {ratio}"
                  f"  {r['peak_rss_mb']:7.0f} MB  ({r['images']} images, {r['seconds']:.1f} s)")
    augment_table(args)


if __name__ == "__main__":
    main()
