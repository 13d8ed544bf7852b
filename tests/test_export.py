"""`vggctl export` read back by the tools users deploy with. For vgg11 with
each head and vgg16_bn with the cifar and gap heads (the ImageNet head's
550 MB model once, without BatchNorm, keeps the suite's time), on a 64x64
input (32x32 for the cifar head), batch 3:

- safetensors: torchvision's (or the reference head's) `load_state_dict(strict=True)`
  accepts it, BN `num_batches_tracked` is int64, and the logits equal the
  source model's within 1e-4;
- TorchScript: `torch.jit.load` runs it, also at a batch size other than the
  traced one, within 1e-4;
- ONNX: `onnx.checker.check_model(full_check=True)` passes and onnxruntime's
  logits agree within 1e-4 at batch sizes 1 and 3, with and without --fold-bn.

The source model is a PyTorch model (random init, random BN statistics),
written as a torchvision-named safetensors file and exported by vggctl."""
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(__file__))
from vgg_reference import build  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("VGGCTL_BIN", os.path.join(ROOT, "target", "release", "vggctl"))
TOL = 1e-4
CASES = [(a, bn, h) for a, bn in (("vgg11", False), ("vgg16", True)) for h in ("imagenet", "cifar", "gap")
         if (a, h) != ("vgg16", "imagenet")]


def vggctl(*args):
    return subprocess.run([BIN, *args], check=True, capture_output=True, text=True)


def source_model(arch, bn, head, path):
    torch.manual_seed(7)
    classes = 1000 if head == "imagenet" else 10
    model = build(arch, bn, head, classes)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.num_batches_tracked.fill_(11)
    model.eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return model, classes


@pytest.mark.parametrize("arch,bn,head", CASES)
def test_exports_compute_what_the_model_computes(tmp_path, arch, bn, head):
    src = str(tmp_path / "src.safetensors")
    model, classes = source_model(arch, bn, head, src)
    size = 32 if head == "cifar" else 64
    common = ["--weights", src, "--arch", arch, "--head", head, "--classes", str(classes), "--input", str(size)]
    if bn:
        common.append("--bn")
    torch.manual_seed(1)
    x3 = torch.randn(3, 3, size, size)
    with torch.no_grad():
        want3 = model(x3)

    # safetensors -> PyTorch, strict.
    st = str(tmp_path / "m.safetensors")
    out = vggctl("export", *common, "--format", "safetensors", "--out", st)
    assert st in out.stdout and "MiB, safetensors, " in out.stdout
    again = build(arch, bn, head, classes)
    again.load_state_dict(load_file(st), strict=True)
    again.eval()
    with torch.no_grad():
        assert (again(x3) - want3).abs().max().item() <= TOL
    with safe_open(st, "pt") as f:
        meta = f.metadata()
        assert meta["arch"] == arch and meta["head"] == head and meta["bn"] == str(bn).lower()
        assert len(json.loads(meta["class_names"])) == classes
        if bn:
            assert f.get_tensor("features.1.num_batches_tracked").dtype == torch.int64
            assert f.get_tensor("features.1.num_batches_tracked").item() == 11

    # TorchScript, at the traced batch size and another.
    ts = str(tmp_path / "m.pt")
    vggctl("export", *common, "--format", "torchscript", "--out", ts)
    scripted = torch.jit.load(ts)
    with torch.no_grad():
        assert (scripted(x3) - want3).abs().max().item() <= TOL
        x5 = torch.randn(5, 3, size, size)
        assert (scripted(x5) - model(x5)).abs().max().item() <= TOL

    # ONNX, plain and with BatchNorm folded.
    for fold in ([], ["--fold-bn"]) if bn else ([],):
        path = str(tmp_path / f"m{len(fold)}.onnx")
        vggctl("export", *common, "--format", "onnx", "--out", path, *fold)
        proto = onnx.load(path)
        onnx.checker.check_model(proto, full_check=True)
        assert proto.opset_import[0].version >= 17
        assert [i.name for i in proto.graph.input] == ["input"]
        assert [o.name for o in proto.graph.output] == ["logits"]
        ops = {n.op_type for n in proto.graph.node}
        assert ("BatchNormalization" in ops) == (bn and not fold), ops
        props = {p.key: p.value for p in proto.metadata_props}
        assert len(json.loads(props["class_names"])) == classes
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        for n in (1, 3):
            got = session.run(["logits"], {"input": x3[:n].numpy()})[0]
            assert np.abs(got - want3[:n].numpy()).max() <= TOL, (fold, n)


def test_half_safetensors_load_into_torchvision(tmp_path):
    src = str(tmp_path / "src.safetensors")
    model, classes = source_model("vgg11", False, "cifar", src)
    out = str(tmp_path / "half.safetensors")
    vggctl("export", "--weights", src, "--arch", "vgg11", "--head", "cifar", "--format", "safetensors", "--half", "--out", out)
    sd = load_file(out)
    assert sd["features.0.weight"].dtype == torch.float16
    again = build("vgg11", False, "cifar", classes)
    again.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v.half().float())
