"""The digits vggctl embeds (src/data/digits.bin, `--dataset digits`) are
scikit-learn's, exactly, in the documented split order: every record's
label and 64 pixels equal `load_digits()` at its index, each index appears
once, and the order is numpy's RandomState(0).permutation (the first 297
the test split), the split tests/make_datasets.py writes as CIFAR-10."""

import struct
import zlib
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

FILE = Path(__file__).resolve().parent.parent / "src" / "data" / "digits.bin"


def records():
    raw = zlib.decompress(FILE.read_bytes())
    magic = b"vggctl-digits 1\n"
    assert raw.startswith(magic)
    count, test = struct.unpack_from("<HH", raw, len(magic))
    body = raw[len(magic) + 4 :]
    assert len(body) == count * 67
    out = []
    for k in range(count):
        r = body[k * 67 : (k + 1) * 67]
        index, label = struct.unpack_from("<HB", r)
        out.append((index, label, np.frombuffer(r[3:], dtype=np.uint8)))
    return out, test


def test_embedded_digits_equal_scikit_learns():
    recs, test = records()
    d = load_digits()
    assert (len(recs), test) == (1797, 297)
    order = [i for i, _, _ in recs]
    assert order == list(np.random.RandomState(0).permutation(1797))
    for index, label, pixels in recs:
        assert label == d.target[index]
        assert np.array_equal(pixels, d.images[index].reshape(64).astype(np.uint8))
        assert np.array_equal(pixels.astype(np.float64), d.images[index].reshape(64))
