"""What the dataset tests (test_cifar100.py, test_mnist.py, test_svhn.py)
share: where things are, how far two state dicts are apart, and a local
mirror serving a folder's files on 127.0.0.1."""
import contextlib
import functools
import hashlib
import http.server
import os
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("VGGCTL_BIN", os.path.join(ROOT, "target", "release", "vggctl"))
FIX = os.path.join(ROOT, "tests", "fixtures")
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def apart(a, b):
    """The largest difference between two state dicts, relative to 1 + |b|."""
    return max(((a[k].double() - b[k].double()).abs() / (1 + b[k].double().abs())).max().item() for k in b)


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


def reference(out, init, data, *args, limit, batch, epochs):
    """PyTorch's one-process training (`ddp_reference.py`) from `init` on
    `data` with the dataset's `args`, its weights written to `out`."""
    import ddp_reference

    ddp_reference.in_process("--as-one-process", "1", *args, "--data", data, "--init", init, "--out", out,
                             "--limit-train", limit, "--epochs", epochs, "--batch-size", batch)
    return str(out)
