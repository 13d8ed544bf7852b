"""Writes the real-image fixtures the data and training tests use:

- digits-bin/cifar-10-batches-bin/ and digits-py/cifar-10-batches-py/:
  scikit-learn's 1,797 real 8x8 handwritten digits, upscaled to 32x32 RGB,
  as a CIFAR-10 dataset in both published layouts (binary records; Python
  pickles with protocol 2, like the originals), with one fixed train/test split;
- digits-bin/cifar-100-binary/ and digits-py/cifar-100-python/: the same
  images and split as a CIFAR-100 dataset in both layouts (one training
  file; digit d's fine label 10*d + 3, its coarse label d // 2; 100 fine and
  20 coarse class names);
- digits-bin/MNIST/raw/ and digits-bin/FashionMNIST/raw/: the same digits
  and split at 28x28 gray as torchvision's MNIST and FashionMNIST folders
  (the four IDX files; Fashion-MNIST's label of digit d is 9 - d), and in
  digits-py/ the same files only as their .gz;
- digits-bin/{train,test}_32x32.mat and the same in digits-py/: the 32x32
  digits as torchvision's SVHN files (X 32x32x3xN uint8, y N x 1 with the
  digit 0 labelled 10; y stored as double and uncompressed in digits-bin,
  as uint8 and zlib-compressed, MATLAB's -v7, in digits-py);
- photos/<class>/*.png|jpg: scikit-image photographs as a 3-class image folder;
- augment.safetensors: scikit-image photographs at 32x32 with explicit crop
  offsets and flip decisions, and what torchvision's transforms make of them;
- resized_crop.safetensors: 20,000 boxes from torchvision's
  RandomResizedCrop.get_params for each of three image shapes (square,
  landscape, portrait), and photographs cropped to given boxes, resized
  (F.resized_crop, antialiased bilinear, and bicubic) and flipped.
- eval_transform.safetensors: photographs of five sizes and torchvision's
  Resize(256, antialias) + CenterCrop(224) of each, bilinear and bicubic,
  as uint8.

Usage: make_datasets.py OUT_DIR"""
import gzip
import os
import pickle
import sys

import numpy as np
import torch
import torch.nn.functional as tnf
import torchvision.transforms.functional as F
from PIL import Image
from safetensors.torch import save_file
from skimage import data as skdata
from sklearn.datasets import load_digits

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
TEST = 297  # the rest (1,500) is split into five training batches of 300


def digits_as_cifar():
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] * (255.0 / 16.0)
    x = tnf.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    x = x.round().clamp(0, 255).to(torch.uint8).repeat(1, 3, 1, 1)  # N x 3 x 32 x 32
    y = np.asarray(d.target, dtype=np.int64)
    order = np.random.RandomState(0).permutation(len(y))
    x, y = x.numpy()[order].reshape(len(y), 3072), y[order]
    return (x[TEST:], y[TEST:]), (x[:TEST], y[:TEST])


def write_bin(root, batches, test):
    d = os.path.join(root, "cifar-10-batches-bin")
    os.makedirs(d, exist_ok=True)
    for name, (x, y) in list(zip([f"data_batch_{i}.bin" for i in range(1, 6)], batches)) + [("test_batch.bin", test)]:
        recs = np.concatenate([y.astype(np.uint8)[:, None], x], axis=1)
        recs.tofile(os.path.join(d, name))
    with open(os.path.join(d, "batches.meta.txt"), "w") as f:
        f.write("\n".join(NAMES) + "\n\n")


def write_py(root, batches, test):
    d = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(d, exist_ok=True)
    named = list(zip([f"data_batch_{i}" for i in range(1, 6)], batches)) + [("test_batch", test)]
    for name, (x, y) in named:
        entry = {
            "batch_label": f"{name} of digits",
            "labels": [int(v) for v in y],
            "data": np.ascontiguousarray(x),
            "filenames": [f"digit_{i}.png" for i in range(len(y))],
        }
        with open(os.path.join(d, name), "wb") as f:
            pickle.dump(entry, f, protocol=2)
    with open(os.path.join(d, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": NAMES, "num_cases_per_batch": 300, "num_vis": 3072}, f, protocol=2)


FINE = [f"fine_{i:02d}" for i in range(100)]
COARSE = [f"coarse_{i:02d}" for i in range(20)]


def write_bin100(root, train, test):
    d = os.path.join(root, "cifar-100-binary")
    os.makedirs(d, exist_ok=True)
    for name, (x, y) in [("train.bin", train), ("test.bin", test)]:
        labels = np.stack([y // 2, 10 * y + 3], axis=1).astype(np.uint8)
        np.concatenate([labels, x], axis=1).tofile(os.path.join(d, name))
    for name, names in [("fine_label_names.txt", FINE), ("coarse_label_names.txt", COARSE)]:
        with open(os.path.join(d, name), "w") as f:
            f.write("\n".join(names) + "\n\n")


def write_py100(root, train, test):
    d = os.path.join(root, "cifar-100-python")
    os.makedirs(d, exist_ok=True)
    for name, (x, y) in [("train", train), ("test", test)]:
        entry = {
            "filenames": [f"digit_{i}.png" for i in range(len(y))],
            "batch_label": f"{name} of digits",
            "fine_labels": [int(10 * v + 3) for v in y],
            "coarse_labels": [int(v // 2) for v in y],
            "data": np.ascontiguousarray(x),
        }
        with open(os.path.join(d, name), "wb") as f:
            pickle.dump(entry, f, protocol=2)
    with open(os.path.join(d, "meta"), "wb") as f:
        pickle.dump({"fine_label_names": FINE, "coarse_label_names": COARSE}, f, protocol=2)


def digits_28():
    """The digits at 28x28 gray in the CIFAR fixtures' split order."""
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] * (255.0 / 16.0)
    x = tnf.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    x = x.round().clamp(0, 255).to(torch.uint8)[:, 0].numpy()
    y = np.asarray(d.target, dtype=np.uint8)
    order = np.random.RandomState(0).permutation(len(y))
    x, y = x[order], y[order]
    return (x[TEST:], y[TEST:]), (x[:TEST], y[:TEST])


def idx_bytes(a):
    """An IDX file of unsigned bytes: magic 0x0000080N, big-endian sizes."""
    header = bytes([0, 0, 8, a.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in a.shape)
    return header + np.ascontiguousarray(a, dtype=np.uint8).tobytes()


def write_mnist(root, folder, train, test, gz):
    d = os.path.join(root, folder, "raw")
    os.makedirs(d, exist_ok=True)
    for prefix, (x, y) in [("train", train), ("t10k", test)]:
        for name, a in [(f"{prefix}-images-idx3-ubyte", x), (f"{prefix}-labels-idx1-ubyte", y)]:
            if gz:
                with gzip.open(os.path.join(d, name + ".gz"), "wb") as f:
                    f.write(idx_bytes(a))
            else:
                with open(os.path.join(d, name), "wb") as f:
                    f.write(idx_bytes(a))


def write_svhn(root, train, test, compressed):
    import scipy.io
    for name, (x, y) in [("train_32x32.mat", train), ("test_32x32.mat", test)]:
        X = np.ascontiguousarray(x.reshape(-1, 3, 32, 32).transpose(2, 3, 1, 0))  # 32 x 32 x 3 x N
        labels = np.where(y == 0, 10, y).reshape(-1, 1)
        labels = labels.astype(np.uint8 if compressed else np.float64)
        scipy.io.savemat(os.path.join(root, name), {"X": X, "y": labels}, do_compression=compressed)


def write_augment(path):
    photos = [skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.rocket()]
    imgs = [Image.fromarray(p).convert("RGB").resize((32, 32), Image.BILINEAR) for p in photos]
    g = torch.Generator().manual_seed(0)
    n = 16
    src = [imgs[i % len(imgs)] for i in range(n)]
    oy = torch.randint(0, 9, (n,), generator=g)
    ox = torch.randint(0, 9, (n,), generator=g)
    flip = torch.rand(n, generator=g) < 0.5
    outs = []
    for img, a, b, fl in zip(src, oy.tolist(), ox.tolist(), flip.tolist()):
        # The recipe: RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize.
        t = F.crop(F.pad(img, 4, fill=0), a, b, 32, 32)
        if fl:
            t = F.hflip(t)
        outs.append(F.normalize(F.to_tensor(t), MEAN, STD))
    images = torch.stack([torch.from_numpy(np.array(i)).permute(2, 0, 1) for i in src])
    save_file(
        {"images": images.contiguous(), "oy": oy, "ox": ox, "flip": flip.to(torch.uint8), "expected": torch.stack(outs)},
        path,
    )


RRC_SHAPES = [(73, 73), (40, 100), (100, 40)]
RRC_DRAWS = 20000
# RandomResizedCrop's (scale, ratio): torchvision's defaults, and a
# timm-style other range whose fallback (no candidate fits) is frequent.
RRC_RANGES = {"": ((0.08, 1.0), (3 / 4, 4 / 3)), "wide_": ((0.25, 0.75), (0.5, 2.0))}


def write_resized_crop(path):
    from torchvision.transforms import RandomResizedCrop

    out = {}
    torch.manual_seed(0)
    for prefix, (scale, ratio) in RRC_RANGES.items():
        for h, w in RRC_SHAPES:
            img = torch.empty(3, h, w)
            boxes = [RandomResizedCrop.get_params(img, scale, ratio) for _ in range(RRC_DRAWS)]
            out[f"boxes_{prefix}{h}x{w}"] = torch.tensor(boxes, dtype=torch.int64)
    # Explicit boxes on real photographs (48 high, 40 wide), crops smaller and
    # larger than the 32x32 output, some at the image's edges.
    photos = [skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.rocket()]
    imgs = [torch.from_numpy(np.array(Image.fromarray(p).convert("RGB").resize((40, 48), Image.BILINEAR)))
            .permute(2, 0, 1).contiguous() for p in photos]
    g = torch.Generator().manual_seed(1)
    n = 16
    images, boxes, flips, expected, bicubic = [], [], [], [], []
    for k in range(n):
        img = imgs[k % len(imgs)]
        bh = int(torch.randint(4, 49, (1,), generator=g))
        bw = int(torch.randint(4, 41, (1,), generator=g))
        top = 0 if k % 5 == 0 else int(torch.randint(0, 48 - bh + 1, (1,), generator=g))
        left = 40 - bw if k % 7 == 0 else int(torch.randint(0, 40 - bw + 1, (1,), generator=g))
        flip = bool(torch.rand(1, generator=g) < 0.5)
        t = F.resized_crop(img.float(), top, left, bh, bw, [32, 32], antialias=True)
        expected.append(F.hflip(t) if flip else t)
        t = F.resized_crop(img.float(), top, left, bh, bw, [32, 32],
                           interpolation=F.InterpolationMode.BICUBIC, antialias=True)
        bicubic.append(F.hflip(t) if flip else t)
        images.append(img)
        boxes.append([top, left, bh, bw])
        flips.append(flip)
    out["images"] = torch.stack(images)
    out["boxes"] = torch.tensor(boxes, dtype=torch.int64)
    out["flip"] = torch.tensor(flips, dtype=torch.uint8)
    out["expected"] = torch.stack(expected)
    out["expected_bicubic"] = torch.stack(bicubic)
    save_file(out, path)


EVAL_SIZES = [(120, 90), (90, 120), (101, 77), (77, 101), (64, 64)]  # (width, height)


def write_eval_transform(path):
    """Photographs at sizes whose centre crops need rounding (4:3 resizes to
    341 x 256: an offset of 58.5, which Python rounds to 58), through
    torchvision's eval transform on uint8 tensors."""
    photos = [skdata.chelsea(), skdata.coffee(), skdata.astronaut(), skdata.rocket(), skdata.chelsea()]
    out = {}
    for k, ((w, h), arr) in enumerate(zip(EVAL_SIZES, photos)):
        img = torch.from_numpy(np.array(Image.fromarray(arr).convert("RGB").resize((w, h), Image.BILINEAR)))
        img = img.permute(2, 0, 1).contiguous()
        out[f"source_{k}"] = img
        out[f"expected_{k}"] = F.center_crop(F.resize(img, 256, antialias=True), 224).contiguous()
        bicubic = F.resize(img, 256, interpolation=F.InterpolationMode.BICUBIC, antialias=True)
        out[f"bicubic_{k}"] = F.center_crop(bicubic, 224).contiguous()
    save_file(out, path)


def write_photos(root):
    """A small image folder of real photographs: 3 classes, augmented copies
    (crops, flips, brightness) as PNG and JPEG, plus one unreadable file."""
    classes = {"astronaut": skdata.astronaut(), "cat": skdata.chelsea(), "coffee": skdata.coffee()}
    rng = np.random.RandomState(0)
    for name, arr in classes.items():
        d = os.path.join(root, name)
        os.makedirs(d, exist_ok=True)
        img = Image.fromarray(arr).convert("RGB")
        w, h = img.size
        for i in range(12):
            cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
            x0, y0 = rng.randint(0, w - cw + 1), rng.randint(0, h - ch + 1)
            v = img.crop((x0, y0, x0 + cw, y0 + ch)).resize((96, 80), Image.BILINEAR)
            if i % 2:
                v = v.transpose(Image.FLIP_LEFT_RIGHT)
            v = Image.fromarray(np.clip(np.asarray(v, dtype=np.float32) * rng.uniform(0.7, 1.3), 0, 255).astype(np.uint8))
            v.save(os.path.join(d, f"{name}_{i:02d}.{'png' if i % 3 else 'jpg'}"))
    with open(os.path.join(root, "cat", "broken.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 this is not really a jpeg")


def main(out):
    (xtr, ytr), test = digits_as_cifar()
    batches = [(xtr[i * 300:(i + 1) * 300], ytr[i * 300:(i + 1) * 300]) for i in range(5)]
    write_bin(os.path.join(out, "digits-bin"), batches, test)
    write_py(os.path.join(out, "digits-py"), batches, test)
    write_bin100(os.path.join(out, "digits-bin"), (xtr, ytr), test)
    write_py100(os.path.join(out, "digits-py"), (xtr, ytr), test)
    (xall, yall) = (xtr, ytr)
    write_svhn(os.path.join(out, "digits-bin"), (xall, yall), test, False)
    write_svhn(os.path.join(out, "digits-py"), (xall, yall), test, True)
    (x28, y28), (t28, u28) = digits_28()
    for layout, gz in [("digits-bin", False), ("digits-py", True)]:
        write_mnist(os.path.join(out, layout), "MNIST", (x28, y28), (t28, u28), gz)
        write_mnist(os.path.join(out, layout), "FashionMNIST", (x28, 9 - y28), (t28, 9 - u28), gz)
    write_augment(os.path.join(out, "augment.safetensors"))
    write_resized_crop(os.path.join(out, "resized_crop.safetensors"))
    write_eval_transform(os.path.join(out, "eval_transform.safetensors"))
    write_photos(os.path.join(out, "photos"))
    print("wrote digits datasets and augmentation references", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1])
