"""Data-parallel vggctl under the virtualenv's `torchrun --no-python`, two
Gloo ranks on 127.0.0.1, against the real thing:

- training: the same VGG11 and VGG11-BN (CIFAR head, dropout on; BatchNorm
  statistics per rank, rank 0's kept, as DDP does), the same initial weights, the same per-rank batches (each epoch's order split by PyTorch's
  DistributedSampler) and dropout draws, trained two epochs by PyTorch's
  DistributedDataParallel (tests/ddp_reference.py, also under torchrun):
  final weights within 1e-5; the run's metrics count every image once;
  the VGG11 run is launched by vggctl itself (`--nproc-per-node 2`) and
  follows OneCycleLR (`--scheduler onecycle`, stepped after every update
  over a rank's updates), the VGG11-BN one is launched by torchrun;
- repeated augmentation (`--ra-sampler`): the same, each epoch split by
  timm's RepeatAugSampler, on 2 ranks and in one process;
- evaluation: `vggctl eval` over 2 ranks reports exactly one process's
  counts, accuracies and confusion matrix (loss within 1e-6 relative: the
  ranks' partial sums are added in another order), on the test split and
  on the part `--val-on val` holds out of the training split (which every
  rank draws alike);
- launches that cannot work end with one line each, promptly: WORLD_SIZE
  without RANK, a store nobody serves, ranks started with different models,
  a rank killed or stopped mid-run (the survivors name it, in a world of
  two and of three), `--nproc-per-node` under a
  launcher, `--nproc-per-node 2` whose ranks fail (the launcher names
  the first and exits as it did), `--max-restarts` without
  `--nproc-per-node` or without `--resume`, several ranks without `--out`, a
  one-process run resumed on two ranks, `--resume auto` with another
  `--lr`.

Every process is bounded by a timeout; ports are picked free on 127.0.0.1.
"""
import json

import numpy as np
from sklearn.metrics import precision_recall_fscore_support
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ddp_reference  # noqa: E402
import vgg_reference  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("VGGCTL_BIN", os.path.join(ROOT, "target", "release", "vggctl"))
VENV_BIN = os.path.dirname(sys.executable)
TORCHRUN = os.path.join(VENV_BIN, "torchrun")
DATA = os.path.join(ROOT, "tests", "fixtures", "digits-bin")
LIMIT, BATCH, EPOCHS = 72, 16, 2


@pytest.fixture(autouse=True)
def own_tmpdir(tmp_path, monkeypatch):
    """torchrun leaves a torchelastic_* log directory in $TMPDIR per launch:
    point it into the test's own temporary directory, which pytest removes."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, timeout=300, ranks=2):
    cmd = [TORCHRUN, "--nproc-per-node", str(ranks), "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def initial_weights(path, bn, head="cifar"):
    torch.manual_seed(0)
    model = vgg_reference.build("vgg11", bn, head, 10)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)


@pytest.mark.parametrize("bn", [False, True], ids=["vgg11", "vgg11_bn"])
def test_two_ranks_train_as_pytorch_ddp_and_evaluate_as_one_process(tmp_path, bn):
    init = str(tmp_path / "init.safetensors")
    initial_weights(init, bn)
    with_bn = ["--bn"] if bn else []
    # The VGG11 run with OneCycleLR, stepped after every update over the
    # updates one rank takes (3 an epoch here).
    schedule = [] if bn else ["--scheduler", "onecycle", "--lr", "0.05"]
    run = tmp_path / "run"
    train = [BIN, "train", "--dataset", "cifar10", "--data-dir", DATA, "--no-download",
             "--arch", "vgg11", *with_bn, "--initial-checkpoint", init, "--no-augment",
             "--limit-train", str(LIMIT), "--limit-test", "37", "--epochs", str(EPOCHS),
             "--batch-size", str(BATCH), "--device", "cpu", "--out", str(run), *schedule]
    if bn:
        ours = torchrun("--no-python", *train)
    else:
        # vggctl as its own launcher: the same ranks, the same code path.
        ours = subprocess.run([*train, "--nproc-per-node", "2"], capture_output=True, text=True,
                              timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert ours.returncode == 0, ours.stderr[-3000:]
    # Only rank 0 speaks and writes.
    assert ours.stdout.count("trained 2 epochs") == 1, ours.stdout
    assert "batch 16 per rank on 2 ranks (gloo; global batch 32)" in ours.stderr
    assert json.loads((run / "config.json").read_text())["world_size"] == 2
    metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == EPOCHS

    ref = str(tmp_path / "ddp.safetensors")
    theirs = torchrun(
        os.path.join(ROOT, "tests", "ddp_reference.py"), "--data",
        os.path.join(DATA, "cifar-10-batches-bin"), "--init", init, "--out", ref,
        "--limit-train", str(LIMIT), "--epochs", str(EPOCHS), "--batch-size", str(BATCH), *with_bn, *schedule,
    )
    assert theirs.returncode == 0, theirs.stderr[-3000:]
    a, b = load_file(str(run / "last.safetensors")), load_file(ref)
    assert set(a) == set(b)
    start = load_file(init)
    for k in b:
        # BatchNorm's running statistics are rank 0's, as DDP broadcasts them.
        diff = (a[k].double() - b[k].double()).abs().max().item()
        assert diff < 1e-5, f"{k}: {diff}"
    moved = max((b[k] - start[k]).abs().max().item() for k in b)
    assert moved > 1e-3, "training did not move the weights; the comparison proves nothing"

    if not bn:
        return
    # Evaluation over 2 ranks (37 images: an odd split) = one process; with
    # BatchNorm the training run's own evaluations used rank 0's statistics
    # on both ranks, or its last one would differ.
    one = subprocess.run([BIN, "eval", "--checkpoint", str(run / "last.safetensors"),
                          "--limit-test", "37", "--batch-size", "8", "--device", "cpu", "--json"],
                         capture_output=True, text=True, timeout=120, check=True)
    two = torchrun("--no-python", BIN, "eval", "--checkpoint", str(run / "last.safetensors"),
                   "--limit-test", "37", "--batch-size", "8", "--device", "cpu", "--json")
    assert two.returncode == 0, two.stderr[-3000:]
    # vggctl eval as its own launcher: the same two ranks, one report.
    own = subprocess.run([BIN, "eval", "--checkpoint", str(run / "last.safetensors"), "--limit-test", "37",
                          "--batch-size", "8", "--device", "cpu", "--json", "--nproc-per-node", "2"],
                         capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert own.returncode == 0, own.stderr[-3000:]
    r1, r2, r3 = json.loads(one.stdout), json.loads(two.stdout), json.loads(own.stdout)
    for key in ("images", "top1", "top5", "per_class", "precision", "f1", "support", "confusion"):
        assert r1[key] == r2[key] == r3[key], key
    assert abs(r1["loss"] - r3["loss"]) <= 1e-6 * abs(r1["loss"])
    assert r1["images"] == 37
    # Per-class recall, precision and F1 are scikit-learn's for the same
    # predictions (rebuilt from the confusion matrix), undefined ones null.
    cm = np.array(r1["confusion"])
    y_true = np.repeat(np.arange(10), cm.sum(1))
    y_pred = np.concatenate([np.repeat(np.arange(10), row) for row in cm])
    ref = precision_recall_fscore_support(y_true, y_pred, labels=range(10), zero_division=np.nan)
    for key, values in zip(("precision", "per_class", "f1"), ref[:3]):
        ours = np.array([np.nan if v is None else v / 100 for v in r1[key]])
        assert np.allclose(ours, values, atol=1e-12, equal_nan=True), (key, ours, values)
    assert abs(r1["loss"] - r2["loss"]) <= 1e-6 * abs(r1["loss"])
    # The training run's last evaluation was the same sharded computation.
    assert abs(metrics[-1]["test_top1"] - r1["top1"]) < 1e-9
    # --val-on val: every rank draws the same held-out part of the training
    # split (150 of 1,500), so two ranks score what one process scores.
    held = [BIN, "eval", "--checkpoint", str(run / "last.safetensors"), "--val-on", "val", "--batch-size", "32",
            "--device", "cpu", "--json"]
    one = subprocess.run(held, capture_output=True, text=True, timeout=120, check=True)
    own = subprocess.run([*held, "--nproc-per-node", "2"], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert own.returncode == 0, own.stderr[-3000:]
    r1, r3 = json.loads(one.stdout), json.loads(own.stdout)
    assert r1["split"] == r3["split"] == "val" and r1["images"] == 150
    for key in ("images", "top1", "support", "confusion"):
        assert r1[key] == r3[key], key


def test_a_world_of_one_joins_its_group_and_trains_as_one_process(tmp_path):
    """torchrun --nproc-per-node 1: the rank joins a c10d group of one (as
    init_process_group does; its gradients go through Gloo's all-reduce,
    as DDP's do) and ends with a plain process's weights, bit for bit. On
    a GPU the same world under NCCL keeps its all-reduce inside the CUDA
    graph (tests/gpu.rs)."""
    train = [BIN, "train", "--dataset", "cifar10", "--data-dir", DATA, "--no-download",
             "--arch", "vgg11", "--limit-train", "48", "--limit-test", "16", "--epochs", "2",
             "--batch-size", str(BATCH), "--device", "cpu"]
    one = torchrun("--no-python", *train, "--out", str(tmp_path / "one"), ranks=1)
    assert one.returncode == 0, one.stderr[-3000:]
    assert f"batch {BATCH} on 1 rank (gloo)" in one.stderr, one.stderr
    plain = subprocess.run([*train, "--out", str(tmp_path / "plain")], capture_output=True, text=True,
                           timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert f"batch {BATCH}, " in plain.stderr and "rank" not in plain.stderr, plain.stderr
    a = load_file(str(tmp_path / "one" / "last.safetensors"))
    b = load_file(str(tmp_path / "plain" / "last.safetensors"))
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # It really serves its group's store: not on a port in use.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        env = dict(rank_env(0, busy.getsockname()[1]), WORLD_SIZE="1")
        out = subprocess.run([*train, "--dist-timeout", "3", "--out", str(tmp_path / "busy")],
                             env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "vggctl: error: could not join the group of 1 ranks at 127.0.0.1:"), lines


@pytest.mark.parametrize("limit,ranks", [(300, 2), (40, 1)], ids=["300-on-2-ranks", "40-in-one"])
def test_repeated_augmentation_splits_epochs_as_timm(tmp_path, limit, ranks):
    """--ra-sampler --ra-reps 3 trains as PyTorch DDP whose epochs are split
    by timm's RepeatAugSampler (torchvision's RASampler, which pip's
    torchvision does not ship, lists the same from 256 images on): 300
    images on 2 ranks keep floor(300/256)*256/2 = 128 a rank an epoch,
    each image on 3 ranks in turn; 40 in one process keep 40 (ceil(N /
    ranks) below 256, as timm; torchvision's would keep none). Weights
    within 1e-5 after 2 epochs, dropout drawn alike."""
    init = str(tmp_path / "init.safetensors")
    initial_weights(init, False)
    run = tmp_path / "run"
    train = [BIN, "train", "--dataset", "cifar10", "--data-dir", DATA, "--no-download",
             "--arch", "vgg11", "--initial-checkpoint", init, "--no-augment",
             "--limit-train", str(limit), "--limit-test", "16", "--epochs", "2",
             "--batch-size", "32", "--device", "cpu", "--out", str(run),
             "--ra-sampler", "--ra-reps", "3"]
    common = ["--data", os.path.join(DATA, "cifar-10-batches-bin"), "--init", init,
              "--limit-train", str(limit), "--epochs", "2", "--batch-size", "32", "--ra-reps", "3"]
    reference = os.path.join(ROOT, "tests", "ddp_reference.py")
    ref = str(tmp_path / "ra.safetensors")
    if ranks == 2:
        ours = torchrun("--no-python", *train)
        theirs = torchrun(reference, *common, "--out", ref)
        assert theirs.returncode == 0, theirs.stderr[-3000:]
    else:
        ours = subprocess.run(train, capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
        ddp_reference.in_process(*common, "--out", ref, "--as-one-process", "1")
    assert ours.returncode == 0, ours.stderr[-3000:]
    kept = {2: "128 images an epoch per rank", 1: "40 images an epoch"}[ranks]
    assert f"repeated augmentation x3 ({kept})" in ours.stderr, ours.stderr
    a, b = load_file(str(run / "last.safetensors")), load_file(ref)
    assert set(a) == set(b)
    for k in b:
        diff = (a[k].double() - b[k].double()).abs().max().item()
        assert diff < 1e-5, f"{k}: {diff}"
    start = load_file(init)
    assert max((b[k] - start[k]).abs().max().item() for k in b) > 1e-3


def noise_cifar(root, per_batch=20, seed=0):
    """A CIFAR-10 binary layout of random images (5 training batches of
    `per_batch`, a test batch of 16)."""
    d = root / "cifar-10-batches-bin"
    d.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    for name, n in [(f"data_batch_{i}.bin", per_batch) for i in range(1, 6)] + [("test_batch.bin", 16)]:
        rec = torch.randint(0, 256, (n, 3073), dtype=torch.uint8, generator=g)
        rec[:, 0] = torch.randint(0, 10, (n,), dtype=torch.uint8, generator=g)
        (d / name).write_bytes(rec.numpy().tobytes())
    (d / "batches.meta.txt").write_text("".join(f"c{i}\n" for i in range(10)))
    return str(root)


def test_sync_bn_equals_one_process_with_the_global_batch(tmp_path):
    """--sync-bn over 2 ranks of 16 = one process on their 32 images
    together (VGG11-BN, GAP head: no dropout): weights and running
    statistics within 1e-4 (relative to 1 + |value|; measured below 1e-5
    on one CPU, up to 3.2e-5 on an AMD EPYC, a running mean; per-rank
    statistics end 2.2e-2 away, asserted over 1e-3).

    Why random images and lr 0.001: a VGG with BatchNorm trained from
    scratch at batch 16 is chaotic at lr 0.01 (measured with this
    reference: moving every initial weight by one ulp moves the weights
    ~1e-4 after 4 steps), and the digits' flat black backgrounds make it
    worse; vggctl's SyncBatchNorm rounds differently from PyTorch's kernel,
    so only a stable run can be compared at 1e-5."""
    data = noise_cifar(tmp_path / "noise")
    init = str(tmp_path / "init.safetensors")
    initial_weights(init, True, "gap")
    common = ["--no-python", BIN, "train", "--dataset", "cifar10", "--data-dir", data, "--no-download",
              "--arch", "vgg11", "--bn", "--head", "gap", "--initial-checkpoint", init, "--no-augment",
              "--limit-train", "64", "--limit-test", "16", "--epochs", "2", "--lr", "0.001",
              "--batch-size", str(BATCH), "--device", "cpu"]
    ours = torchrun(*common, "--sync-bn", "--out", str(tmp_path / "run"))
    assert ours.returncode == 0, ours.stderr[-3000:]
    ref = str(tmp_path / "one.safetensors")
    ddp_reference.in_process(
        "--as-one-process", "2", "--data", os.path.join(data, "cifar-10-batches-bin"), "--init", init, "--out", ref,
        "--bn", "--head", "gap", "--limit-train", 64, "--epochs", 2, "--lr", 0.001, "--batch-size", BATCH)
    a, b = load_file(str(tmp_path / "run" / "last.safetensors")), load_file(ref)
    assert set(a) == set(b)
    for k in b:
        diff = ((a[k].double() - b[k].double()).abs() / (1 + b[k].double().abs())).max().item()
        assert diff < 1e-4, f"{k}: {diff}"
    # Without --sync-bn each rank normalizes by its own 16 images: not the same.
    plain = torchrun(*common, "--out", str(tmp_path / "per_rank"))
    assert plain.returncode == 0, plain.stderr[-3000:]
    c = load_file(str(tmp_path / "per_rank" / "last.safetensors"))
    apart = max(((c[k].double() - b[k].double()).abs() / (1 + b[k].double().abs())).max().item() for k in b)
    assert apart > 1e-3, apart


def rank_env(rank, port, **extra):
    env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    env.update(extra)
    return env


TRAIN = ["train", "--dataset", "cifar10", "--data-dir", DATA, "--no-download", "--device", "cpu"]


def test_bad_launches_fail_with_one_line_and_no_hang(tmp_path):
    # WORLD_SIZE without RANK.
    env = dict(os.environ, WORLD_SIZE="2")
    env.pop("RANK", None)
    out = subprocess.run([BIN, *TRAIN, "--out", str(tmp_path / "a")], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines() == [
        "vggctl: error: WORLD_SIZE is set but RANK is not: launch with torchrun (or srun), "
        "or set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT"]
    assert not (tmp_path / "a").exists()

    # NCCL asked for on a CPU: refused before anything joins.
    out = subprocess.run([BIN, *TRAIN, "--dist-backend", "nccl", "--out", str(tmp_path / "n")],
                         env=rank_env(1, free_port()), capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() in (
        ["vggctl: error: --dist-backend nccl needs a CUDA device; use --dist-backend gloo on a CPU"],
        ["vggctl: error: --dist-backend nccl: this vggctl is built without NCCL; use --dist-backend gloo"],
    ), out.stderr
    assert not (tmp_path / "n").exists()

    # A store nobody serves: rank 1 gives up after --dist-timeout.
    start = time.monotonic()
    out = subprocess.run([BIN, *TRAIN, "--dist-timeout", "3", "--out", str(tmp_path / "b")],
                         env=rank_env(1, free_port()), capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "vggctl [rank 1/2]: error: could not join the group of 2 ranks at 127.0.0.1:"), lines
    assert time.monotonic() - start < 30

    # Rank 0 cannot serve on a port in use.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run([BIN, *TRAIN, "--dist-timeout", "3", "--out", str(tmp_path / "c")],
                             env=rank_env(0, port), capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "could not join the group" in lines[0], lines
    assert "address already in use" in lines[0].lower(), lines

    # --nproc-per-node under a launcher: one usage line.
    out = subprocess.run([BIN, *TRAIN, "--nproc-per-node", "2", "--out", str(tmp_path / "d")],
                         env=rank_env(0, free_port()), capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "vggctl: error: --nproc-per-node starts the ranks itself, but RANK says a launcher "
        "(torchrun, srun) already did: leave one of them out"]

    # Ranks that fail (no data there): each says so with its rank, and the
    # launcher names the first and exits as it did.
    out = subprocess.run([BIN, "train", "--dataset", "cifar10", "--data-dir", str(tmp_path / "none"),
                          "--no-download", "--nproc-per-node", "2", "--dist-timeout", "10",
                          "--out", str(tmp_path / "e")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith("vggctl: error: rank ") and lines[-1].endswith(
        "of 2 failed (exit status 1); its error is above"), lines
    assert any(l.startswith("vggctl [rank 0/2]: error: ") for l in lines), lines

    # Ranks that fail every time are started again --max-restarts times,
    # then the launcher gives up as without restarts.
    out = subprocess.run([BIN, "train", "--dataset", "cifar10", "--data-dir", str(tmp_path / "none"),
                          "--no-download", "--nproc-per-node", "2", "--max-restarts", "1", "--resume", "auto",
                          "--dist-timeout", "10", "--out", str(tmp_path / "f")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr
    lines = out.stderr.strip().splitlines()
    restarts = [l for l in lines if l.startswith("warning: rank ")]
    assert len(restarts) == 1 and restarts[0].endswith(
        "starting the 2 ranks again from the last checkpoint (restart 1 of 1)"), lines
    assert lines[-1].startswith("vggctl: error: rank ") and lines[-1].endswith(
        "of 2 failed (exit status 1); its error is above"), lines

    # --max-restarts is --nproc-per-node's, and continues a run: one usage
    # line each, before any rank starts.
    for extra, message in [
            (["--max-restarts", "1"], "--max-restarts restarts the ranks --nproc-per-node starts (under "
                                      "torchrun, give torchrun --max-restarts)"),
            (["--nproc-per-node", "2", "--max-restarts", "1"],
             "--max-restarts continues the restarted ranks from the run's last checkpoint: give "
             "--resume auto with --out DIR (or --resume DIR)"),
            (["--nproc-per-node", "2", "--max-restarts", "1", "--resume", "auto"],
             "--resume auto needs --out DIR: the run to continue, or to start")]:
        out = subprocess.run([BIN, *TRAIN, *extra], capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert (out.returncode, out.stderr) == (2, f"vggctl: error: {message}\n"), (extra, out.stderr)
    assert not (tmp_path / "runs").exists()

    # Several ranks need one run directory named on the command line.
    out = subprocess.run([BIN, *TRAIN, "--nproc-per-node", "2", "--dist-timeout", "10"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert ("vggctl [rank 0/2]: error: a data-parallel run needs --out: every rank must name the "
            "same run directory") in out.stderr.splitlines(), out.stderr
    assert not (tmp_path / "runs").exists()

    # A run trained by one process continues only on one, and --resume auto
    # only with the command line that started it.
    one = tmp_path / "one"
    small = [*TRAIN, "--arch", "vgg11", "--limit-train", "32", "--limit-test", "16", "--batch-size", "16",
             "--epochs", "1", "--quiet", "--out", str(one)]
    subprocess.run([BIN, *small], check=True, capture_output=True, timeout=120)
    out = subprocess.run([BIN, "train", "--resume", str(one), "--epochs", "2", "--nproc-per-node", "2",
                          "--dist-timeout", "10"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr
    assert (f"vggctl [rank 0/2]: error: {one}: the run was trained on 1 rank and continues only on as "
            "many (each rank's place in an epoch depends on the number of ranks); this launch has 2"
            ) in out.stderr.splitlines(), out.stderr
    out = subprocess.run([BIN, *small, "--resume", "auto", "--lr", "0.5"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        f"vggctl: error: {one}: --resume auto would continue this run, but its recorded lr differ "
        "from this command line's; give another --out for a new run"]


def test_ranks_with_different_models_refuse_to_start(tmp_path):
    port = free_port()
    procs = [
        subprocess.Popen([BIN, *TRAIN, "--arch", arch, "--limit-train", "64", "--limit-test", "16",
                          "--dist-timeout", "20",
                          "--epochs", "1", "--out", str(tmp_path / "run")],
                         env=rank_env(rank, port), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank, arch in ((0, "vgg11"), (1, "vgg13"))
    ]
    for rank, p in enumerate(procs):
        _, err = p.communicate(timeout=120)
        assert p.returncode != 0
        assert err.strip().splitlines()[-1] == (
            f"vggctl [rank {rank}/2]: error: the 2 ranks disagree on the model, the data's size and the run's settings: "
            "every rank must be started with the same command line and data"), err
    # Nothing written but the claim rank 0 gave back.
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


@pytest.mark.parametrize("fault,world,lost", [
    (signal.SIGKILL, 2, 1), (signal.SIGSTOP, 2, 1), (signal.SIGKILL, 3, 1), (signal.SIGSTOP, 3, 1),
    (signal.SIGKILL, 3, 0)], ids=["dies-of-2", "hangs-of-2", "dies-of-3", "hangs-of-3", "rank-0-dies-of-3"])
def test_a_lost_rank_is_named_by_the_survivors_within_the_timeout(tmp_path, fault, world, lost):
    """A rank killed (its sockets close) or stopped (it stays silent):
    every other rank ends with one line naming it, at once or after
    --dist-timeout; in a world of three, after the roll call through the
    store (at most 3 s) that finds who is missing, or, when rank 0 is lost
    with the store it served (no torchrun agent), because the store is out
    of reach."""
    port = free_port()
    args = [BIN, *TRAIN, "--arch", "vgg11", "--limit-train", "4000", "--limit-test", "16",
            "--batch-size", "8", "--epochs", "5", "--dist-timeout", "5", "--out", str(tmp_path / "run")]
    ranks = [subprocess.Popen(args, env=rank_env(r, port, WORLD_SIZE=str(world)), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL if r == lost != 0 else subprocess.PIPE, text=True)
             for r in range(world)]
    try:
        # The header comes after the ranks joined and agreed on the model.
        deadline = time.monotonic() + 120
        seen = ""
        while "training vgg11" not in seen and time.monotonic() < deadline:
            seen += ranks[0].stderr.readline()
        assert "training vgg11" in seen, seen
        time.sleep(1)
        ranks[lost].send_signal(fault)
        start = time.monotonic()
        for r in [r for r in range(world) if r != lost]:
            _, err = ranks[r].communicate(timeout=60)
            assert ranks[r].returncode not in (0, None)
            assert time.monotonic() - start < 5 + 3 * (world > 2) + 10
            last = err.strip().splitlines()[-1]
            assert last.startswith(f"vggctl [rank {r}/{world}]: error: lost contact with rank {lost} "), last
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
                p.wait()


RESTARTED = [*TRAIN, "--arch", "vgg11", "--limit-train", "320", "--limit-test", "16", "--batch-size", "16",
             "--epochs", "3", "--dist-timeout", "20", "--resume", "auto", "--model-ema", "--model-ema-steps", "4"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted 2-rank run the restarted ones must end as."""
    out = tmp_path_factory.mktemp("straight") / "run"
    r = torchrun("--no-python", BIN, *RESTARTED, "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.parametrize("launcher", ["torchrun", "vggctl"])
def test_a_restarted_group_continues_to_the_same_weights(tmp_path, straight, launcher):
    """torchrun --max-restarts 1 with --resume auto, and vggctl's own
    launcher with the same (`--nproc-per-node 2 --max-restarts 1`): rank 1
    killed in the second epoch, the restarted group continues from the last
    checkpoint and ends with the uninterrupted run's weights and moving
    average (restored from ema.safetensors at the epoch's end), bit for
    bit."""
    run = tmp_path / "restarted"
    if launcher == "torchrun":
        cmd = [TORCHRUN, "--nproc-per-node", "2", "--max-restarts", "1", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), "--no-python", BIN, *RESTARTED, "--out", str(run)]
    else:
        cmd = [BIN, *RESTARTED, "--nproc-per-node", "2", "--max-restarts", "1", "--out", str(run)]
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline = time.monotonic() + 240
        seen = ""
        while "epoch   1 " not in seen and time.monotonic() < deadline and p.poll() is None:
            seen += p.stderr.readline()
        assert "epoch   1 " in seen, seen
        time.sleep(0.5)
        workers = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
        rank1 = [w for w in workers if b"RANK=1\0" in open(f"/proc/{w}/environ", "rb").read()]
        assert len(rank1) == 1, workers
        os.kill(int(rank1[0]), signal.SIGKILL)
        out, err = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, (seen + err)[-3000:]
    assert "lost contact with rank 1" in err, err[-3000:]
    if launcher == "vggctl":
        assert ("warning: rank 1 of 2 failed (exit status 137); its error is above; starting the 2 ranks "
                "again from the last checkpoint (restart 1 of 1)") in err, err[-3000:]
    assert out.count("trained 3 epochs") == 1, out
    metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    for name in ["last.safetensors", "ema.safetensors"]:
        a = load_file(str(run / name))
        b = load_file(str(straight / name))
        assert set(a) == set(b)
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}: {k}"
