"""Hostile inputs through the real binary under a time and memory bound.

Each file is built here, in Python, the way an attacker would: a `.pth` zip
of 16 members that each inflate to 96 MiB of zeros (1.5 GiB), pickles of 2,000,000
nested lists, of a list that contains itself, of one tuple shared 64 levels
deep (2^64 paths), of 200,000 dict keys, and PyTorch's own `torch.save` of a
tensor with NaN. Each goes to `vggctl export --weights`, and `/dev/zero` and
a FIFO without a writer to `eval --checkpoint`. Every run must end with exit
2 and one error line within 60 s, its peak resident memory (the child's own,
from `wait4`) at most 1 GiB above a clean `export` of the same small model:
what the file claims never becomes an allocation. And image folders
holding a 1 x 60000 or 60000 x 1 image train (in memory and streamed) and
predict at 224 within 256 MiB of a folder of ordinary photos.
"""
import io
import os
import struct
import subprocess
import threading
import time
import zipfile

import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from vgg_reference import build  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("VGGCTL_BIN", os.path.join(ROOT, "target", "release", "vggctl"))
GIB_KIB = 1 << 20


def run(args, cwd):
    """Runs vggctl; returns (exit code, stderr, seconds, peak RSS in KiB)."""
    t0 = time.monotonic()
    proc = subprocess.Popen([BIN, *args], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # A hang (a FIFO opened for reading) is killed, and fails on its exit code.
    watchdog = threading.Timer(120, proc.kill)
    watchdog.start()
    # Read stderr before reaping, so the child's own rusage comes back with it.
    err = proc.stderr.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    watchdog.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, err, time.monotonic() - t0, usage.ru_maxrss


def export_args(weights):
    return ["export", "--weights", weights, "--arch", "vgg11", "--head", "cifar",
            "--format", "safetensors", "--out", "out.safetensors"]


def legacy_pth(object_pickle):
    """A legacy torch.save file whose object is `object_pickle`."""
    magic = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19."
    return magic + b"\x80\x02M\xe9\x03." + b"\x80\x02}." + object_pickle + b"\x80\x02]."


def nested_lists(n):
    return b"\x80\x02" + b"]" * n + b"a" * (n - 1) + b"."


def self_containing_list():
    return b"\x80\x02]q\x00h\x00a."


def shared_tuples(levels):
    p = b"\x80\x02K\x01\x85q\x00"
    for i in range(1, levels + 1):
        p += bytes([ord("h"), i - 1, ord("h"), i - 1, 0x86, ord("q"), i])
    return p + b"."


def dict_of(keys):
    p = b"\x80\x02}("
    for i in range(keys):
        k = f"k{i}".encode()
        p += b"X" + struct.pack("<I", len(k)) + k + b"K\x01"
    return p + b"u."


def zip_bomb(members, size):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", b"\x80\x02}.")
        zeros = b"\0" * size
        for i in range(members):
            z.writestr(f"archive/data/{i}", zeros)
    return buf.getvalue()


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """Peak memory of a clean export of a small vgg11 (libtorch's footprint)."""
    d = tmp_path_factory.mktemp("base")
    model = build("vgg11", False, "cifar", 10)
    torch.save(model.state_dict(), d / "ok.pth")
    code, err, _, rss = run(export_args("ok.pth"), d)
    assert code == 0, err
    return rss


def hostile_files(d):
    (d / "bomb.pth").write_bytes(zip_bomb(16, 96 << 20))
    (d / "nested.pth").write_bytes(legacy_pth(nested_lists(2_000_000)))
    (d / "cycle.pth").write_bytes(legacy_pth(self_containing_list()))
    (d / "shared.pth").write_bytes(legacy_pth(shared_tuples(64)))
    (d / "dict.pth").write_bytes(legacy_pth(dict_of(200_000)))

    sd = build("vgg11", False, "cifar", 10).state_dict()
    sd["features.0.weight"][0, 0, 0, 0] = float("nan")
    torch.save(sd, d / "nan.pth")
    os.mkfifo(d / "fifo")
    return [
        (export_args("bomb.pth"), "bomb.pth"),
        (export_args("nested.pth"), "nested.pth"),
        (export_args("cycle.pth"), "cycle.pth"),
        (export_args("shared.pth"), "shared.pth"),
        (export_args("dict.pth"), "dict.pth"),
        (export_args("nan.pth"), "NaN or infinite"),
        (["eval", "--checkpoint", "/dev/zero", "--dataset", "digits"], "/dev/zero"),
        (["eval", "--checkpoint", "fifo", "--dataset", "digits"], "fifo"),
    ]


def test_hostile_inputs_stay_within_time_and_memory(tmp_path, baseline):
    for args, needle in hostile_files(tmp_path):
        code, err, secs, rss = run(args, tmp_path)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 1, (args, err)
        assert len(lines) == 1 and needle in lines[0], (args, err)
        assert "panicked" not in err
        assert secs < 60, (args, secs)
        assert rss - baseline < GIB_KIB, (args, rss, baseline)
        print(f"{args[2]}: {secs:.1f} s, peak +{max(rss - baseline, 0) // 1024} MiB over a clean export")
    assert not (tmp_path / "out.safetensors").exists()


def thin_folder(root, thin):
    """Two classes of photos, one of them with `thin` (or a normal photo)
    beside it: 1 x 60000 and 60000 x 1 PNGs resize (shorter side to 256)
    to 256 x 15,360,000 pixels, 11 GiB, of which a canvas keeps 384 columns
    and predict's crop 224."""
    from PIL import Image

    rng = torch.Generator().manual_seed(0)
    for cls, shapes in [("a", [(60, 80), thin]), ("b", [(60, 80), (80, 60)])]:
        (root / cls).mkdir(parents=True)
        for i, (h, w) in enumerate(shapes):
            px = torch.randint(0, 256, (h, w, 3), generator=rng, dtype=torch.uint8)
            Image.fromarray(px.numpy()).save(root / cls / f"{i}.png")


@pytest.mark.parametrize("thin", [(1, 60000), (60000, 1)])
def test_thin_images_cost_what_is_kept(tmp_path, thin):
    """Training (in memory and streamed) and predict at --input 224 on a
    folder holding a 1 x 60000 (or 60000 x 1) image: each within 60 s and
    256 MiB of the same on a folder of ordinary photos (before, the canvas
    resized the whole image: 23 GiB and two minutes)."""
    peaks = {}
    for name, shape in [("plain", (70, 90)), ("thin", thin)]:
        data = tmp_path / name
        thin_folder(data, shape)
        train = ["train", "--arch", "vgg11", "--head", "gap", "--dataset", "folder", "--data-dir", str(data),
                 "--input", "224", "--epochs", "1", "--batch-size", "2", "--keep", "last", "--quiet",
                 "--cache-dir", str(tmp_path / "cache")]
        runs = {
            "memory": [*train, "--out", str(tmp_path / f"{name}-memory")],
            "streamed": [*train, "--cache-mem", "0", "--out", str(tmp_path / f"{name}-streamed")],
            "predict": ["predict", "--checkpoint", str(tmp_path / f"{name}-memory" / "last.safetensors"),
                        str(data / "a" / "1.png")],
        }
        for how, args in runs.items():
            code, err, secs, rss = run(args, tmp_path)
            assert code == 0, (name, how, err)
            assert secs < 60, (name, how, secs)
            peaks[name, how] = rss
    for how in ["memory", "streamed", "predict"]:
        more = peaks["thin", how] - peaks["plain", how]
        assert more < 256 << 10, (how, thin, more >> 10, "MiB")
        print(f"{thin} {how}: peak {peaks['thin', how] >> 10} MiB ({more >> 10:+} MiB)")
