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


def test_a_model_cut_at_a_module_exports_that_modules_output(tmp_path):
    """`--layer NAME`: the model up to that module, its output the graph's,
    for VGG11-BN (cifar head, random BN statistics) cut at a BatchNorm,
    a convolution before its BatchNorm, avgpool, flatten and fc1's ReLU:
    TorchScript, ONNX (output `features`, its shape, batch 1 and 3; with
    --fold-bn too) and pt2 (the call targets and state dict
    `torch.export.export` gives of torchvision's `create_feature_extractor`
    with that one node) equal that extractor's output within 1e-5. A node
    alone: torchvision's extractor with later nodes too lets the in-place
    ReLU after a BatchNorm overwrite its output (checked here, so the
    comparison is not that)."""
    from torchvision.models.feature_extraction import create_feature_extractor
    src = str(tmp_path / "src.safetensors")
    model, classes = source_model("vgg11", True, "cifar", src)
    common = ["--weights", src, "--input", "32"]
    torch.manual_seed(2)
    x3 = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        both = create_feature_extractor(model, return_nodes=["features.5", "classifier.1"])(x3)
        assert both["features.5"].min().item() == 0.0, "the in-place ReLU no longer overwrites: revise"
    for node in ["features.5", "features.4", "avgpool", "flatten", "classifier.1"]:
        extractor = create_feature_extractor(model, return_nodes={node: "out"})
        with torch.no_grad():
            want = extractor(x3)["out"]
        assert node != "features.5" or want.min().item() < 0, "a BatchNorm output with negatives"
        ts = str(tmp_path / "cut.pt")
        vggctl("export", *common, "--layer", node, "--out", ts, "--force")
        with torch.no_grad():
            assert (torch.jit.load(ts)(x3) - want).abs().max().item() <= 1e-5, node
        for fold in ([], ["--fold-bn"]):
            path = str(tmp_path / "cut.onnx")
            out = json.loads(vggctl("export", *common, "--layer", node, "--out", path, "--force", "--json",
                                    *fold).stdout)
            assert out["layer"] == node and out["output_shape"] == [None, *want.shape[1:]]
            proto = onnx.load(path)
            onnx.checker.check_model(proto, full_check=True)
            assert [o.name for o in proto.graph.output] == ["features"]
            session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            for n in (1, 3):
                got = session.run(["features"], {"input": x3[:n].numpy()})[0]
                assert np.abs(got - want[:n].numpy()).max() <= 1e-5, (node, fold, n)
        pt2 = str(tmp_path / "cut.pt2")
        vggctl("export", *common, "--layer", node, "--out", pt2, "--force")
        ep = torch.export.load(pt2)
        with torch.no_grad():
            assert (ep.module()(x3) - want).abs().max().item() <= 1e-5, node
        batch = torch.export.Dim("batch")
        ref = torch.export.export(extractor, (torch.randn(2, 3, 32, 32),), dynamic_shapes=({0: batch},))
        targets = [[str(n.target) for n in e.graph.nodes if n.op == "call_function"] for e in (ep, ref)]
        assert targets[0] == targets[1], node
        assert list(ep.state_dict) == list(ref.state_dict), node
    for args, line in [(["--format", "safetensors"], "--layer applies to torchscript, onnx and pt2"),
                       (["--layer", "features.99"], "--layer features.99: vgg11_bn (cifar head) has no module")]:
        extra = [] if "--layer" in args else ["--layer", "features.5"]
        r = subprocess.run([BIN, "export", *common, *extra, *args, "--out", str(tmp_path / "bad.onnx")],
                           capture_output=True, text=True)
        assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(f"vggctl: error: {line}"), r.stderr
        assert not (tmp_path / "bad.onnx").exists()


def test_a_cut_model_pools_its_feature_maps(tmp_path):
    """`--layer NAME --pool avg|max`: VGG11-BN (cifar head) cut at a
    BatchNorm (negative values, so max is not the ReLU's) and at a ReLU, at
    input 64, its maps pooled to N x C. TorchScript, ONNX (with and without
    --fold-bn, batch 1 and 3) and pt2 equal torchvision's single-node
    extractor followed by `y.mean((2, 3))` or `y.amax((2, 3))` within 1e-5;
    pt2's call targets and state dict are those `torch.export.export` gives
    of that module. --pool on a vector (flatten) or without --layer is one
    usage line and writes nothing."""
    from torchvision.models.feature_extraction import create_feature_extractor
    src = str(tmp_path / "src.safetensors")
    model, _ = source_model("vgg11", True, "cifar", src)
    common = ["--weights", src, "--input", "64"]
    torch.manual_seed(4)
    x3 = torch.randn(3, 3, 64, 64)

    class Pooled(torch.nn.Module):
        def __init__(self, extractor, how):
            super().__init__()
            self.extractor, self.how = extractor, how

        def forward(self, x):
            y = self.extractor(x)["out"]
            return y.mean((2, 3)) if self.how == "avg" else y.amax((2, 3))

    for node, how in [("features.9", "max"), ("features.9", "avg"), ("features.17", "avg")]:
        ref = Pooled(create_feature_extractor(model, return_nodes={node: "out"}), how)
        with torch.no_grad():
            want = ref(x3)
        assert want.shape == (3, 256 if node == "features.9" else 512)
        args = [*common, "--layer", node, "--pool", how, "--force"]
        ts = str(tmp_path / "p.pt")
        vggctl("export", *args, "--out", ts)
        with torch.no_grad():
            assert (torch.jit.load(ts)(x3) - want).abs().max().item() <= 1e-5, (node, how)
        for fold in ([], ["--fold-bn"]):
            path = str(tmp_path / "p.onnx")
            out = json.loads(vggctl("export", *args, "--out", path, "--json", *fold).stdout)
            assert out["pool"] == how and out["output_shape"] == [None, want.shape[1]]
            proto = onnx.load(path)
            onnx.checker.check_model(proto, full_check=True)
            session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            for n in (1, 3):
                got = session.run(["features"], {"input": x3[:n].numpy()})[0]
                assert np.abs(got - want[:n].numpy()).max() <= 1e-5, (node, how, fold, n)
        pt2 = str(tmp_path / "p.pt2")
        vggctl("export", *args, "--out", pt2)
        ep = torch.export.load(pt2)
        with torch.no_grad():
            assert (ep.module()(x3) - want).abs().max().item() <= 1e-5, (node, how)
        batch = torch.export.Dim("batch")
        theirs = torch.export.export(ref, (torch.randn(2, 3, 64, 64),), dynamic_shapes=({0: batch},))
        targets = [[str(n.target) for n in e.graph.nodes if n.op == "call_function"] for e in (ep, theirs)]
        assert targets[0] == targets[1], (node, how)
        assert [k.removeprefix("extractor.") for k in theirs.state_dict] == list(ep.state_dict)
    for extra, line in [(["--layer", "flatten", "--pool", "avg"], "--pool: flatten gives a vector per image"),
                        (["--pool", "max"], "the following required arguments were not provided")]:
        r = subprocess.run([BIN, "export", *common, *extra, "--out", str(tmp_path / "bad.onnx")],
                           capture_output=True, text=True)
        assert r.returncode == 2 and line in r.stderr.strip().splitlines()[-1], r.stderr
        assert not (tmp_path / "bad.onnx").exists()
