"""Explaining one prediction by its most influential training instances (the paper's Figures 3-5)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import datasets
import numpy as np
import torch
from torch import nn

from .influence import predict, training_ids
from .inputs import integer_column, label_column, model_input_names, pad_rows, python_format, to_batch
from .linear import LinearScorer, make_scorer, reference_gradient
from .scorer import TurnoverScorer
from .training_set import TEXT_COLUMNS


def explain_prediction(
    model: nn.Module,
    train_dataset: datasets.Dataset,
    target: Mapping[str, Any],
    *,
    top_k: int = 5,
    restrict_to_label: bool | int | None = None,
    text_column: str | None = None,
    method: str = "exact",
    check_fingerprint: bool = True,
    progress: bool | None = None,
    scorer: TurnoverScorer | None = None,
    **scorer_kwargs: Any,
) -> dict[str, Any]:
    """The training instances that most supported, and most opposed, the model's prediction on ``target``.

    The explained label is the model's prediction (full network). ``helpful`` holds the ``top_k`` instances
    with the largest ``I(target, z_i)`` for that label (positive: z_i pushed the model towards it), ``harmful``
    the ``top_k`` most negative. ``restrict_to_label=True`` keeps only training instances carrying the
    predicted label (for a wrong prediction: the paper's "influential instances with the error label"); an int
    keeps instances with that label.

    Returns ``{"prediction": {"label", "score"}, "true_label", "label_used", "label_source", "helpful",
    "harmful"}``; each instance is ``{"train_id", "row", "text", "label", "score"}`` (``row`` indexes
    ``train_dataset``, e.g. to fetch an image). ``method="linear"`` scores to first order in the masks (one
    backward pass, then a product with the mask bits; see :mod:`hf_turnover.linear`). Explaining many targets,
    pass one ``scorer`` (``hf_turnover.linear.make_scorer(model, method)``) to all calls: it probes the model
    once, and the linear one keeps the training ids' mask table.
    """
    if scorer is None:
        scorer = make_scorer(model, method, **scorer_kwargs)
    elif scorer_kwargs or scorer.model is not model:
        raise ValueError(
            f"Pass either scorer= (a TurnoverScorer of this model) or scorer options {sorted(scorer_kwargs)}."
        )
    train_dataset = python_format(train_dataset)
    inputs = to_batch([target], model_input_names(model), scorer.device)
    options = {"top_k": top_k, "restrict_to_label": restrict_to_label, "text_column": text_column}
    if isinstance(scorer, LinearScorer):  # the prediction and the mask gradients from one pass
        logits, scores = _linear_pass(scorer, train_dataset, inputs, check_fingerprint)
        return _explain(scorer, train_dataset, target, None, logits[0], scores[0], False, **options)
    logits = predict(scorer, inputs)
    return _explain(scorer, train_dataset, target, inputs, logits[0], None, check_fingerprint, **options)


def explain_predictions(
    model: nn.Module,
    train_dataset: datasets.Dataset,
    targets: Sequence[Mapping[str, Any]],
    *,
    batch_size: int = 16,
    scorer: TurnoverScorer | None = None,
    method: str = "exact",
    check_fingerprint: bool = True,
    **options: Any,
) -> list[dict[str, Any]]:
    """:func:`explain_prediction` for several targets; with ``method="linear"`` (or a linear ``scorer``) the
    targets run ``batch_size`` at a time, padded, through one forward and backward pass and one product with
    the mask table, so the fixed work is shared. ``options``: ``top_k``, ``restrict_to_label``,
    ``text_column``."""
    scorer = scorer or make_scorer(model, method)
    if not isinstance(scorer, LinearScorer):
        return [
            explain_prediction(
                model, train_dataset, t, scorer=scorer, check_fingerprint=check_fingerprint, **options
            )  # fmt: skip
            for t in targets
        ]
    train_dataset = python_format(train_dataset)
    names = model_input_names(model)
    pad_id = getattr(getattr(model, "config", None), "pad_token_id", None) or 0
    out = []
    for start in range(0, len(targets), batch_size):
        chunk = list(targets[start : start + batch_size])
        inputs = to_batch(pad_rows(chunk, names, pad_id), names, scorer.device)
        logits, scores = _linear_pass(scorer, train_dataset, inputs, check_fingerprint and not out)
        for row, target in enumerate(chunk):
            out.append(
                _explain(scorer, train_dataset, target, None, logits[row], scores[row], False, **options)
            )
    return out


REFERENCE_ROWS = 1024  # training texts averaged into the centered method's reference gradient
# where a saved model keeps that reference (one vector per masked layer)
REFERENCE_FILE = "turnover_reference.safetensors"


def reference_rows(num_train: int, num_rows: int = REFERENCE_ROWS, seed: int = 0) -> np.ndarray:
    """The training rows (sorted positions, a seeded sample of up to ``num_rows``) averaged into a reference."""
    return np.sort(np.random.default_rng(seed).permutation(num_train)[:num_rows])


def training_reference(
    model: nn.Module,
    tokenizer: Any,
    train_dataset: datasets.Dataset,
    *,
    num_rows: int = REFERENCE_ROWS,
    max_length: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """The reference gradient of ``method="centered"`` for a text classifier: the mean mask gradient of up to
    ``num_rows`` training texts (a seeded sample), each under the model's predicted label
    (:func:`hf_turnover.linear.reference_gradient`)."""
    text_column = next((c for c in TEXT_COLUMNS if c in train_dataset.column_names), None)
    if text_column is None:
        raise ValueError(
            f"The training set has no text column ({TEXT_COLUMNS}; it has {train_dataset.column_names}): compute "
            "the reference with hf_turnover.linear.reference_gradient(model, batches) from your own inputs."
        )
    texts = python_format(train_dataset).select(reference_rows(len(train_dataset), num_rows, seed))[
        text_column
    ]
    texts = sorted(texts, key=len)  # similar lengths per batch: little padding (the mean ignores the order)
    names = set(model_input_names(model))

    def batches():
        for start in range(0, len(texts), batch_size):
            encoded = tokenizer(texts[start : start + batch_size], truncation=True, max_length=max_length,
                                padding=True, return_tensors="pt")  # fmt: skip
            yield {k: v for k, v in encoded.items() if k in names}

    return reference_gradient(model, batches())


def _linear_pass(
    scorer: LinearScorer, train_dataset: datasets.Dataset, inputs: dict[str, torch.Tensor], check: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, C) and linearized scores of every training id (B, N) for the predicted labels of a batch."""
    all_ids, _ = _training_columns(scorer, train_dataset, label_column(train_dataset.column_names), check)
    logits, grads = scorer.logits_and_gradients(inputs)
    return logits, scorer.scores_from_gradients(grads, all_ids).cpu()


def _explain(
    scorer: TurnoverScorer,
    train_dataset: datasets.Dataset,
    target: Mapping[str, Any],
    inputs: dict[str, torch.Tensor] | None,
    logits: torch.Tensor,
    linear_scores: torch.Tensor | None,
    check_fingerprint: bool,
    top_k: int = 5,
    restrict_to_label: bool | int | None = None,
    text_column: str | None = None,
) -> dict[str, Any]:
    """The explanation of one target from its logits (C,) and, for the linear scorer, the scores of every
    training id (N,); the exact scorer scores the candidates here, from ``inputs``."""
    probabilities = logits.softmax(-1)
    predicted = int(probabilities.argmax())
    labels = label_column(train_dataset.column_names)
    all_ids, label_values = _training_columns(scorer, train_dataset, labels, check_fingerprint)
    candidates = _candidates(
        train_dataset, labels, predicted if restrict_to_label is True else restrict_to_label, label_values
    )
    ids = all_ids[candidates]
    if ids.numel() == 0:
        raise ValueError(
            f"No training instance carries label {restrict_to_label!r}: nothing to explain with."
        )
    if linear_scores is not None:  # one mask table for the whole training set, whatever the candidates
        scores = linear_scores[candidates]
        scorer._warn_if_unmasked(scores)
    else:
        scores = scorer.score(inputs, torch.tensor([predicted], device=scorer.device), ids)
    order = torch.argsort(scores, descending=True)
    text_column = text_column or next((c for c in TEXT_COLUMNS if c in train_dataset.column_names), None)

    def describe(position: int) -> dict[str, Any]:
        row = int(candidates[position])
        return {
            "train_id": int(ids[position]),
            "row": row,
            "text": train_dataset[row][text_column] if text_column else None,
            "label": train_dataset[row][labels] if labels else None,
            "score": float(scores[position]),
        }

    k = min(top_k, len(order))
    true_label = next((target[c] for c in ("labels", "label") if target.get(c) is not None), None)
    return {
        "prediction": {"label": predicted, "score": float(probabilities[predicted])},
        "true_label": true_label,
        "label_used": predicted,
        "label_source": "predicted",
        "helpful": [describe(int(i)) for i in order[:k]],
        "harmful": [describe(int(i)) for i in order.flip(0)[:k]],
    }


def _training_columns(
    scorer: TurnoverScorer, train_dataset: datasets.Dataset, labels: str | None, check: bool
) -> tuple[torch.Tensor, torch.Tensor | list | None]:
    """The training ids and labels, kept on the scorer for the dataset they were read from (explaining many
    targets against one training set reads them once; ``datasets`` gives every changed dataset a new
    fingerprint)."""
    key = (getattr(train_dataset, "_fingerprint", None), len(train_dataset), labels)
    cached = getattr(scorer, "_training_columns", None)
    if cached is not None and key[0] is not None and cached[0] == key and (cached[3] or not check):
        return cached[1], cached[2]
    ids = training_ids(scorer.model, train_dataset, None, check)
    values = integer_column(train_dataset, labels) if labels else None
    scorer._training_columns = (key, ids, values, check)
    return ids, values


def _candidates(
    train_dataset: datasets.Dataset, labels: str | None, label: int | None, values=None
) -> torch.Tensor:
    """Row indices of the training instances to consider."""
    if label is None or label is False:
        return torch.arange(len(train_dataset))
    if labels is None:
        raise ValueError("restrict_to_label needs a label column in train_dataset (labels or label).")
    values = integer_column(train_dataset, labels) if values is None else values
    if isinstance(values, torch.Tensor):
        return torch.nonzero(values == label).flatten()
    return torch.tensor([i for i, y in enumerate(values) if y == label], dtype=torch.long)
