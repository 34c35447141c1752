"""Steps that one-process scoring (``influence.py``) and multi-process scoring (``distributed.py``) share: the
target rows and their inputs and labels, the kept top and bottom of a score vector, the arguments recorded with
the scores, and whether to show a progress bar.

This file travels with Hub models as remote code: installed packages and sibling modules only.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import datasets
import torch
from torch import nn
from transformers.utils import logging

from .fingerprint import recorded_fingerprint
from .inputs import label_column, logits_of, model_input_names, python_format, to_batch
from .scorer import TurnoverScorer

logger = logging.get_logger(__name__)

Targets = datasets.Dataset | Sequence[Mapping[str, Any]] | Mapping[str, Any]


def resolve_train_batch_size(train_batch_size: int | None, batch_size: int | None) -> int | None:
    """``train_batch_size`` (training ids per forward), or the deprecated ``batch_size`` that meant the same."""
    if batch_size is None:
        return train_batch_size
    if train_batch_size is not None:
        raise ValueError(
            f"Pass train_batch_size={train_batch_size} or the deprecated batch_size={batch_size}, not both."
        )
    warnings.warn(
        "batch_size= (training ids per forward) is now train_batch_size=; batch_size will be removed.",
        FutureWarning,
        stacklevel=3,
    )
    return batch_size


def scorer_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Scorer options: ``train_batch_size`` (or the deprecated ``batch_size``) becomes the scorer's ids per forward."""
    size = resolve_train_batch_size(kwargs.pop("train_batch_size", None), kwargs.pop("batch_size", None))
    return {**kwargs, "batch_size": size} if size is not None else kwargs


def show_progress(progress: bool | None) -> bool:
    """``progress`` if given, else transformers' progress-bar setting."""
    return logging.is_progress_bar_enabled() if progress is None else progress


def target_rows(targets: Targets) -> list[dict[str, Any]]:
    """The targets as a list of rows (a dataset, a list of rows or one row)."""
    if isinstance(targets, datasets.Dataset):
        return [dict(r) for r in python_format(targets)]
    if isinstance(targets, Mapping):
        return [dict(targets)]
    return [dict(r) for r in targets]


@torch.inference_mode()
def predict(scorer: TurnoverScorer, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of the full (unmasked) network."""
    scorer.model.eval()
    with scorer._autocast():
        return logits_of(scorer.forward_fn(scorer.model, inputs)).float()


class TargetPrep:
    """Model inputs and labels of one row at a time; predicts the label when a row has none (and says so)."""

    def __init__(self, scorer: TurnoverScorer, id_column: str):
        self.scorer = scorer
        self.names = model_input_names(scorer.model)
        self.id_column = id_column
        self.warned = False

    def __call__(self, row: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        inputs = to_batch([row], self.names, self.scorer.device)
        if not inputs:
            raise ValueError(f"A target row has none of the model's inputs {self.names}; it has {list(row)}.")
        column = label_column(list(row))
        if column is not None and row[column] is not None:
            return inputs, torch.as_tensor([row[column]], device=self.scorer.device)
        if not self.warned:
            logger.warning("Targets have no label: explaining the model's predicted label instead.")
            self.warned = True
        return inputs, predict(self.scorer, inputs).argmax(-1)


def top_and_bottom(vector: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """Positions of the ``top_k`` highest then the ``top_k`` lowest scores (all, by descending score, without
    ``top_k`` or when ``2 * top_k`` covers the vector)."""
    if top_k is None or 2 * top_k >= len(vector):
        return torch.argsort(vector, descending=True)
    top = torch.topk(vector, top_k).indices
    bottom = torch.topk(vector, top_k, largest=False).indices
    return torch.cat([top, bottom.flip(0)])


def run_arguments(
    model: nn.Module, scorer: TurnoverScorer, kind: str, ids: torch.Tensor, top_k: int | None = None
) -> dict:
    """The arguments recorded with a result (``hf_turnover.score_arguments`` reads them back)."""
    recorded = recorded_fingerprint(model) or {}
    return {
        "kind": kind,
        "variant": scorer.variant,
        "method": getattr(scorer, "method", "exact"),
        "turnover": scorer.config.to_dict(),
        "training_fingerprint": recorded.get("sha256"),
        "num_train_ids": int(ids.numel()),
        "top_k": top_k,
        "loss": getattr(scorer.loss_fn, "__name__", type(scorer.loss_fn).__name__),
        "dtype": str(scorer.dtype) if scorer.dtype else None,
        "model": type(model).__name__,
    }
