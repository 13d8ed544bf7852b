"""`eval` on data that has some of a model's classes, as ImageNet-A/-R,
Imagenette or a user's own test folder of a few classes do, checked against
torchvision's VGG11 on the same real photographs (PNG, so both sides decode
the same pixels) at torchvision's evaluation transform:

- ImageNet's layout (`--dataset imagenet`) maps its WordNet ids to the
  model's 1,000 indices (the crane, n03126707, is 517; the crane bird, 134,
  is one of the classes the data lacks that the test makes likely
  predictions). Scored among all 1,000 classes: the loss (within 1e-5
  relative), the top-1 and top-5 counts and the confusion matrix with its
  `other` column (predicted as a class the data lacks) equal PyTorch's.
  `--only-data-classes` (ImageNet-A/-R's protocol, the others' logits left
  out): loss and confusion matrix equal PyTorch's on `logits[:, indices]`.
  `--predictions`, both ways: each image's predicted class (a class the
  data lacks by torchvision's name, without an index) and both
  probabilities (within 1e-5) are PyTorch's.
- eval reads DIR/val (or --val-dir) only: no train/ folder exists here.
- A folder named by torchvision's names maps by name, in the folder's
  sorted order; a name the model does not have is one error line naming
  it, and a WordNet id says to read ImageNet's layout.
"""
import csv
import json
import os
import subprocess

import pytest
import torch
import torchvision
import torchvision.transforms.functional as F
from safetensors.torch import load_file, save_file
from torchvision.io import ImageReadMode, decode_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("VGGCTL_BIN", os.path.join(ROOT, "target", "release", "vggctl"))
WEIGHTS = os.path.join(ROOT, "tests", "fixtures", "pth", "vgg11.legacy.pth")
PHOTOS = os.path.join(ROOT, "tests", "fixtures", "photos")
# Three WordNet ids, their torchvision indices and names, and the photos
# each class folder gets.
SUBSET = [("n01440764", 0, "tench", "astronaut"),
          ("n02123045", 281, "tabby", "cat"),
          ("n03126707", 517, "crane", "coffee")]
# Classes the data lacks that the model is made to favour too.
LACKING = [134, 999]
PER_CLASS = 3


def vggctl(*args, cwd):
    return subprocess.run([BIN, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """The model (safetensors), the ImageNet layout with val/ only, and
    PyTorch's logits and labels on it."""
    root = tmp_path_factory.mktemp("subset")
    model = torchvision.models.vgg11()
    model.load_state_dict(torch.load(WEIGHTS))
    model.eval()
    xs, ys = [], []
    for label, (wnid, _, _, photos) in enumerate(SUBSET):
        d = root / "imagenet" / "val" / wnid
        d.mkdir(parents=True)
        for name in sorted(n for n in os.listdir(os.path.join(PHOTOS, photos)) if n.endswith(".png"))[:PER_CLASS]:
            (d / name).symlink_to(os.path.join(PHOTOS, photos, name))
            img = decode_image(str(d / name), mode=ImageReadMode.RGB)
            img = F.center_crop(F.resize(img, 256, antialias=True), 224).float() / 255
            xs.append(F.normalize(img, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]))
            ys.append(label)
    x = torch.stack(xs)
    with torch.no_grad():
        # The data's classes and two others get a photo each as their
        # prototype (the last layer's row: its centred features, scaled),
        # so the predictions fall among them and follow the pixels.
        h = model.classifier[:6](torch.flatten(model.avgpool(model.features(x)), 1))
        h = h - h.mean(0)
        prototypes = [0, 3, 6, 1, 4]
        for row, p in zip([i for _, i, _, _ in SUBSET] + LACKING, prototypes):
            model.classifier[6].weight[row] = 50 * h[p] / h[p].norm()
            model.classifier[6].bias[row] = 0
        logits = model(x)
    weights = root / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    return root, weights, logits, torch.tensor(ys)


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def confusion(ys, preds, columns):
    m = torch.zeros(len(SUBSET), columns, dtype=torch.long)
    for y, p in zip(ys.tolist(), preds.tolist()):
        m[y, p] += 1
    return m.tolist()


def test_imagenet_ids_map_to_the_models_indices(setting):
    root, weights, logits, ys = setting
    indices = torch.tensor([i for _, i, _, _ in SUBSET])
    r = vggctl("eval", "--checkpoint", str(weights), "--dataset", "imagenet", "--data-dir", "imagenet",
               "--device", "cpu", "--json", "--predictions", "all.csv", cwd=root)
    assert r.returncode == 0, r.stderr
    ours = json.loads(r.stdout)
    assert ours["classes"] == [n for _, _, n, _ in SUBSET]
    assert ours["subset_of_model"] == {"model_classes": 1000, "indices": indices.tolist(), "predicted_among": "model"}
    assert ours["images"] == len(ys)
    loss = torch.nn.functional.cross_entropy(logits, indices[ys]).item()
    assert abs(ours["loss"] - loss) <= 1e-5 * loss, (ours["loss"], loss)
    # The model's prediction as the data's class, or `other` (the last column).
    back = {m: i for i, m in enumerate(indices.tolist())}
    preds = torch.tensor([back.get(p, len(SUBSET)) for p in logits.argmax(1).tolist()])
    expected = confusion(ys, preds, len(SUBSET) + 1)
    assert ours["confusion"] == expected
    # The test means something: some images land in `other`, some not.
    assert 0 < sum(row[-1] for row in expected) < len(ys), expected
    top5 = (logits.topk(5, 1).indices == indices[ys].unsqueeze(1)).any(1).sum().item()
    assert abs(ours["top5"] - 100 * top5 / len(ys)) < 1e-9
    assert abs(ours["top1"] - 100 * (preds == ys).sum().item() / len(ys)) < 1e-9
    # Each image's row: a class the data lacks has no index and the
    # model's (torchvision's) name.
    names = torchvision.models.VGG11_Weights.IMAGENET1K_V1.meta["categories"]
    probs = logits.double().softmax(1)
    rows = read_rows(root / "all.csv")
    assert len(rows) == len(ys)
    for row, y, m, p in zip(rows, ys.tolist(), logits.argmax(1).tolist(), probs):
        index = str(back[m]) if m in back else ""
        assert row["label_index"] == str(y) and row["label"] == SUBSET[y][2], row
        assert (row["predicted_index"], row["predicted"]) == (index, names[m]), (row, m)
        assert abs(float(row["probability"]) - p[m].item()) <= 1e-5, (row, p[m])
        assert abs(float(row["label_probability"]) - p[indices[y]].item()) <= 1e-5, row
    assert any(row["predicted_index"] == "" for row in rows)

    # Among the data's classes only.
    r = vggctl("eval", "--checkpoint", str(weights), "--dataset", "imagenet", "--val-dir", "imagenet/val",
               "--only-data-classes", "--device", "cpu", "--json", "--predictions", "among.csv", cwd=root)
    assert r.returncode == 0, r.stderr
    ours = json.loads(r.stdout)
    assert ours["subset_of_model"]["predicted_among"] == "data"
    among = logits[:, indices]
    loss = torch.nn.functional.cross_entropy(among, ys).item()
    assert abs(ours["loss"] - loss) <= 1e-5 * loss, (ours["loss"], loss)
    assert ours["confusion"] == confusion(ys, among.argmax(1), len(SUBSET))
    probs = among.double().softmax(1)
    for row, y, m, p in zip(read_rows(root / "among.csv"), ys.tolist(), among.argmax(1).tolist(), probs):
        assert (row["predicted_index"], row["predicted"]) == (str(m), SUBSET[m][2]), row
        assert abs(float(row["probability"]) - p[m].item()) <= 1e-5, (row, p)
        assert abs(float(row["label_probability"]) - p[y].item()) <= 1e-5, (row, p)

    # The table says how it was scored.
    r = vggctl("eval", "--checkpoint", str(weights), "--dataset", "imagenet", "--data-dir", "imagenet",
               "--device", "cpu", cwd=root)
    assert r.returncode == 0, r.stderr
    assert "The data has 3 of the model's 1000 classes; predicted among all 1000" in r.stdout, r.stdout
    assert " other\n" in r.stdout, r.stdout


def test_folders_map_by_name_or_fail_naming_the_class(setting):
    root, weights, _, _ = setting
    named = root / "named"
    for wnid, _, name, _ in SUBSET[:2]:
        (named / name).mkdir(parents=True)
        for f in sorted(os.listdir(root / "imagenet" / "val" / wnid)):
            (named / name / f).symlink_to(root / "imagenet" / "val" / wnid / f)
    r = vggctl("eval", "--checkpoint", str(weights), "--dataset", "folder", "--val-dir", "named",
               "--device", "cpu", "--input", "32", "--json", cwd=root)
    assert r.returncode == 0, r.stderr
    # Sorted folders: tabby, then tench.
    assert json.loads(r.stdout)["subset_of_model"]["indices"] == [281, 0]

    wnid = SUBSET[2][0]
    (named / wnid).symlink_to(root / "imagenet" / "val" / wnid)
    r = vggctl("eval", "--checkpoint", str(weights), "--dataset", "folder", "--val-dir", "named",
               "--device", "cpu", "--input", "32", cwd=root)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and lines[-1] == (
        f"vggctl: error: {weights}: class \"{wnid}\" of named is a WordNet id: "
        "read ImageNet's layout with --dataset imagenet"), r.stderr

    os.rename(named / wnid, named / "zebra crossing")
    r = vggctl("eval", "--checkpoint", str(weights), "--dataset", "folder", "--val-dir", "named",
               "--device", "cpu", "--input", "32", cwd=root)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and lines[-1].startswith(
        f"vggctl: error: {weights}: class \"zebra crossing\" of named is not one of the model's classes "
        "(tench, goldfish, great white shark, tiger shark, … 1000 in all)"), r.stderr


def test_weights_imagenet_is_torchvisions_file_as_predict_finds_it(setting, tmp_path):
    """`eval --weights imagenet --arch vgg11` evaluates torchvision's file
    for VGG11 (here the setting's model, saved by torch.save under
    torchvision's name in $TORCH_HOME/hub/checkpoints, with no server to
    download from) on ImageNet's layout by default: the same report as
    `--checkpoint` on that file, whose loss is PyTorch's. A model whose
    file is neither there nor downloadable is one line naming the file."""
    root, weights, logits, ys = setting
    hub = tmp_path / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    model = torchvision.models.vgg11()
    model.load_state_dict(load_file(weights))
    torch.save(model.state_dict(), hub / "vgg11-8a719046.pth")
    env = dict(os.environ, TORCH_HOME=str(tmp_path), VGGCTL_WEIGHTS_URL="http://127.0.0.1:9/none")

    def run(*args):
        return subprocess.run([BIN, "eval", *args, "--data-dir", "imagenet", "--device", "cpu", "--json"],
                              capture_output=True, text=True, timeout=300, cwd=root, env=env)

    r = run("--weights", "imagenet", "--arch", "vgg11")
    assert r.returncode == 0, r.stderr
    ours = json.loads(r.stdout)
    assert ours["checkpoint"] == str(hub / "vgg11-8a719046.pth")
    assert ours["dataset"] == "imagenet" and ours["images"] == len(ys)
    indices = torch.tensor([i for _, i, _, _ in SUBSET])
    loss = torch.nn.functional.cross_entropy(logits, indices[ys]).item()
    assert abs(ours["loss"] - loss) <= 1e-5 * loss, (ours["loss"], loss)
    by_file = run("--checkpoint", str(hub / "vgg11-8a719046.pth"))
    assert by_file.returncode == 0, by_file.stderr
    assert json.loads(by_file.stdout) == ours

    r = run("--weights", "imagenet", "--arch", "vgg13")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert lines[0].startswith(
        "vggctl: error: could not download vgg13-19584684.pth from http://127.0.0.1:9/none; "
        f"put vgg13-19584684.pth into ./weights/ or {hub}/"), r.stderr
