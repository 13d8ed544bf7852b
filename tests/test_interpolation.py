"""`--interpolation bicubic` (torchvision's reference train.py
--interpolation): every resize of an image folder's images uses it, and
the checkpoint carries it to `eval` and `predict`.

- `train --dataset imagenet --interpolation bicubic` on real photographs
  (PNG) in ImageNet's layout says so in its header, records it
  (config.json, the checkpoint's `interpolation`), and its validation loss
  is that of torchvision's VGG11 with the saved weights under
  `Resize(72, BICUBIC) + CenterCrop(64)` on uint8 tensors (within 1e-5
  relative), which bilinear resizing misses by more than that.
- `eval` of the checkpoint gets the same loss in memory and streamed;
  `eval --interpolation bilinear` gets torchvision's bilinear loss;
  `predict` gets torchvision's probabilities (within 1e-5).
- Unused or bad: `--interpolation` on the digits is warned of (by train
  and eval); an unknown
  mode is one usage line; a checkpoint whose metadata names an unknown
  interpolation is one error line naming it.

(Bicubic training crops are unit tests: the device's against
`F.resized_crop(..., BICUBIC)` in `tests/data_cifar.rs`, the streamed
workers' against the in-memory ones in `tests/data_stream.rs`; the host
resize against libtorch's in `src/data/resize.rs`.)
"""
import json

import torch
import torchvision.transforms.functional as F
from safetensors.torch import load_file, save_file
from torchvision.io import ImageReadMode, decode_image

from test_image_sides import WNIDS, imagenet_layout, metadata, torchvision_model, vggctl

BICUBIC = F.InterpolationMode.BICUBIC
BILINEAR = F.InterpolationMode.BILINEAR


def eval_input(path, resize, crop, mode):
    img = decode_image(str(path), mode=ImageReadMode.RGB)
    img = F.center_crop(F.resize(img, resize, interpolation=mode, antialias=True), crop).float() / 255
    return F.normalize(img, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def torchvision_loss(weights, val, mode):
    xs, ys = [], []
    for i, wnid in enumerate(sorted(WNIDS.values())):
        for name in sorted((val / wnid).iterdir()):
            xs.append(eval_input(name, 72, 64, mode))
            ys.append(i)
    with torch.no_grad():
        logits = torchvision_model(weights)(torch.stack(xs))
    return torch.nn.functional.cross_entropy(logits, torch.tensor(ys)).item()


def sharp_weights(checkpoint, path):
    """`checkpoint`'s metadata with torchvision's initialization of its
    model (seeded), the last layer's weights times 30."""
    torch.manual_seed(0)
    model = torchvision_model(checkpoint)
    fresh = torch.nn.Sequential(*[m for m in [model.features, model.avgpool, model.classifier]])
    for m in fresh.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            torch.nn.init.zeros_(m.bias)
        elif isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, 0, 0.01)
            torch.nn.init.zeros_(m.bias)
    with torch.no_grad():
        model.classifier.weight *= 30
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=metadata(checkpoint))
    return path


def close(a, b):
    return abs(a - b) <= 1e-5 * abs(b)


def test_bicubic_runs_evaluate_and_predict_as_torchvision(tmp_path):
    data = imagenet_layout(tmp_path / "imagenet")
    out = tmp_path / "run"
    r = vggctl("train", "--arch", "vgg11", "--head", "gap", "--dataset", "imagenet", "--data-dir", str(data),
               "--input", "64", "--val-resize-size", "72", "--interpolation", "bicubic",
               "--epochs", "1", "--batch-size", "3", "--keep", "last", "--out", str(out),
               "--cache-dir", str(tmp_path / "cache"))
    assert r.returncode == 0, r.stderr
    assert "64x64 (resized to 72 first), resized bicubic)" in r.stderr, r.stderr
    assert json.loads((out / "config.json").read_text())["interpolation"] == "bicubic"
    trained = out / "last.safetensors"
    assert metadata(trained)["interpolation"] == "bicubic"
    ran = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["test_loss"]
    assert close(ran, torchvision_loss(trained, data / "val", BICUBIC)), ran

    # One epoch leaves every photo near the same logits, which hides the
    # filter: the checks below use the run's checkpoint with torchvision's
    # freshly initialized weights, the head's scaled up, which tell them
    # apart.
    weights = sharp_weights(trained, tmp_path / "sharp.safetensors")
    bicubic = torchvision_loss(weights, data / "val", BICUBIC)
    bilinear = torchvision_loss(weights, data / "val", BILINEAR)
    assert not close(bilinear, bicubic), (bilinear, bicubic)

    for how in [[], ["--cache-mem", "0"]]:
        r = vggctl("eval", "--checkpoint", str(weights), "--data-dir", str(data), "--json", "--cache-dir", str(tmp_path / "cache"), *how)
        assert r.returncode == 0, r.stderr
        assert close(json.loads(r.stdout)["loss"], bicubic), (how, r.stdout, bicubic)
    r = vggctl("eval", "--checkpoint", str(weights), "--data-dir", str(data), "--json", "--interpolation", "bilinear",
               "--cache-dir", str(tmp_path / "cache"))
    assert r.returncode == 0, r.stderr
    assert close(json.loads(r.stdout)["loss"], bilinear), (r.stdout, bilinear)

    image = sorted((data / "val" / WNIDS["cat"]).iterdir())[0]
    r = vggctl("predict", "--checkpoint", str(weights), "--json", str(image))
    assert r.returncode == 0, r.stderr
    ours = {t["index"]: t["probability"] for t in json.loads(r.stdout)[0]["top"]}
    with torch.no_grad():
        want = torchvision_model(weights)(eval_input(image, 72, 64, BICUBIC)[None]).softmax(1)[0].tolist()
    assert all(abs(ours[i] - want[i]) <= 1e-5 for i in ours), (ours, want)

    # A checkpoint naming an interpolation vggctl does not know.
    tensors = load_file(str(weights))
    meta = metadata(weights)
    meta["interpolation"] = "lanczos"
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    r = vggctl("eval", "--checkpoint", str(bad))
    lines = r.stderr.splitlines()
    assert r.returncode == 1 and len(lines) == 1 and "bad.safetensors" in lines[0], r.stderr
    assert "unknown metadata 'interpolation' 'lanczos' (expected bilinear or bicubic)" in lines[0], r.stderr


def test_interpolation_unused_or_unknown(tmp_path):
    out = tmp_path / "digits"
    r = vggctl("train", "--arch", "vgg11", "--dataset", "digits", "--interpolation", "bicubic", "--epochs", "1",
               "--limit-train", "32", "--limit-test", "32", "--keep", "last", "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    assert "--interpolation is ignored: it applies to image folders only (--dataset folder, imagenet, imagenette*, oxford-pets, flowers102, food101, dtd, fgvc-aircraft*, stanford-cars, gtsrb, eurosat, caltech101, caltech256, sun397, country211 or places365*)" in r.stderr, \
        r.stderr
    r = vggctl("eval", "--checkpoint", str(out / "last.safetensors"), "--interpolation", "bicubic", "--json")
    assert r.returncode == 0, r.stderr
    assert "--interpolation is ignored: it applies to image folders only, and digits images are not resized" \
        in r.stderr, r.stderr
    r = vggctl("train", "--dataset", "digits", "--interpolation", "lanczos", "--out", str(tmp_path / "never"))
    assert r.returncode == 2 and "invalid value 'lanczos' for '--interpolation <MODE>'" in r.stderr, r.stderr
    assert not (tmp_path / "never").exists()
