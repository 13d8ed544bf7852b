"""Data-parallel throughput on this machine's CPUs, in one run, on the same
synthetic CIFAR-shaped data (VGG11, cifar head, SGD, batch per rank):

  (a) vggctl train, 1 process with all threads (OMP_NUM_THREADS = cores);
  (b) vggctl train under torchrun, 2 Gloo ranks of 1 thread each;
  (c) PyTorch DistributedDataParallel under torchrun, the same 2 ranks;
  (d) one all-reduce of the model's gradient (fp32) through c10d's Gloo,
      the collective vggctl runs once per step.

vggctl's figures are read from its metrics.jsonl (epochs after the first);
DDP's are timed the same way (steps after a warm-up epoch). Prints images/s,
the scaling efficiency (b) / (2 x (a) at one thread per rank), the
all-reduce's share of a step and the ratio (b) / (c).
Not a test: timings vary with the machine.

    scripts/bench-dist [--images N] [--batch B] [--epochs E]
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "tests"))
BIN = os.environ.get("VGGCTL_BIN", os.path.join(ROOT, "target", "release", "vggctl"))
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_data(root, n):
    d = os.path.join(root, "cifar-10-batches-bin")
    os.makedirs(d)
    g = torch.Generator().manual_seed(0)
    per = (n + 4) // 5
    for name, k in [(f"data_batch_{i}.bin", per) for i in range(1, 6)] + [("test_batch.bin", 64)]:
        rec = torch.randint(0, 256, (k, 3073), dtype=torch.uint8, generator=g)
        rec[:, 0] = torch.randint(0, 10, (k,), dtype=torch.uint8, generator=g)
        with open(os.path.join(d, name), "wb") as f:
            f.write(rec.numpy().tobytes())
    with open(os.path.join(d, "batches.meta.txt"), "w") as f:
        f.write("".join(f"c{i}\n" for i in range(10)))


def torchrun_args():
    return [TORCHRUN, "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(free_port())]


def vggctl_ips(data, out, a, ranks, threads):
    cmd = [BIN, "train", "--dataset", "cifar10", "--data-dir", data, "--no-download", "--arch", "vgg11",
           "--epochs", str(a.epochs), "--batch-size", str(a.batch), "--limit-train", str(a.images),
           "--limit-test", "64", "--device", "cpu", "--out", out, "-q"]
    if ranks > 1:
        cmd = torchrun_args() + ["--no-python"] + cmd
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        epochs = [json.loads(line) for line in f]
    return statistics.median(m["images_per_s"] for m in epochs[1:])


def worker(a):
    """Under torchrun: DDP training steps timed, or the all-reduce timed."""
    import torch.distributed as dist
    from vgg_reference import build

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = build("vgg11", False, "cifar", 10)
    if a.worker == "allreduce":
        n = sum(p.numel() for p in model.parameters())
        flat = torch.randn(n)
        times = []
        for i in range(12):
            dist.barrier()
            t = time.perf_counter()
            dist.all_reduce(flat)
            times.append(time.perf_counter() - t)
        if rank == 0:
            print(json.dumps({"params": n, "seconds": statistics.median(times[2:])}))
        return
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    per_rank = a.images // world
    x = torch.randn(per_rank, 3, 32, 32)
    y = torch.randint(0, 10, (per_rank,))
    rates = []
    for epoch in range(a.epochs):
        t = time.perf_counter()
        for s in range(0, per_rank, a.batch):
            loss = torch.nn.functional.cross_entropy(ddp(x[s:s + a.batch]), y[s:s + a.batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
        rates.append(per_rank * world / (time.perf_counter() - t))
    if rank == 0:
        print(json.dumps({"images_per_s": statistics.median(rates[1:])}))
    dist.destroy_process_group()


def run_worker(kind, a):
    out = subprocess.run(torchrun_args() + [os.path.abspath(__file__), "--worker", kind,
                                            "--images", str(a.images), "--batch", str(a.batch),
                                            "--epochs", str(a.epochs)],
                         check=True, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--batch", type=int, default=32, help="per rank")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--worker", choices=["ddp", "allreduce"])
    a = p.parse_args()
    if a.worker:
        return worker(a)
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        # torchrun's per-launch log directories go with the rest.
        os.environ["TMPDIR"] = tmp
        make_data(tmp, a.images)
        one_all = vggctl_ips(tmp, os.path.join(tmp, "one-all"), a, 1, cores)
        one_1t = vggctl_ips(tmp, os.path.join(tmp, "one-1t"), a, 1, 1)
        two = vggctl_ips(tmp, os.path.join(tmp, "two"), a, 2, 1)
        ddp = run_worker("ddp", a)["images_per_s"]
        ar = run_worker("allreduce", a)
    step = a.batch / (two / 2)
    print(f"VGG11 cifar head, {a.images} images, batch {a.batch} per rank, {cores} cores, fp32 on the CPU")
    print(f"vggctl 1 process, {cores} threads : {one_all:8.1f} img/s")
    print(f"vggctl 1 process, 1 thread   : {one_1t:8.1f} img/s")
    print(f"vggctl 2 ranks x 1 thread    : {two:8.1f} img/s  (scaling efficiency {two / (2 * one_1t):.2f} "
          f"vs 1 thread; {two / one_all:.2f}x the {cores}-thread process)")
    print(f"PyTorch DDP 2 ranks x 1 thr. : {ddp:8.1f} img/s  (vggctl / DDP = {two / ddp:.2f})")
    print(f"all-reduce of {ar['params'] * 4 / 2**20:.1f} MiB (Gloo, 2 ranks): {ar['seconds'] * 1e3:.1f} ms "
          f"= {ar['seconds'] / step:.1%} of a {step * 1e3:.0f} ms step")


if __name__ == "__main__":
    main()
