"""Pieces of `recipes/vision.py`: the VGG-style CNN, the image loaders, the grid figure and the label checks."""

from __future__ import annotations

import gzip
from collections import OrderedDict
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from common import SmallPreTrainedModel, pyplot, save_figure
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_outputs import ImageClassifierOutput

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Boot",
]


class VGGConfig(PretrainedConfig):
    model_type = "turnover_vgg"

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        channels: list[int] | None = None,
        convs_per_block: int = 1,
        hidden_size: int = 256,
        hidden_dropout_prob: float = 0.0,
        pixel_mean: list[float] | None = None,
        pixel_std: list[float] | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        # Per-channel statistics of the training images in [0, 1]: the model standardises its uint8 input.
        self.pixel_mean = list(pixel_mean or [0.5] * in_channels)
        self.pixel_std = list(pixel_std or [0.25] * in_channels)
        self.in_channels, self.image_size, self.convs_per_block = in_channels, image_size, convs_per_block
        self.channels = list(channels or [32, 64, 128])
        self.hidden_size, self.hidden_dropout_prob = hidden_size, hidden_dropout_prob


class VGGForImageClassification(SmallPreTrainedModel):
    """Blocks of 3x3 conv + ReLU and a 2x2 max pool (VGG without batch norm), then dense + ReLU + dropout + head.

    Module names: ``features.conv{block}_{k}`` (blocks from 1), ``classifier.fc1`` (hidden), ``classifier.fc2``.
    """

    config_class = VGGConfig
    main_input_name = "pixel_values"

    def __init__(self, config: VGGConfig) -> None:
        super().__init__(config)
        layers, width, size = OrderedDict(), config.in_channels, config.image_size
        for block, out in enumerate(config.channels, start=1):
            for k in range(1, config.convs_per_block + 1):
                layers[f"conv{block}_{k}"] = nn.Conv2d(width, out, kernel_size=3, padding=1)
                layers[f"relu{block}_{k}"] = nn.ReLU()
                width = out
            layers[f"pool{block}"] = nn.MaxPool2d(2)
            size //= 2
        if size < 1:
            raise ValueError(
                f"{len(config.channels)} pooling blocks shrink a {config.image_size}px image to 0."
            )
        self.features = nn.Sequential(layers)
        self.classifier = nn.Sequential(
            OrderedDict(
                flatten=nn.Flatten(),
                fc1=nn.Linear(width * size * size, config.hidden_size),
                relu=nn.ReLU(),
                dropout=nn.Dropout(config.hidden_dropout_prob),
                fc2=nn.Linear(config.hidden_size, config.num_labels),
            )
        )
        self.post_init()

    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None
    ) -> ImageClassifierOutput:
        if not pixel_values.is_floating_point():  # uint8 images as stored
            mean = pixel_values.new_tensor(self.config.pixel_mean, dtype=torch.float32).view(-1, 1, 1)
            std = pixel_values.new_tensor(self.config.pixel_std, dtype=torch.float32).view(-1, 1, 1)
            pixel_values = (pixel_values.float() / 255.0 - mean) / std  # (B, C, H, W)
        logits = self.classifier(self.features(pixel_values))  # (B, C, H, W) -> (B, num_labels)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format: big-endian header, then uint8 data), gzipped or not."""
    raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    ndim = raw[3]
    shape = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(int)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(data_dir: str) -> tuple[dict, list[str]]:
    folder = Path(data_dir)
    if not (folder / "train-images-idx3-ubyte.gz").is_file():
        raise FileNotFoundError(
            f"No Fashion-MNIST IDX files in {folder}. Install them with `apt-get install -y "
            "dataset-fashion-mnist` (Debian/Ubuntu), pass --data_dir, or use --dataset digits."
        )
    arrays = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(folder / f"{prefix}-images-idx3-ubyte.gz")[:, None]  # (N, 1, 28, 28)
        arrays[split] = (images, read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz"))
    return arrays, FASHION_MNIST_CLASSES


def load_digits_arrays() -> tuple[dict, list[str]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(digits.images * 16, 0, 255).astype(np.uint8)[:, None]  # 0..16 -> 0..255, (N, 1, 8, 8)
    order = np.random.default_rng(0).permutation(len(images))  # a fixed split: 300 test images
    test, train = order[:300], order[300:]
    return {"train": (images[train], digits.target[train]), "test": (images[test], digits.target[test])}, [
        str(i) for i in range(10)
    ]


def load_hub_arrays(name: str) -> tuple[dict, list[str]]:
    hub = datasets.load_dataset(name)
    features = hub["train"].features
    image_column = next(c for c, f in features.items() if isinstance(f, datasets.Image))
    label_column = next(c for c, f in features.items() if isinstance(f, datasets.ClassLabel))
    arrays = {}
    for split in ("train", "test"):
        images = np.stack([np.asarray(img) for img in hub[split][image_column]])  # (N, H, W[, C])
        images = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
        arrays[split] = (images.astype(np.uint8), np.asarray(list(hub[split][label_column])))
    return arrays, features[label_column].names


def load_images(args: Any) -> tuple[datasets.Dataset, datasets.Dataset, list[str]]:
    """Train and test sets with `pixel_values` (uint8, (C, H, W)), `label` and `instance_id`."""
    if args.dataset == "fashion_mnist":
        arrays, classes = load_fashion_mnist(args.data_dir)
    elif args.dataset == "digits":
        arrays, classes = load_digits_arrays()
    else:
        arrays, classes = load_hub_arrays(args.dataset)
    out = []
    for split, limit in (("train", args.max_train_samples), ("test", args.max_eval_samples)):
        images, labels = arrays[split]
        images, labels = images[:limit], labels[:limit]
        features = datasets.Features(
            pixel_values=datasets.Array3D(shape=images.shape[1:], dtype="uint8"),
            label=datasets.ClassLabel(names=classes),
            instance_id=datasets.Value("int64"),
        )
        rows = {
            "pixel_values": images,
            "label": labels.astype(np.int64),
            "instance_id": np.arange(len(images)),
        }
        out.append(datasets.Dataset.from_dict(rows, features=features).with_format("torch"))
    return out[0], out[1], classes


def draw_grid(scores: datasets.Dataset, train, test, targets: list[int], predicted, classes, k, path) -> None:
    """One row per misclassified test image: the image, its k most helpful and k most harmful training images."""
    fig, axes = pyplot().subplots(len(targets), 2 * k + 1, figsize=(1.3 * (2 * k + 1), 1.55 * len(targets)))
    axes = np.atleast_2d(axes)
    table = scores.to_pandas()
    for row, index in enumerate(targets):
        chosen = table[table.target_id == index].sort_values("score", ascending=False)
        cells = [
            (test[index], f"true {classes[int(test[index]['label'])]}\npred {classes[predicted[index]]}")
        ]
        for hit in [*chosen.head(k).itertuples(), *chosen.tail(k).iloc[::-1].itertuples()]:
            image = train[int(hit.train_id)]
            cells.append((image, f"{classes[int(image['label'])]}\n{hit.score:+.3f}"))
        for ax, (item, title) in zip(axes[row], cells, strict=True):
            picture = item["pixel_values"].numpy().transpose(1, 2, 0)  # (H, W, C)
            ax.imshow(picture.squeeze(-1) if picture.shape[-1] == 1 else picture, cmap="gray")
            ax.set_title(title, fontsize=7)
            ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(
        f"Misclassified test images | {k} most helpful | {k} most harmful training images (influence on the "
        "true label's loss)",
        fontsize=9,
    )
    save_figure(fig, path)


def label_checks(table, train_labels: np.ndarray, test, predicted, k: int) -> dict:
    """How often the k most helpful images carry the target's true label and the k most harmful its predicted
    label, beside the chance rates (those labels' shares of the training set)."""
    share = np.bincount(train_labels, minlength=int(train_labels.max()) + 1) / len(train_labels)
    rates = {"helpful_true_label": [], "chance_true_label": [], "harmful_predicted_label": []}
    rates["chance_predicted_label"] = []
    for target, group in table.groupby("target_id"):
        ordered = train_labels[group.sort_values("score", ascending=False).train_id.to_numpy()]
        true, wrong_label = int(test[int(target)]["label"]), int(predicted[int(target)])
        rates["helpful_true_label"].append(np.mean(ordered[:k] == true))
        rates["harmful_predicted_label"].append(np.mean(ordered[-k:] == wrong_label))
        rates["chance_true_label"].append(share[true])
        rates["chance_predicted_label"].append(share[wrong_label])
    return {name: float(np.mean(values)) for name, values in rates.items()}
