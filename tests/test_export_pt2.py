"""`vggctl export --format pt2` read back by PyTorch 2 itself. For vgg11 and
vgg16_bn with each head (random init, random BN statistics, the same source
models as test_export.py):

- `torch.export.load(path).module()` gives the source model's logits within
  1e-5 at the exported example batch size (2) and another (5);
- `ep.run_decompositions()` works and computes the same within 1e-5;
- the graph's call targets equal those of `torch.export.export` of the
  PyTorch model (torchvision's, or the reference head built from its parts)
  with a dynamic batch, in order;
- the parameters and buffers come back under torchvision's state-dict names,
  in torch.export's own order, and vggctl's metadata (class names) rides in
  `graph_module.meta["custom"]`.
Also: the schema version written is the one this torch reads; BatchNorm
folds away with --fold-bn; AOTInductor compiles and runs a small export on
the CPU within 1e-4; nothing but the archive is left in its directory."""
import json
import os
import shutil
import sys
import zipfile

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_export import CASES, source_model, vggctl  # noqa: E402

TOL = 1e-5


def export(tmp_path, arch, bn, head, *extra):
    src = str(tmp_path / "src.safetensors")
    model, classes = source_model(arch, bn, head, src)
    size = 32 if head == "cifar" else 64
    out = str(tmp_path / "m.pt2")
    args = ["--weights", src, "--arch", arch, "--head", head, "--classes", str(classes)]
    args += ["--input", str(size), "--format", "pt2", "--out", out, *(["--bn"] if bn else []), *extra]
    vggctl("export", *args)
    os.remove(src)
    return model, out, size, classes


def targets(ep):
    return [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("arch,bn,head", CASES)
def test_pt2_loads_runs_and_matches_torch_export(tmp_path, arch, bn, head):
    model, path, size, classes = export(tmp_path, arch, bn, head)
    assert sorted(os.listdir(tmp_path)) == ["m.pt2"], "no temporary file left"
    ep = torch.export.load(path)
    torch.manual_seed(3)
    for batch in (2, 5):
        x = torch.randn(batch, 3, size, size)
        with torch.no_grad():
            want = model(x)
            got = ep.module()(x)
        assert (got - want).abs().max().item() <= TOL, batch
    with torch.no_grad():
        decomposed = ep.run_decompositions().module()(x)
    assert (decomposed - want).abs().max().item() <= TOL

    batch = torch.export.Dim("batch")
    ref = torch.export.export(model, (torch.randn(2, 3, size, size),), dynamic_shapes=({0: batch},))
    assert targets(ep) == targets(ref)
    assert list(ep.state_dict) == list(ref.state_dict)
    assert set(ep.state_dict) == set(model.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(ep.state_dict[k], v), k
    meta = ep.graph_module.meta["custom"]["vggctl"]
    assert meta["arch"] == arch and meta["bn"] == str(bn).lower()
    assert len(json.loads(meta["class_names"])) == classes


def test_schema_version_is_the_one_this_torch_reads(tmp_path):
    from torch._export.serde.schema import SCHEMA_VERSION

    _, path, _, _ = export(tmp_path, "vgg11", False, "gap")
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n.endswith("models/model.json"))
        program = json.loads(z.read(name))
    written = (program["schema_version"]["major"], program["schema_version"]["minor"])
    assert written == tuple(SCHEMA_VERSION), (
        f"vggctl writes ExportedProgram schema {written}, but torch {torch.__version__} "
        f"has {tuple(SCHEMA_VERSION)}: update src/export/pt2.rs (SCHEMA_VERSION and the "
        "graph it writes) for the new torch"
    )


def test_fold_bn_leaves_no_batch_norm(tmp_path):
    model, path, size, _ = export(tmp_path, "vgg11", True, "cifar", "--fold-bn")
    ep = torch.export.load(path)
    assert not any("batch_norm" in t for t in targets(ep))
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        assert (ep.module()(x) - model(x)).abs().max().item() <= 1e-4


def test_aot_inductor_compiles_and_runs_it(tmp_path):
    if not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("no C++ compiler on this machine: AOTInductor needs one")
    model, path, size, _ = export(tmp_path, "vgg11", False, "gap")
    ep = torch.export.load(path)
    package = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "aoti.pt2"))
    run = torch._inductor.aoti_load_package(package)
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        assert (run(x) - model(x)).abs().max().item() <= 1e-4
