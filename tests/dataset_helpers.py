"""What the dataset tests (test_cifar100.py, test_mnist.py, test_svhn.py,
the listed datasets') share: where things are, running vggctl, how far two
state dicts are apart, a local mirror serving a folder's files on
127.0.0.1, and windows of real photographs to make datasets of."""
import contextlib
import functools
import hashlib
import http.server
import os
import subprocess
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("VGGCTL_BIN", os.path.join(ROOT, "target", "release", "vggctl"))
FIX = os.path.join(ROOT, "tests", "fixtures")
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def vggctl(*args, cwd=None, env=None):
    return subprocess.run([BIN, *args], capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


def errors(r):
    """stderr's lines but the note on the weights' architecture."""
    return [line for line in r.stderr.splitlines() if not line.startswith("note: ")]


def missing_dataset_error(name, tmp_path, *args):
    """The one error line of `prepare --dataset name --no-download` on an
    empty `--data-dir` (`tmp_path/empty`), after checking that the exit is 1
    and that nothing was written there or as the output; and the folder."""
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "missing.vggdata"
    r = vggctl("prepare", "--dataset", name, "--data-dir", str(empty), "--no-download", "-o", str(out), *args)
    assert r.returncode == 1 and len(errors(r)) == 1, r.stderr
    assert os.listdir(empty) == [] and not out.exists()
    return errors(r)[0], empty


@functools.cache
def photos():
    """scikit-image's real photographs, as RGB arrays."""
    import numpy as np
    from PIL import Image
    from skimage import data as skdata

    return [np.asarray(Image.fromarray(getattr(skdata, p)()).convert("RGB"))
            for p in ["astronaut", "coffee", "chelsea", "rocket"]]


def window(k, h=64, w=64):
    """The k-th distinct h x w window of the photographs."""
    img = photos()[k % len(photos())]
    y, x = (k * 37) % (img.shape[0] - h), (k * 53) % (img.shape[1] - w)
    return img[y:y + h, x:x + w]


def save_window(path, k, lossless):
    """The k-th distinct 64x64 window of the photographs, as JPEG or
    (`lossless`) as PNG data, into `path`."""
    from PIL import Image

    Image.fromarray(window(k)).save(path, format="PNG" if lossless else "JPEG")


def apart(a, b):
    """The largest difference between two state dicts, relative to 1 + |b|."""
    return max(((a[k].double() - b[k].double()).abs() / (1 + b[k].double().abs())).max().item() for k in b)


def packed_index(path):
    """The index of the file `vggctl prepare` wrote: its JSON, which the
    file's trailer (offset, length, CRC, end mark) locates."""
    import json
    import struct

    data = path.read_bytes()
    at, length = struct.unpack("<QQ", data[-28:-12])
    assert data[-8:] == b"VGGCTLPX"
    return json.loads(data[at:at + length])


def md5(path):
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def mirror(directory):
    """`directory`'s files served on 127.0.0.1; yields the base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=directory))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()


def initial_model(path, seed, classes=10):
    """VGG11 (cifar head, no BN) initialized from `seed`, its weights saved
    to `path`: the model, as the start of both sides' training."""
    import torch
    from safetensors.torch import save_file

    import vgg_reference

    torch.manual_seed(seed)
    model = vgg_reference.build("vgg11", False, "cifar", classes)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model


def reference_scores(model, weights, images, targets, norm):
    """`model` with `weights` in eval mode on the whole test split
    (`images` normalized by `norm`): PyTorch's mean cross-entropy and the
    number of top-1 hits, what `vggctl eval` must report."""
    import torch

    from ddp_reference import normalize

    model.load_state_dict(weights)
    model.eval()
    with torch.no_grad():
        logits = model(normalize(images, *norm))
    loss = torch.nn.functional.cross_entropy(logits, targets).item()
    return loss, (logits.argmax(1) == targets).sum().item()


def reference(out, init, data, *args, limit, batch, epochs):
    """PyTorch's one-process training (`ddp_reference.py`) from `init` on
    `data` with the dataset's `args`, its weights written to `out`."""
    import ddp_reference

    ddp_reference.in_process("--as-one-process", "1", *args, "--data", data, "--init", init, "--out", out,
                             "--limit-train", limit, "--epochs", epochs, "--batch-size", batch)
    return str(out)
