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
fails is reported and left out, the rest still runs (exit status 1 then).
What each configuration runs is in bench_gpu_runs.py; this file holds the
sections, their bookkeeping and the report. Not a test: timings vary with
the machine."""
import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

import bench_gpu_runs as runs
from bench_gpu_runs import (dense_fp16_peak, keep_run, pytorch_infer, pytorch_train, recipe_loop, run, seconds_left,
                            step_parts, timed, train_flops_per_image, vgg16, vggctl_eval, vggctl_ops, vggctl_recipe,
                            vggctl_train, world_of_one, write_cifar_bin, write_safetensors)

SECTIONS = ("train", "kernels", "loop", "recipe", "inference", "accuracy")
# A configuration that would start with less than this many seconds to
# --time-limit is left out.
START_SECONDS = 45


class Bench:
    """One run of the benchmark: the options, the synthetic data in `root`,
    and what the sections measured, for the report."""

    def __init__(self, a, root, data, labels):
        self.a, self.root, self.data, self.labels = a, root, data, labels
        self.rows = []  # (section, label, images/s, peak bytes, note)
        self.failures = []  # (section, label, why)
        self.ops_tables = []  # (batch, which step, kernel rows)
        self.plain = {}  # batch -> images/s of vggctl's defaults
        self.world_one = {}  # batch -> (backend, images/s) of a world of one
        self.unfused = {}  # batch -> images/s of --no-fused-step (today's step, the reference)
        self.parts = []  # (model and batch, the defaults' images/s, [(part, images/s without it)])
        self.recipe = {}  # what the recipe's runs measured
        self.accuracy = []  # (what it ran as, [test top-1 per seed])
        self.seeds = [7, 1, 2, 3, 4][:max(1, min(a.seeds, 2) if a.smoke else a.seeds)]

    def want(self, section):
        """Whether this run has `section` (--only, else all but the recipe
        unless --recipe)."""
        return section in self.a.only if self.a.only else section != "recipe" or self.a.recipe

    def add(self, section, label, value, note=""):
        (speed, peak), secs = value
        self.rows.append((section, label, speed, peak, note or f"{secs:.0f}s"))
        print(f"  {section}: {label}: {speed:,.0f} img/s ({self.rows[-1][4]})", file=sys.stderr, flush=True)

    def attempt(self, section, label, f, *args):
        """f(*args) timed; a failure is reported and recorded, and the run goes
        on: one GPU slot must give every figure it can. Near --time-limit
        the configuration is left out, so that the report still prints."""
        if seconds_left() < START_SECONDS:
            print(f"  {section}: {label}: left out: --time-limit near", file=sys.stderr, flush=True)
            self.failures.append((section, label, "left out: --time-limit near"))
            self.rows.append((section, label, 0.0, 0, "left out"))
            return None
        try:
            return timed(f, *args)
        except Exception as e:  # noqa: BLE001 -- any failure of one configuration
            print(f"  {section}: {label}: FAILED: {e}", file=sys.stderr, flush=True)
            self.failures.append((section, label, str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)))
            self.rows.append((section, label, 0.0, 0, "FAILED"))
            return None

    def vggctl_row(self, sec, label, r):
        """Records a vggctl training run's result `r` (from attempt) under
        `label`, with what it ran as; returns (images/s, ran as) or None."""
        if not r:
            return None
        (speed, peak, ran_as, _), secs = r
        self.rows.append((sec, f"{label} ({ran_as})", speed, peak, f"{secs:.0f}s"))
        print(f"  {sec}: {label}: {speed:,.0f} img/s", file=sys.stderr, flush=True)
        return speed, ran_as

    def train(self, batch, n, steps, began):
        """VGG16-BN at `batch`: PyTorch's model-only steps, vggctl's
        defaults and variants, the defaults' fused-step parts left out in
        turn, and (at 128) a world of one."""
        a, sec = self.a, f"train, batch {batch}"
        if a.smoke:
            batch = batch // 8
        for label, mode in (("PyTorch eager fp32 (model only)", "fp32"),
                            ("PyTorch eager bf16 + channels_last (model only)", "bf16")):
            r = self.attempt(sec, label, pytorch_train, batch, steps[batch], mode)
            if r:
                self.add(sec, label, r)
        if not a.skip_compile and time.perf_counter() - began > a.budget:
            print(f"  {sec}: torch.compile left out: {a.budget:.0f}s budget spent", file=sys.stderr)
        elif not a.skip_compile:
            for label, mode in (("torch.compile, bf16 + channels_last (model only)", "compile"),
                                ("torch.compile reduce-overhead, bf16 + channels_last", "compile-reduce-overhead")):
                r = self.attempt(sec, label, pytorch_train, batch, steps[batch], mode)
                if r:
                    self.add(sec, label, r)
        # The defaults (fp16, channels_last, CUDA graphs), bf16, and eager
        # steps: the figures behind the defaults.
        count = 128 if a.smoke else n
        for extra in ([], ["--precision", "bf16"], ["--no-cuda-graphs"], ["--no-fused-step"]):
            out = os.path.join(self.root, f"run-{batch}-{'-'.join(x.strip('-') for x in extra) or 'default'}")
            r = self.attempt(sec, f"vggctl train end to end ({' '.join(extra) or 'defaults'})", vggctl_train,
                             a.vggctl, self.root, out, batch, count, extra + ["--profile"] * a.profile)
            keep_run(a.keep, out)
            got = self.vggctl_row(sec, "vggctl train end to end", r)
            if got and not extra:
                self.plain[batch], plain_as = got
            elif got and extra == ["--no-fused-step"]:
                self.unfused[batch] = got[0]
        if batch in self.plain:
            without = self.leave_out_parts(sec, batch, count, ("vgg16", "--bn"), plain_as)
            self.parts.append((f"VGG16-BN, batch {batch}", self.plain[batch], without))
        if batch == (16 if a.smoke else 128):
            # A world of one under NCCL (Gloo in a smoke run): the same
            # step with its all-reduce inside the CUDA graph.
            backend = "gloo" if a.smoke else "nccl"
            out = os.path.join(self.root, f"run-{batch}-{backend}")
            r = self.attempt(sec, f"{backend} world of one", lambda: vggctl_train(
                a.vggctl, self.root, out, batch, count, ["--dist-backend", backend], env=world_of_one()))
            keep_run(a.keep, out)
            got = self.vggctl_row(sec, f"{backend} world of one: vggctl", r)
            if got:
                self.world_one[batch] = (backend, got[0])

    def leave_out_parts(self, sec, batch, n, arch, ran_as):
        """Each part of the fused step that the defaults' run used
        (`ran_as`), left out in turn (--no-fused-step=PART): what each part
        brings is the defaults' images/s over this run's. Returns [(part,
        images/s without it)]. Where vggctl's BatchNorm+ReLU ran, leaving it
        out runs cuDNN's instead (which of the two is faster); leaving out
        both, the plain ops (what the faster one brings)."""
        without = []
        # A smoke run on a CPU has no fused step: one part, to run the path.
        parts = step_parts(ran_as) or (["cast-once"] if self.a.smoke else [])
        if "bn-relu-own" in parts:
            parts.insert(parts.index("bn-relu-own") + 1, "bn-relu-own,bn-relu")
        for part in parts:
            out = os.path.join(self.root, f"run-{batch}-{arch[0]}-without-{part.replace(',', '+')}")
            r = self.attempt(sec, f"vggctl train end to end (--no-fused-step={part})", vggctl_train, self.a.vggctl,
                             self.root, out, batch, n, [f"--no-fused-step={part}"], 3, arch)
            keep_run(self.a.keep, out)
            got = self.vggctl_row(sec, f"vggctl train end to end, without {part}", r)
            if got:
                without.append((part, got[0]))
        return without

    def kernels(self):
        """Where the replayed step's time goes, kernel by kernel: the fused
        step's and the reference step's side by side, what each lever of
        the fused step removed or replaced."""
        batch = 64 if self.a.smoke else 512
        for step, extra in (("fused step", []), ("reference step (--no-fused-step)", ["--no-fused-step"])):
            out = os.path.join(self.root, f"run-{batch}-ops" + "-reference" * bool(extra))
            r = self.attempt(f"train, batch {batch}", f"vggctl --profile kernels, {step}", vggctl_ops,
                             self.a.vggctl, self.root, out, batch, extra)
            keep_run(self.a.keep, out)
            if r:
                self.ops_tables.append((batch, step, r[0]))

    def loop(self):
        sec = "recipe loop, batch 128"
        for workers in (0, 8):
            label = f"PyTorch recipe loop, DataLoader num_workers={workers}"
            r = self.attempt(sec, label, recipe_loop, self.data, self.labels, workers,
                             1 if self.a.smoke else 20 if workers == 0 else 60)
            if r:
                self.add(sec, label, r)

    def recipe_model(self):
        """VGG16 without BatchNorm at batch 128: vggctl's defaults, each
        part of their fused step left out in turn, and the reference step,
        against PyTorch's model-only steps and the recipe's loop."""
        a, batch = self.a, 16 if self.a.smoke else 128
        sec = f"train, batch {batch}, VGG16 without BN (the recipe's model)"
        modes = [("PyTorch eager bf16 + channels_last (model only)", "bf16")]
        if not a.skip_compile:
            modes.append(("torch.compile reduce-overhead, bf16 + channels_last", "compile-reduce-overhead"))
        for label, mode in modes:
            r = self.attempt(sec, label, pytorch_train, batch, 1 if a.smoke else 100, mode, False)
            if r:
                self.add(sec, label, r)
        count = 128 if a.smoke else len(self.labels)
        for extra in ([], ["--no-fused-step"]):
            out = os.path.join(self.root, "run-recipe-model" + "".join(extra))
            r = self.attempt(sec, f"vggctl train end to end ({' '.join(extra) or 'defaults'})", vggctl_train,
                             a.vggctl, self.root, out, batch, count, extra, 3, ("vgg16",))
            keep_run(a.keep, out)
            got = self.vggctl_row(sec, "vggctl train end to end", r)
            if got:
                self.recipe["fused" if not extra else "unfused"] = got[0]
            if got and not extra:
                without = self.leave_out_parts(sec, batch, count, ("vgg16",), got[1])
                self.parts.append((f"VGG16 without BN, batch {batch}", got[0], without))
        label = "PyTorch recipe loop, DataLoader num_workers=0"
        r = self.attempt(sec, label, recipe_loop, self.data, self.labels, 0, 1 if a.smoke else 20, False)
        if r:
            self.add(sec, label, r)
            self.recipe["loop"] = r[0][0]

    def recipe_end_to_end(self):
        """The recipe end to end on 50,000 training and 10,000 test images."""
        a, sec = self.a, "the recipe end to end"
        n_train = 256 if a.smoke else 50000
        here = os.path.join(self.root, "recipe-data")
        os.makedirs(here)
        reps = -(-(n_train + 10000) // len(self.labels))
        write_cifar_bin(here, np.tile(self.data, (reps, 1, 1, 1))[:n_train + 10000],
                        np.tile(self.labels, reps)[:n_train + 10000], test=10000)
        out = os.path.join(self.root, "run-recipe")
        r = self.attempt(sec, "vggctl train --arch vgg16 --dataset cifar10 (defaults)", vggctl_recipe, a.vggctl,
                         here, out, a.smoke)
        keep_run(a.keep, out)
        if r:
            (epochs, top1, ran_as), secs = r
            self.recipe.update(epochs=epochs, secs=secs, ran_as=ran_as, train=n_train)
            self.rows.append((sec, f"vggctl, {epochs} epochs, wall time ({ran_as})", 0.0, 0, f"{secs:.0f}s"))

    def inference(self):
        """ImageNet-head VGG16 at 224x224, batch 64: PyTorch eager against
        vggctl eval's defaults, bf16, and the model as trained."""
        a, sec = self.a, "inference 224x224, batch 64"
        ib = 4 if a.smoke else 64
        label = "PyTorch eager bf16 + channels_last (model only)"
        r = self.attempt(sec, label, pytorch_infer, ib, 1 if a.smoke else 30 if a.quick else 60)
        if r:
            self.add(sec, label, r)
        weights = os.path.join(self.root, "vgg16-10.safetensors")
        write_safetensors(weights, vgg16(False, "imagenet", 10).state_dict())
        for extra in ([], ["--precision", "bf16"], ["--layerwise", "--no-cuda-graphs"]):
            label = f"vggctl eval ({' '.join(extra) or 'defaults'})"
            r = self.attempt(sec, label, vggctl_eval, a.vggctl, self.root, weights, ib,
                             3 * ib if a.smoke else 3200, extra)
            if r:
                (speed, peak, ran_as), secs = r
                self.add(sec, f"vggctl eval ({ran_as})", ((speed, peak), secs))

    def accuracy_check(self):
        """VGG11-BN on the real digits in each precision, --seeds runs each."""
        a = self.a
        digits = os.path.dirname(a.digits) if a.digits.endswith("cifar-10-batches-bin") else a.digits
        for extra in (["--precision", "fp32"], ["--precision", "tf32"], ["--precision", "fp16"],
                      ["--precision", "bf16"], ["--precision", "fp16", "--no-cuda-graphs"],
                      ["--precision", "fp16", "--no-fused-step"]):
            top1s, ran = [], "?"
            for seed in self.seeds:
                out = os.path.join(self.root, "digits-" + "-".join(x.strip("-") for x in extra) + f"-seed{seed}")
                r = self.attempt("accuracy", f"{' '.join(extra)} seed {seed}", vggctl_train, a.vggctl, digits, out,
                                 32, 320 if a.smoke else None, extra + ["--seed", str(seed), "--scheduler", "cosine"],
                                 1 if a.smoke else 5, ("vgg11", "--bn"))
                keep_run(a.keep, out)
                if r:
                    (_, _, ran, top1), _ = r
                    top1s.append(top1)
            if top1s:
                self.accuracy.append((ran, top1s))


# ---------------------------------------------------------------- report

def mib(b):
    return f"{b / 2**20:,.0f} MiB" if b else "-"


def print_rows(rows):
    """Every configuration; training rows also with the model's arithmetic
    per second (VGG16, 32x32) and its share of the GPU's dense fp16 peak."""
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


def print_recipe(recipe):
    """The recipe's wall time next to the PyTorch loop's, extrapolated
    from its images/s (its training only: its evaluations not counted)."""
    if recipe.get("fused") and recipe.get("unfused"):
        print(f"\nVGG16 without BN, the recipe's batch: the fused step "
              f"{recipe['fused'] / recipe['unfused']:.2f}x --no-fused-step")
    if "secs" not in recipe:
        return
    print(f"\nthe recipe end to end ({recipe['ran_as']}): {recipe['epochs']} epochs of {recipe['train']:,} images "
          f"and their evaluations in {recipe['secs']:.0f} s (target: under 60 s on an H100/H200)")
    if recipe.get("loop"):
        loop = recipe["epochs"] * recipe["train"] / recipe["loop"]
        print(f"  the seed's PyTorch loop (num_workers=0, {recipe['loop']:,.0f} img/s), its training alone: "
              f"{loop:,.0f} s ({loop / recipe['secs']:.1f}x vggctl's whole run)")


def print_targets(b):
    """vggctl's best configuration over each reference, with the targets."""
    rows = b.rows

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
    for batch, speed in b.unfused.items():
        targets.append((f"batch {batch}, fused step vs --no-fused-step", b.plain.get(batch), speed, 1.0))
    for batch, (backend, speed) in b.world_one.items():
        targets.append((f"batch {batch}, {backend} world of one vs one process", speed, b.plain.get(batch), 0.97))
    sec = "inference 224x224, batch 64"
    targets.append(("inference vs PyTorch eager bf16 + channels_last", best(sec, "vggctl"), best(sec, "PyTorch"), 1.1))
    for label, ours, ref, target in targets:
        if not ours or not ref:
            print(f"  {label:<52}    n/a  [>= {target}x: a figure is missing]")
            continue
        ratio = ours / ref
        print(f"  {label:<52} {ratio:6.2f}x  [>= {target}x: {'met' if ratio >= target else 'NOT met'}]")


def print_parts(parts):
    """What each part of the fused step brings: the defaults' images/s over
    those of the run without it (above 1: the part makes the step faster)."""
    if not parts:
        return
    print("\nthe fused step's parts, each left out in turn (defaults' images/s / without the part; "
          "above 1.00x the part pays):")
    for what, default, without in parts:
        for part, speed in without:
            print(f"  {what:<40} {part:<19} {default / speed:6.3f}x  ({default:,.0f} vs {speed:,.0f} img/s)")


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


def print_accuracy(b):
    if not b.accuracy:
        print(f"\naccuracy check skipped: {'not asked for' if not b.want('accuracy') else 'no ' + b.a.digits}")
        return
    print(f"\naccuracy, VGG11-BN on the real digits, 5 epochs, seeds {b.seeds} "
          "(test top-1; the mean must be within 1 point of fp32's):")
    ref = statistics.mean(b.accuracy[0][1])
    for ran_as, top1s in b.accuracy:
        top1 = statistics.mean(top1s)
        runs_ = " ".join(f"{t:6.2f}" for t in top1s)
        ok = abs(top1 - ref) <= 1.0
        print(f"  {ran_as:<50} {top1:6.2f}%  {top1 - ref:+5.2f}  {'ok' if ok else 'NOT ok'}   (runs: {runs_})")


def report(b, began):
    print_rows(b.rows)
    print_recipe(b.recipe)
    print_targets(b)
    print_parts(b.parts)
    for batch, step, ops in b.ops_tables:
        print_ops(batch, ops, step)
    print_accuracy(b)
    if b.failures:
        print("\nFAILED or left-out configurations (the rest of the run went on):")
        for section, label, why in b.failures:
            print(f"  {section}: {label}: {why}")
    print(f"\nbench-gpu took {time.perf_counter() - began:.0f}s")


def arguments():
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
    p.add_argument("--leave-out", type=lambda v: v.split(","), default=[], metavar="PART,...",
                   help="leave these fused-step parts out of every vggctl training run (gpu-check leaves out "
                        "bn-relu-own, bn-relu-pool and relu-bias-grad when vggctl's own kernels failed their GPU tests)")
    p.add_argument("--smoke", action="store_true",
                   help="a tiny run on the CPU that checks this script's plumbing (its figures mean nothing)")
    a = p.parse_args()
    if a.only and set(a.only) - set(SECTIONS):
        p.error(f"--only: unknown section(s) {', '.join(sorted(set(a.only) - set(SECTIONS)))}")
    return a


def main():
    a = arguments()
    if a.time_limit:
        runs.DEADLINE = time.perf_counter() + a.time_limit
    runs.LEAVE_OUT = a.leave_out
    if a.smoke:
        runs.DEV = torch.device("cpu")
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
    name = torch.cuda.get_device_name(0) if runs.DEV.type == "cuda" else "CPU (smoke run)"
    print(f"device: {name}; PyTorch {torch.__version__}; {info}")
    print(f"synthetic CIFAR-shaped data, {n} images; VGG16-BN cifar head for training\n")
    with tempfile.TemporaryDirectory() as root:
        write_cifar_bin(root, data, labels, test=64 if a.smoke else 3200)
        b = Bench(a, root, data, labels)
        for batch in (512, 128) if b.want("train") else ():
            b.train(batch, n, steps, began)
        if b.want("kernels"):
            b.kernels()
        if b.want("loop"):
            b.loop()
        if b.want("recipe"):
            b.recipe_model()
            b.recipe_end_to_end()
        if b.want("inference"):
            b.inference()
        if b.want("accuracy") and os.path.isdir(a.digits):
            b.accuracy_check()
    report(b, began)
    if b.failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
