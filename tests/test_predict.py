"""`vggctl predict --weights imagenet` against torchvision on the same
weights (a torchvision vgg11 state dict in torch.save's legacy format, found
through $TORCH_HOME/hub/checkpoints/ under torchvision's file name) and the
same images, preprocessed by torchvision's eval transform on tensors
(Resize(256, antialias) + CenterCrop(224) + Normalize): same top-5 indices,
probabilities within 1e-3. The JPEG is decoded by a different decoder on
each side (libjpeg-turbo vs. the image crate), so for it the top-1 index and
all 1,000 probabilities (within 1e-3) are compared, not the order of the
near-zero tail. Classified two at a time (--batch-size 2: a batch of two,
then one), the same images come back in the same order with the same
probabilities within 1e-5 (a batch's size changes the CPU kernels' blocking,
so not bit for bit). A directory argument stands for its images, sorted by
name (other files ignored), with the same answers. The state dict file
given itself without --arch is recognized as a vgg11 (said on stderr) with
the same answers. `--precision bf16` on a CPU with native bf16 runs in
bf16 (same top-1, probabilities within 0.05 of fp32's); on one without, it
warns and gives the fp32 answers exactly."""
import json
import os
import subprocess

import torch
import torchvision
import torchvision.transforms.functional as F
from torchvision.io import ImageReadMode, decode_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("VGGCTL_BIN", os.path.join(ROOT, "target", "release", "vggctl"))
FIX = os.path.join(ROOT, "tests", "fixtures")
IMAGES = [
    os.path.join(FIX, "photos", "cat", "cat_01.png"),
    os.path.join(FIX, "photos", "astronaut", "astronaut_02.png"),
    os.path.join(FIX, "photos", "coffee", "coffee_00.jpg"),
]


def native_bf16():
    """What vggctl checks (AVX512-BF16, which AMX CPUs have too), from the kernel's view."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and "avx512_bf16" in line.split() for line in f)
    except OSError:
        return False


def test_predict_matches_torchvision(tmp_path):
    weights = os.path.join(FIX, "pth", "vgg11.legacy.pth")
    hub = tmp_path / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / "vgg11-8a719046.pth").symlink_to(weights)
    env = dict(os.environ, TORCH_HOME=str(tmp_path), VGGCTL_WEIGHTS_URL="http://127.0.0.1:9/none")
    def predict(*extra, warning="", images=IMAGES):
        out = subprocess.run(
            [BIN, "predict", "--weights", "imagenet", "--arch", "vgg11", "--device", "cpu", "--json",
             "--topk", "1000", *extra, *images],
            check=True, capture_output=True, text=True, env=env, cwd=tmp_path,
        )
        assert out.stderr.strip() == warning
        return json.loads(out.stdout)

    ours = predict()
    # A directory stands for its images, sorted by name.
    folder = tmp_path / "photos"
    folder.mkdir()
    names = [f"{i}-{os.path.basename(p)}" for i, p in enumerate(IMAGES)]
    for name, path in zip(names, IMAGES):
        (folder / name).symlink_to(path)
    (folder / "notes.txt").write_text("not an image")
    listed = predict(images=[str(folder)])
    assert [p["image"] for p in listed] == [str(folder / n) for n in names]
    assert [p["top"] for p in listed] == [p["top"] for p in ours]
    if native_bf16():
        # bf16 autocast on the CPU (NHWC): the same top-1, probabilities
        # within 0.05 (measured on the fixture photos: up to 0.023).
        bf16 = predict("--precision", "bf16")
        for a, b in zip(bf16, ours):
            assert a["top"][0]["index"] == b["top"][0]["index"], a["image"]
            pa = {g["index"]: g["probability"] for g in a["top"]}
            assert max(abs(pa[g["index"]] - g["probability"]) for g in b["top"]) <= 0.05, a["image"]
            assert a != b, "bf16 gave fp32's answers bit for bit: it did not run in bf16"
    else:
        bf16 = predict("--precision", "bf16", warning="warning: --precision bf16 on the CPU needs "
                       "native bf16 instructions (AVX512-BF16 or AMX), which this CPU lacks; predicting in fp32")
        assert bf16 == ours
    # The state dict file itself, without --arch: inferred, said, the same answers.
    inferred = subprocess.run(
        [BIN, "predict", "--weights", weights, "--device", "cpu", "--json", "--topk", "1000", *IMAGES],
        check=True, capture_output=True, text=True, cwd=tmp_path)
    assert inferred.stderr == f"note: {weights}: inferred vgg11 with the imagenet head and 1000 classes from its weights\n"
    assert json.loads(inferred.stdout) == ours
    by_twos = predict("--batch-size", "2")
    assert [p["image"] for p in by_twos] == [p["image"] for p in ours] == IMAGES
    for a, b in zip(by_twos, ours):
        pa = {g["index"]: g["probability"] for g in a["top"]}
        pb = {g["index"]: g["probability"] for g in b["top"]}
        assert pa.keys() == pb.keys()
        assert max(abs(pa[i] - pb[i]) for i in pa) <= 1e-5, a["image"]

    model = torchvision.models.vgg11()
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    batch = []
    for path in IMAGES:
        t = decode_image(path, mode=ImageReadMode.RGB)
        t = F.center_crop(F.resize(t, 256, antialias=True), 224)
        batch.append(F.normalize(t.float() / 255.0, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]))
    with torch.no_grad():
        probs = model(torch.stack(batch)).softmax(-1)
    p, idx = probs.topk(5, -1)
    names = torchvision.models.VGG11_Weights.IMAGENET1K_V1.meta["categories"]
    for i, pred in enumerate(ours):
        assert len(pred["top"]) == 1000
        mine = torch.zeros(1000)
        for g in pred["top"]:
            mine[g["index"]] = g["probability"]
            assert g["label"] == names[g["index"]]
        assert (mine - probs[i]).abs().max().item() <= 1e-3, pred["image"]
        top5 = [g["index"] for g in pred["top"][:5]]
        if pred["image"].endswith(".png"):
            assert top5 == idx[i].tolist(), pred["image"]
        else:
            assert top5[0] == idx[i][0].item(), pred["image"]
