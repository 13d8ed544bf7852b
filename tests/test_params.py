"""`vggctl params` cross-checked against PyTorch: parameter counts, per-layer
output shapes and multiply-adds of the same models built by torchvision
(on the meta device, so no memory is spent)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from vgg_reference import build  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("VGGCTL_BIN", os.path.join(ROOT, "target", "release", "vggctl"))


def vggctl_params(*args):
    out = subprocess.run([BIN, "params", "--json", *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


CASES = [(a, bn, h) for a in ("vgg11", "vgg13", "vgg16", "vgg19") for bn in (False, True) for h in ("imagenet", "cifar", "gap")]


@pytest.mark.parametrize("arch,bn,head", CASES)
def test_counts_shapes_and_macs(arch, bn, head):
    classes = 1000 if head == "imagenet" else 10
    size = 224 if head == "imagenet" else 32
    model = build(arch, bn, head, classes, device="meta").eval()
    shapes, macs = {}, {}

    def hook(name):
        def record(module, inputs, output):
            shapes[name] = list(output.shape[1:])
            if isinstance(module, nn.Conv2d):
                k = module.kernel_size[0] * module.kernel_size[1]
                macs[name] = output[0].numel() * module.in_channels * k
            elif isinstance(module, nn.Linear):
                macs[name] = module.in_features * module.out_features
        return record

    for name, m in model.named_modules():
        if name and not list(m.children()):
            m.register_forward_hook(hook(name))
    model(torch.empty(1, 3, size, size, device="meta"))

    args = ["--arch", arch, "--head", head] + (["--bn"] if bn else [])
    report = vggctl_params(*args)
    assert report["total_params"] == sum(p.numel() for p in model.parameters())
    assert report["input"] == size
    rows = {r["name"]: r for r in report["layers"]}
    assert set(shapes) <= set(rows), set(shapes) - set(rows)
    for name, shape in shapes.items():
        assert rows[name]["output_shape"] == shape, name
        assert rows[name]["macs"] == macs.get(name, 0), name
    assert report["total_macs"] == sum(macs.values())
