"""Writes the reference tensors the Rust parity tests compare against:
for each model, its state dict (safetensors, torchvision names), an input and
torchvision's eval-mode logits. Usage: make_reference.py OUT_DIR"""
import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from vgg_reference import build, randomize_bn  # noqa: E402

# (arch, bn, head, classes, input size)
CASES = [(a, bn, "imagenet", 1000, 64) for a in ("vgg11", "vgg13", "vgg16", "vgg19") for bn in (False, True)]
CASES += [
    ("vgg11", False, "cifar", 10, 32),
    ("vgg16", True, "cifar", 10, 32),
    ("vgg13", True, "gap", 7, 32),
    ("vgg19", False, "gap", 10, 64),
]


def main(out):
    os.makedirs(os.path.join(out, "models"), exist_ok=True)
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
        save_file(state, os.path.join(out, "models", f"{name}.safetensors"), metadata=meta)
        save_file({"input": x, "logits": logits}, os.path.join(out, "models", f"{name}.io.safetensors"))
        print(f"wrote {name}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1])
