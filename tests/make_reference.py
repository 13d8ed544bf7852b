"""Writes the reference tensors the Rust parity tests compare against: for
every arch with and without BatchNorm, a small-head model's state dict
(safetensors, torchvision names), an input and torchvision's eval-mode logits.

The ImageNet head (25088 -> 4096 -> 4096 -> 1000, ~530 MB per model) is
checked on the full-size torchvision state dicts that make_pth.py writes, so
that no 500 MB file exists twice: the fixtures must fit a CI machine's disk.
Usage: make_reference.py OUT_DIR"""
import os
import shutil
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from vgg_reference import build, randomize_bn  # noqa: E402

# (arch, bn, head, classes, input size): each arch +-BN once, both small
# heads, 32x32 and 64x64 inputs (the cifar head's adaptive pool at 64).
CASES = [
    ("vgg11", False, "cifar", 10, 32),
    ("vgg11", True, "gap", 7, 64),
    ("vgg13", False, "gap", 10, 32),
    ("vgg13", True, "gap", 7, 32),
    ("vgg16", False, "cifar", 10, 64),
    ("vgg16", True, "cifar", 10, 32),
    ("vgg19", False, "gap", 10, 64),
    ("vgg19", True, "cifar", 5, 32),
]


def main(out):
    d = os.path.join(out, "models")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    for i, (arch, bn, head, classes, size) in enumerate(CASES):
        name = f"{arch}{'_bn' if bn else ''}-{head}"
        torch.manual_seed(1000 + i)
        model = build(arch, bn, head, classes)
        if bn:
            randomize_bn(model, i + 7)
        model.eval()
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            logits = model(x)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        meta = {"arch": arch, "bn": str(bn).lower(), "head": head, "classes": str(classes)}
        save_file(state, os.path.join(d, f"{name}.safetensors"), metadata=meta)
        save_file({"input": x, "logits": logits}, os.path.join(d, f"{name}.io.safetensors"))
        print(f"wrote {name}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1])
