r"""Turn-over dropout on the later layers of a VGG-style CNN (Kobayashi et al. 2020, section 4.2 and Figure 5).

    apt-get install -y dataset-fashion-mnist      # Fashion-MNIST IDX files under /usr/share/datasets/fashion-mnist
    python recipes/vision.py --output_dir runs/vision      # 5,000 training images, 15 epochs: ~14 min, 2 CPU cores
    python recipes/vision.py --max_train_samples 60000 --num_train_epochs 5 --output_dir runs/vision_full

Trains the CNN twice with the same seed, with turn-over masks on its later layers (`--turnover_target_modules`,
a regex over module names; default the wide hidden dense layer `classifier.fc1`, add conv channels with e.g.
`--turnover_target_modules 'features\.conv3_\d+|classifier\.fc1'`) and without (the plain model), and reports
both test accuracies. For misclassified test images it then finds the most helpful and most harmful training images with
`estimate_influence(..., top_k=...)` (scored against the TRUE label: helpful images lowered its loss, harmful
ones raised it), draws them as a grid, and checks them: how often the helpful images carry the true label and the
harmful ones the wrongly predicted label, against the chance rates of those labels.

Other data: `--dataset digits` (scikit-learn's 1,797 8x8 digits, offline) or a Hub id with an image and a
ClassLabel column and train/test splits, e.g. `--dataset uoft-cs/cifar10` (needs a network).

Writes `results.json`, `misclassified_influence.png`, `influence.parquet` and the turn-over model (`model/`).
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import datasets
import numpy as np
from common import (
    AccuracyMetric,
    RecipeTrainingArguments,
    parse_arguments,
    push_outputs,
    train_model,
    write_json,
)
from vision_parts import (
    FASHION_MNIST_DIR,
    VGGConfig,
    VGGForImageClassification,
    draw_grid,
    label_checks,
    load_images,
)

from hf_turnover.config import TurnoverArguments
from hf_turnover.influence import estimate_influence
from hf_turnover.model import add_turnover, get_turnover_config, turnover_layers
from hf_turnover.results import save_scores


@dataclass
class VisionArguments:
    dataset: str = field(
        default="fashion_mnist",
        metadata={"help": "'fashion_mnist' (Debian IDX files), 'digits' (scikit-learn) or a Hub dataset id."},
    )
    data_dir: str = field(
        default=FASHION_MNIST_DIR, metadata={"help": "Folder of the Fashion-MNIST IDX files."}
    )
    max_train_samples: int | None = field(
        default=5000,
        metadata={
            "help": "Use the first N training images (5,000 of Fashion-MNIST's 60,000 fit a 2-core CPU)."
        },
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use the first N test images."})
    channels: str = field(default="16,32,64", metadata={"help": "Conv channels per block, comma-separated."})
    convs_per_block: int = field(default=1, metadata={"help": "3x3 convs per block (VGG uses 2-4)."})
    hidden_size: int = field(
        default=2048,
        metadata={"help": "Units of the hidden dense layer (wide: many units average mask noise out)."},
    )
    hidden_dropout: float = field(
        default=0.0, metadata={"help": "Ordinary dropout before the head (both nets)."}
    )
    num_explained: int = field(default=50, metadata={"help": "Misclassified test images to score."})
    num_shown: int = field(default=6, metadata={"help": "Misclassified test images drawn in the grid."})
    top_k: int = field(default=4, metadata={"help": "Most helpful and most harmful training images per row."})
    influence_batch_size: int | None = field(
        default=None, metadata={"help": "Training ids per scoring forward (default: sized to the input)."}
    )


@dataclass
class VisionTurnoverArguments(TurnoverArguments):
    """Masks on the wide hidden dense layer by default; add conv channels with e.g.
    ``--turnover_target_modules 'features\\.conv3_\\d+|classifier\\.fc1'``."""

    turnover_target_modules: str = field(
        default=r"classifier\.fc1",
        metadata={"help": "Modules whose output units are masked (regex, full match)."},
    )
    turnover_head_modules: str = field(default="", metadata={"help": "Modules whose input units are masked."})


@dataclass
class VisionTrainingArguments(RecipeTrainingArguments):
    output_dir: str = field(default="runs/vision", metadata={"help": "Where the results go."})
    num_train_epochs: float = field(
        default=15.0,
        metadata={"help": "Training epochs of each model (influence needs well-fitted instances)."},
    )
    per_device_train_batch_size: int = field(default=64, metadata={"help": "Training batch size."})
    per_device_eval_batch_size: int = field(default=512, metadata={"help": "Evaluation batch size."})
    logging_steps: float = field(default=200, metadata={"help": "Log the training loss every N steps."})


def build_model(
    args: VisionArguments,
    turnover_args: TurnoverArguments | None,
    train: datasets.Dataset,
    classes: list[str],
) -> VGGForImageClassification:
    """A fresh CNN that standardises its input with the training images' statistics; with turn-over masks
    unless ``turnover_args`` is ``None``."""
    pixels = train.with_format("numpy")["pixel_values"][:5000] / 255.0  # (N, C, H, W): statistics of a sample
    channels, size = pixels.shape[1], pixels.shape[-1]
    config = VGGConfig(
        in_channels=channels,
        image_size=size,
        channels=[int(c) for c in args.channels.split(",")],
        convs_per_block=args.convs_per_block,
        hidden_size=args.hidden_size,
        hidden_dropout_prob=args.hidden_dropout,
        pixel_mean=pixels.mean(axis=(0, 2, 3)).tolist(),
        pixel_std=pixels.std(axis=(0, 2, 3)).tolist(),
        num_labels=len(classes),
        id2label=dict(enumerate(classes)),
    )
    model = VGGForImageClassification(config)
    return add_turnover(model, turnover_args.to_config()) if turnover_args else model


def explain(
    args: VisionArguments, model, train, test, wrong: list[int], predicted, classes, output: Path
) -> dict:
    """Most helpful/harmful training images of the misclassified test images ``wrong``: parquet, grid, checks."""
    # Scoring reads only the ids of the training set; a torch-formatted id column would come back as tensors.
    plain_train = train.with_format(None)
    scores = estimate_influence(
        model, plain_train, test.select(wrong), top_k=args.top_k, batch_size=args.influence_batch_size
    )
    # The targets carry their test-set instance_id, so target_id is the index into `test`.
    save_scores(scores, output / "influence.parquet")
    shown = wrong[: args.num_shown]
    draw_grid(
        scores, train, test, shown, predicted, classes, args.top_k, output / "misclassified_influence.png"
    )
    return label_checks(scores.to_pandas(), np.asarray(plain_train["label"]), test, predicted, args.top_k)


def main(argv: list[str] | None = None) -> dict:
    """Run the recipe; ``argv`` as on the command line (``None``: ``sys.argv[1:]``). Returns results.json."""
    args, turnover_args, training_args = parse_arguments(
        (VisionArguments, VisionTurnoverArguments, VisionTrainingArguments), argv
    )
    started, output = time.time(), Path(training_args.output_dir)
    train, test, classes = load_images(args)
    metric = {"compute_metrics": AccuracyMetric()}
    # Both nets start from the same weights (train_model seeds before building).
    plain = train_model(partial(build_model, args, None, train, classes), training_args, train, **metric)
    plain_prediction = plain.predict(test)
    trainer = train_model(
        partial(build_model, args, turnover_args, train, classes), training_args, train, **metric
    )
    prediction = trainer.predict(test)
    trainer.save_model(str(output / "model"))
    predicted = prediction.predictions.argmax(-1)
    wrong = np.flatnonzero(predicted != prediction.label_ids)[: args.num_explained].tolist()
    checks = explain(args, trainer.model, train, test, wrong, predicted, classes, output) if wrong else {}
    results = {
        "arguments": asdict(args),
        "turnover": get_turnover_config(trainer.model).to_dict(),
        "num_train_epochs": training_args.num_train_epochs,
        "seed": training_args.seed,
        "num_train": len(train),
        "num_test": len(test),
        "turnover_layers": sorted(turnover_layers(trainer.model)),
        "accuracy_turnover": prediction.metrics["test_accuracy"],
        "accuracy_plain": plain_prediction.metrics["test_accuracy"],
        "explained_test_ids": wrong,
        "top_k": args.top_k,
        "label_checks": checks,
        "runtime_s": round(time.time() - started, 1),
    }
    print(
        f"test accuracy: plain {results['accuracy_plain']:.4f}, turn-over {results['accuracy_turnover']:.4f}"
    )
    write_json(output / "results.json", results)
    push_outputs(output, training_args)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
