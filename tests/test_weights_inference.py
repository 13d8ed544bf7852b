"""Plain torchvision state dicts carry no metadata: `export`, `eval` and
`predict` given one without --arch/--bn/--head/--classes infer the model from
its names and shapes and say so on stderr. Every VGG of torchvision
(`torchvision.models.vgg11` .. `vgg19_bn`, saved with `torch.save`) is
recognized, with the small heads vggctl trains (`cifar`: torchvision's VGG
with `avgpool` 1x1 and a 512-512-N classifier; `gap`: one Linear(512, N));
the file vggctl then writes holds the very tensors torchvision saved. A flag
that contradicts the weights is one error line naming both.

`eval --checkpoint` takes torchvision's `.pth` too, told apart by content,
and evaluates the ImageNet head as torchvision's reference does (resize 256,
centre crop 224, ImageNet's mean and std): on real photographs (PNG, so
both sides decode the same pixels) the loss equals torchvision's within 1e-5
relative and the confusion matrix is the same. `predict --checkpoint` given
a `.pth` says to pass it as --weights."""
import json
import os
import subprocess

import pytest
import torch
import torchvision
import torchvision.transforms.functional as F
from safetensors.torch import load_file
from torchvision.io import ImageReadMode, decode_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("VGGCTL_BIN", os.path.join(ROOT, "target", "release", "vggctl"))
PHOTOS = os.path.join(ROOT, "tests", "fixtures", "photos")
ARCHS = ["vgg11", "vgg13", "vgg16", "vgg19"]


def torchvision_vgg(name, head, classes):
    """torchvision's model `name` with one of vggctl's small heads."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)()
    model.avgpool = torch.nn.AdaptiveAvgPool2d(1)
    if head == "cifar":
        model.classifier = torch.nn.Sequential(
            torch.nn.Linear(512, 512), torch.nn.ReLU(True), torch.nn.Dropout(), torch.nn.Linear(512, classes))
    else:
        model.classifier = torch.nn.Linear(512, classes)
    return model


def run(*args, cwd):
    return subprocess.run([BIN, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_vgg_is_recognized(tmp_path, arch):
    for bn, (head, classes) in [(False, ("cifar", 10)), (True, ("gap", 7))]:
        name = arch + ("_bn" if bn else "")
        model = torchvision_vgg(name, head, classes)
        pth = tmp_path / f"{name}.pth"
        torch.save(model.state_dict(), pth)
        out = tmp_path / f"{name}.safetensors"
        r = run("export", "--weights", str(pth), "--out", str(out), "--json", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert r.stderr == f"note: {pth}: inferred {name} with the {head} head and {classes} classes from its weights\n"
        written = json.loads(r.stdout)
        assert (written["model"], written["head"], written["classes"]) == (name, head, classes)
        ours = load_file(out)
        theirs = model.state_dict()
        assert ours.keys() == theirs.keys()
        for k, t in theirs.items():
            assert torch.equal(ours[k], t), k


def test_flags_that_agree_or_contradict(tmp_path):
    pth = tmp_path / "w.pth"
    torch.save(torchvision_vgg("vgg11_bn", "cifar", 10).state_dict(), pth)
    out = tmp_path / "w.safetensors"
    # Flags that say it all: no note.
    r = run("export", "--weights", str(pth), "--out", str(out), "--arch", "vgg11_bn",
            "--head", "cifar", "--classes", "10", cwd=tmp_path)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    what = f"vggctl: error: {pth}: the weights are a vgg11_bn with the cifar head and 10 classes, but "
    for flags, said in [(["--arch", "vgg16"], "--arch says vgg16"),
                        (["--arch", "vgg11"], "--arch says vgg11 (no BatchNorm)"),
                        (["--head", "gap"], "--head says gap"),
                        (["--classes", "100"], "--classes says 100")]:
        r = run("export", "--weights", str(pth), "--out", str(tmp_path / "no.onnx"), *flags, cwd=tmp_path)
        assert (r.returncode, r.stderr) == (1, what + said + "\n")
        assert not (tmp_path / "no.onnx").exists()


def test_eval_takes_torchvisions_pth_and_its_eval_transform(tmp_path):
    data = tmp_path / "photos"
    classes = sorted(os.listdir(PHOTOS))
    for c in classes:
        (data / c).mkdir(parents=True)
        for name in sorted(n for n in os.listdir(os.path.join(PHOTOS, c)) if n.endswith(".png"))[:3]:
            (data / c / name).symlink_to(os.path.join(PHOTOS, c, name))
    torch.manual_seed(0)
    model = torchvision.models.vgg11(num_classes=len(classes)).eval()
    with torch.no_grad():
        # Large logits, so the loss and the predictions depend on the pixels.
        model.classifier[6].weight.mul_(300)
    pth = tmp_path / "w.pth"
    torch.save(model.state_dict(), pth)

    xs, ys = [], []
    for i, c in enumerate(classes):
        for name in sorted(os.listdir(data / c)):
            img = decode_image(str(data / c / name), mode=ImageReadMode.RGB)
            img = F.center_crop(F.resize(img, 256, antialias=True), 224).float() / 255
            xs.append(F.normalize(img, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]))
            ys.append(i)
    with torch.no_grad():
        logits = model(torch.stack(xs))
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(ys)).item()
    confusion = torch.zeros(len(classes), len(classes), dtype=torch.long)
    for y, p in zip(ys, logits.argmax(1).tolist()):
        confusion[y, p] += 1

    r = run("eval", "--checkpoint", str(pth), "--dataset", "folder", "--data-dir", str(data),
            "--val-dir", str(data), "--device", "cpu", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stderr == f"note: {pth}: inferred vgg11 with the imagenet head and 3 classes from its weights\n"
    ours = json.loads(r.stdout)
    assert ours["images"] == len(ys)
    assert abs(ours["loss"] - loss) <= 1e-5 * loss, (ours["loss"], loss)
    assert ours["confusion"] == confusion.tolist()

    r = run("predict", "--checkpoint", str(pth), str(next((data / classes[0]).iterdir())), cwd=tmp_path)
    assert (r.returncode, r.stderr) == (
        1, f"vggctl: error: {pth}: a torch.save file, not a vggctl checkpoint (safetensors); "
           f"pass it as --weights {pth}\n")


def test_an_imagenet_head_reads_cifar_images_whole_at_its_input(tmp_path):
    """A plain state dict with the ImageNet head evaluated on CIFAR-10 (32x32
    images, read whole) at --input 64: each image bilinearly resized to
    64x64 and normalized with ImageNet's mean and std, as
    `F.interpolate` does it in PyTorch (loss within 1e-5 relative, the same
    confusion matrix); its eval transform's resize before a crop is for
    image files (it once cropped 64 out of 32 and failed in libtorch).
    --val-resize-size with CIFAR-10 is one usage line."""
    torch.manual_seed(0)
    model = torchvision.models.vgg11(num_classes=10).eval()
    with torch.no_grad():
        model.classifier[6].weight.mul_(300)
    pth = tmp_path / "w.pth"
    torch.save(model.state_dict(), pth)
    data = os.path.join(ROOT, "tests", "fixtures", "digits-bin")
    n = 24
    raw = open(os.path.join(data, "cifar-10-batches-bin", "test_batch.bin"), "rb").read()[:n * 3073]
    records = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(n, 3073)
    ys, images = records[:, 0].long(), records[:, 1:].reshape(n, 3, 32, 32)
    x = torch.nn.functional.interpolate(images.float() / 255, size=(64, 64), mode="bilinear", align_corners=False)
    x = F.normalize(x, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    with torch.no_grad():
        logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits, ys).item()
    confusion = torch.zeros(10, 10, dtype=torch.long)
    for y, p in zip(ys.tolist(), logits.argmax(1).tolist()):
        confusion[y, p] += 1

    common = ("eval", "--checkpoint", str(pth), "--dataset", "cifar10", "--data-dir", data, "--no-download",
              "--input", "64", "--device", "cpu")
    r = run(*common, "--limit-test", str(n), "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    ours = json.loads(r.stdout)
    assert ours["images"] == n
    assert abs(ours["loss"] - loss) <= 1e-5 * loss, (ours["loss"], loss)
    assert ours["confusion"] == confusion.tolist()

    r = run(*common, "--val-resize-size", "80", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.endswith(
        "vggctl: error: --val-resize-size: cifar10's images are read whole, resized to the input, "
        "with no resize before a crop\n"), r.stderr
