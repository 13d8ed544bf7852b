"""Writes torch.save files for the native .pth reader's tests:

- pth/vgg11.legacy.pth, pth/vgg16_bn.zip.pth: full torchvision ImageNet-head
  state dicts (random init, fixed seed), the first in the legacy format
  (`_use_new_zipfile_serialization=False`, as torchvision's published files
  are), the second in the zip format; <model>.io.safetensors: an input and
  torchvision's eval-mode logits. These are also the ImageNet-head parity
  fixtures, and the weights the fine-tuning and predict tests start from.
- pth/<small>.{zip,legacy,zip-fp16,legacy-fp16}.pth for vgg11-cifar and
  vgg11_bn-cifar: every format x dtype combination on models small enough to
  keep the fixtures within a CI machine's disk; <small>.io.safetensors: an
  input and the logits for the fp32 and the fp16-rounded weights;
- pth/views.{zip,legacy}.pth + views.expected.safetensors: tensors sharing a
  storage at offsets and with strides, and every storage dtype;
- pth/checkpoint.legacy.pth: a training checkpoint {'model': state_dict, 'epoch': 3}.

Usage: make_pth.py OUT_DIR"""
import collections
import os
import shutil
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from vgg_reference import build, randomize_bn  # noqa: E402


def save(obj, path, legacy):
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)


def model_for(seed, arch, bn, head, classes):
    torch.manual_seed(seed)
    model = build(arch, bn, head, classes).eval()
    if bn:
        randomize_bn(model, 0)
    return model


def main(out):
    d = os.path.join(out, "pth")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)

    for i, (arch, bn, fmt) in enumerate([("vgg11", False, "legacy"), ("vgg16", True, "zip")]):
        name = arch + ("_bn" if bn else "")
        model = model_for(2000 + i, arch, bn, "imagenet", 1000)
        with torch.no_grad():
            # A random-init model predicts near-uniformly; a sharper last
            # layer gives predict's top-5 test distinct probabilities.
            model.classifier[6].weight.mul_(400.0)
        x = torch.randn(2, 3, 64, 64)
        sd = model.state_dict()
        save(sd, os.path.join(d, f"{name}.{fmt}.pth"), legacy=fmt == "legacy")
        with torch.no_grad():
            logits = model(x)
        save_file({"input": x, "logits": logits}, os.path.join(d, f"{name}.io.safetensors"))

    for i, (arch, bn) in enumerate([("vgg11", False), ("vgg11", True)]):
        name = arch + ("_bn" if bn else "") + "-cifar"
        model = model_for(2100 + i, arch, bn, "cifar", 10)
        x = torch.randn(2, 3, 32, 32)
        # Copies: the model is loaded with fp16-rounded weights below.
        sd = collections.OrderedDict((k, v.clone()) for k, v in model.state_dict().items())
        save(sd, os.path.join(d, f"{name}.zip.pth"), legacy=False)
        save(sd, os.path.join(d, f"{name}.legacy.pth"), legacy=True)
        half = collections.OrderedDict((k, v.half() if v.is_floating_point() else v) for k, v in sd.items())
        save(half, os.path.join(d, f"{name}.legacy-fp16.pth"), legacy=True)
        save(half, os.path.join(d, f"{name}.zip-fp16.pth"), legacy=False)
        with torch.no_grad():
            logits = model(x)
            model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in half.items()})
            logits16 = model(x)
        save_file({"input": x, "logits": logits, "logits_fp16": logits16}, os.path.join(d, f"{name}.io.safetensors"))
        if not bn:
            save({"model": sd, "epoch": 3, "best_acc1": 71.2}, os.path.join(d, "checkpoint.legacy.pth"), legacy=True)

    base = torch.arange(48, dtype=torch.float32).view(6, 8)
    views = collections.OrderedDict(
        [
            ("whole", base),
            ("slice", base[1:4, 2:7]),  # offset + strides into the same storage
            ("transposed", base.t()),
            ("row", base[5]),
            ("f16", torch.linspace(-2, 2, 7).half()),
            ("bf16", torch.linspace(-3, 3, 5).bfloat16()),
            ("f64", torch.linspace(0, 1, 4).double()),
            ("i64", torch.tensor([-(2**40), 0, 7])),
            ("i32", torch.tensor([-5, 9], dtype=torch.int32)),
            ("i16", torch.tensor([-300, 300], dtype=torch.int16)),
            ("i8", torch.tensor([-7, 8], dtype=torch.int8)),
            ("u8", torch.tensor([0, 255], dtype=torch.uint8)),
            ("bool", torch.tensor([True, False, True])),
            ("scalar", torch.tensor(42)),
            ("empty", torch.zeros(0, 3)),
        ]
    )
    save(views, os.path.join(d, "views.zip.pth"), legacy=False)
    save(views, os.path.join(d, "views.legacy.pth"), legacy=True)
    save_file({k: v.clone().contiguous() for k, v in views.items()}, os.path.join(d, "views.expected.safetensors"))
    print("wrote torch.save fixtures", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1])
