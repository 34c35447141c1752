"""Turning dataset rows into model inputs, and per-row losses, for scoring."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LABEL_COLUMNS = ("labels", "label", "label_ids")
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def model_input_names(model: nn.Module) -> list[str]:
    """Arguments of ``model.forward`` (the columns Trainer would keep), without labels."""
    names = list(inspect.signature(model.forward).parameters)
    return [n for n in names if n not in LABEL_COLUMNS and n not in ("args", "kwargs")]


def label_column(columns: Sequence[str]) -> str | None:
    return next((c for c in LABEL_COLUMNS if c in columns), None)


def to_batch(
    rows: Sequence[Mapping[str, Any]], names: Sequence[str], device: torch.device
) -> dict[str, torch.Tensor]:
    """Stack equal-length rows into tensors; ``rows`` share one length (targets are scored one at a time)."""
    batch = {}
    for name in names:
        if name not in rows[0]:
            continue
        values = [r[name] for r in rows]
        tensor = torch.stack(values) if isinstance(values[0], torch.Tensor) else torch.tensor(values)
        batch[name] = tensor.to(device)
    return batch


def pad_rows(
    rows: Sequence[Mapping[str, Any]], names: Sequence[str], pad_id: int = 0
) -> list[dict[str, Any]]:
    """Right-pad ``input_ids``-like list columns of several rows to one length (attention_mask pads with 0)."""
    out = [dict(r) for r in rows]
    if "attention_mask" in names and "input_ids" in out[0] and "attention_mask" not in out[0]:
        for r in out:  # padding needs a mask, or the padded rows compute something else
            r["attention_mask"] = [1] * len(r["input_ids"])
    for name in names:
        if name not in out[0] or not isinstance(out[0][name], list):
            continue
        width = max(len(r[name]) for r in out)
        fill = 0 if name in ("attention_mask", "token_type_ids") else pad_id
        for r in out:
            r[name] = list(r[name]) + [fill] * (width - len(r[name]))
    return out


def per_row_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per row: ``(B, C)`` logits, or ``(B, T, V)`` token logits averaged over labelled tokens."""
    labels = labels.to(logits.device).expand(logits.shape[0], *labels.shape[1:])
    if logits.dim() == 2:
        return F.cross_entropy(logits.float(), labels, reduction="none")
    token = F.cross_entropy(logits.float().transpose(1, 2), labels, reduction="none", ignore_index=-100)
    return token.sum(1) / (labels != -100).sum(1).clamp(min=1)


def logits_of(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    raise TypeError(
        f"Cannot find logits in a model output of type {type(output).__name__}; pass forward_fn=."
    )


def python_format(dataset: datasets.Dataset) -> datasets.Dataset:
    """The dataset read as Python values whatever its format (torch/numpy formats return ids as tensors)."""
    return dataset.with_format(None) if dataset.format["type"] is not None else dataset


def integer_column(dataset: datasets.Dataset, name: str) -> torch.Tensor | list:
    """An integer column as an int64 tensor, read through Arrow (no Python objects per row); any other column
    as the Python list, for the caller's own checks and messages."""
    # ``dataset[name]`` is a lazy Column in datasets >= 4 that reads row by row; a formatted slice reads Arrow.
    values = dataset.with_format("numpy", columns=[name])[:][name]
    if isinstance(values, np.ndarray) and values.dtype.kind in "iu":
        return torch.from_numpy(values.astype(np.int64, copy=False))
    return dataset.with_format(None, columns=[name])[:][name]


def padded_batches(
    data: datasets.Dataset, model: nn.Module, batch_size: int, device: torch.device
) -> Iterator[tuple[list[dict[str, Any]], dict[str, torch.Tensor], torch.Tensor]]:
    """``(rows, model inputs, labels)`` for consecutive batches of ``data``, each padded to its longest row."""
    names = model_input_names(model)
    column = label_column(data.column_names)
    pad_id = getattr(getattr(model, "config", None), "pad_token_id", None) or 0
    for batch in python_format(data).iter(batch_size=batch_size):
        rows = pad_rows([dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)],
                        names, pad_id)  # fmt: skip
        yield rows, to_batch(rows, names, device), torch.as_tensor([r[column] for r in rows], device=device)
