"""Turning dataset rows into model inputs, and per-row losses, for scoring."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc
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
    """Right-pad the sequence columns of several rows to one length: ``input_ids``-like lists (attention_mask and
    token_type_ids pad with 0, the others with ``pad_id``) and per-token vectors ``(T, D)`` such as cached hidden
    states given as ``inputs_embeds`` (with zero vectors). A missing attention_mask is added: padding needs one,
    or the padded rows compute something else."""
    out = [dict(r) for r in rows]
    sequence = next((n for n in ("input_ids", *names) if _is_sequence(out[0].get(n))), None)
    if "attention_mask" in names and sequence and "attention_mask" not in out[0]:
        for r in out:
            r["attention_mask"] = [1] * len(r[sequence])
    for name in names:
        value = out[0].get(name)
        if _is_vectors(value):
            width = max(len(r[name]) for r in out)
            for r in out:
                vectors = torch.as_tensor(r[name])
                r[name] = F.pad(vectors, (0, 0, 0, width - len(vectors)))  # (width, D)
            continue
        if not isinstance(value, list):
            continue
        width = max(len(r[name]) for r in out)
        fill = 0 if name in ("attention_mask", "token_type_ids") else pad_id
        for r in out:
            r[name] = list(r[name]) + [fill] * (width - len(r[name]))
    return out


def _is_vectors(value: Any) -> bool:
    return isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim == 2


def _is_sequence(value: Any) -> bool:
    return isinstance(value, list) or _is_vectors(value)


def _vector_columns(dataset: datasets.Dataset) -> list[str]:
    """Columns holding a sequence of float vectors per row (``inputs_embeds``, cached hidden states)."""

    def vectors(feature: Any) -> bool:
        inner = getattr(feature, "feature", None)
        value = getattr(inner, "feature", None)
        return isinstance(value, datasets.Value) and value.dtype.startswith("float")

    return [name for name, feature in dataset.features.items() if vectors(feature)]


def reading_format(dataset: datasets.Dataset) -> datasets.Dataset:
    """``dataset`` read as Python values, except per-token vector columns, read as numpy arrays (a Python float
    per number would cost more than the model)."""
    columns = _vector_columns(dataset)
    if not columns:
        return python_format(dataset)
    return dataset.with_format("numpy", columns=columns, output_all_columns=True)


def length_order(dataset: datasets.Dataset) -> np.ndarray | None:
    """Row indices sorted by sequence length (stable), for batches with little padding; ``None`` when the
    dataset has no ``length``, ``input_ids`` or per-token vector column."""
    if "length" in dataset.column_names:
        lengths = dataset.with_format("numpy", columns=["length"])[:]["length"]
    else:
        name = next((n for n in ("input_ids", *_vector_columns(dataset)) if n in dataset.column_names), None)
        if name is None:
            return None
        column = dataset.with_format("arrow", columns=[name])[:][name]
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    return np.argsort(lengths, kind="stable")


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


def check_dataset(dataset: Any, name: str) -> datasets.Dataset:
    """``dataset`` read as Python values, or a ``TypeError`` naming what was passed instead and the fix."""
    if isinstance(dataset, datasets.Dataset):
        return python_format(dataset)
    fix = "datasets.Dataset.from_list(rows)" if isinstance(dataset, (list, tuple)) else "datasets.Dataset"
    if isinstance(dataset, dict):
        fix = "datasets.Dataset.from_dict(columns)"
    if isinstance(dataset, datasets.DatasetDict):
        fix = f"one split of it, e.g. {name}=dataset[{next(iter(dataset), 'train')!r}]"
    raise TypeError(f"{name} must be a datasets.Dataset (the training set, with its ids), got a "
                    f"{type(dataset).__name__}: pass {fix}.")  # fmt: skip


def check_target(target: Any, names: Sequence[str]) -> None:
    """A ``TypeError``/``ValueError`` naming the bad target unless it is a mapping holding a model input."""
    if isinstance(target, str):
        raise TypeError(
            f"The target is a text ({target!r:.60}), not a tokenized input: pass dict(tokenizer(text)), or "
            "explain texts with pipeline('turnover-influence')."
        )
    if not isinstance(target, Mapping):
        raise TypeError(
            f"A target must be a dict of model inputs ({list(names)[:3]}...), got a {type(target).__name__}: "
            "pass dict(tokenizer(text))."
        )
    if not any(n in target for n in names):
        raise ValueError(f"A target has none of the model's inputs {list(names)}; it has {list(target)}.")


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
    for batch in reading_format(data).iter(batch_size=batch_size):
        rows = pad_rows([dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)],
                        names, pad_id)  # fmt: skip
        yield rows, to_batch(rows, names, device), torch.as_tensor([r[column] for r in rows], device=device)
