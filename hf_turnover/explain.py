"""Explaining one prediction by its most influential training instances (the paper's Figures 3-5)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import datasets
import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .influence import predict, training_ids
from .inputs import (
    check_dataset,
    check_target,
    integer_column,
    label_column,
    length_order,
    model_input_names,
    pad_rows,
    padded_batches,
    python_format,
    to_batch,
)
from .linear import LinearScorer, make_scorer, reference_gradient
from .pooled import COMPONENTS, PooledBasis, head_features, training_errors
from .scorer import TurnoverScorer
from .scoring_steps import show_progress
from .training_set import TEXT_COLUMNS


def explain_prediction(
    model: nn.Module,
    train_dataset: datasets.Dataset,
    target: Mapping[str, Any],
    *,
    top_k: int | None = 5,
    restrict_to_label: bool | int | None = None,
    text_column: str | None = None,
    method: str = "linear",
    check_fingerprint: bool = True,
    progress: bool | None = None,
    scorer: TurnoverScorer | None = None,
    **scorer_kwargs: Any,
) -> dict[str, Any]:
    """The training instances that most supported, and most opposed, the model's prediction on ``target``.

    ``target`` is one tokenized input (``dict(tokenizer(text))``; for raw text use
    ``pipeline("turnover-influence")``). The explained label is the model's prediction (full network).
    ``helpful`` holds up to ``top_k`` instances with the largest ``I(target, z_i) > 0`` for that label (z_i
    pushed the model towards it), ``harmful`` up to ``top_k`` with the most negative scores: helpful scores are
    always > 0, harmful ones < 0, and no instance is in both lists (either may hold fewer than ``top_k``).
    ``top_k=None`` lists every instance with a positive and every one with a negative score.
    ``restrict_to_label=True`` keeps only training instances carrying the predicted label (for a wrong
    prediction: the paper's "influential instances with the error label"); an int keeps that label.

    Returns ``{"prediction": {"label", "score"}, "helpful", "harmful", "true_label", "restricted_to_label",
    "warnings"}``, the schema of ``pipeline("turnover-influence")``; labels are names from
    ``model.config.id2label``. Each instance is ``{"train_id", "text", "label", "score", "percentile"}``:
    ``score`` is the raw influence (its scale differs from query to query: a confident prediction's scores are
    smaller), ``percentile`` its rank among all scored instances of this query (100: the highest score, 0: the
    lowest), comparable across queries.

    ``method="linear"`` (the default) scores to first order in the masks (one backward pass, then a product with
    the mask bits; see :mod:`hf_turnover.linear`); ``"exact"`` runs own and flipped forwards for every instance
    (the paper; ``progress``: a progress bar over its chunks, by default when there are many); ``"centered"``
    needs ``scorer=make_scorer(model, "centered", reference)`` and ``"pooled"``
    ``scorer=make_scorer(model, "pooled", basis=training_pooled_basis(model, tokenizer, train_dataset))``. ``train_batch_size``: training ids per forward
    of the exact method. Explaining many targets, pass one ``scorer`` (``hf_turnover.linear.make_scorer(model,
    method)``) to all calls: it probes the model once, and the linear one keeps the training ids' mask table.
    """
    train_dataset = check_dataset(train_dataset, "train_dataset")
    check_target(target, model_input_names(model))
    scorer = _scorer(model, method, scorer, scorer_kwargs)
    inputs = to_batch([target], model_input_names(model), scorer.device)
    options = {"top_k": top_k, "restrict_to_label": restrict_to_label, "text_column": text_column}
    if isinstance(scorer, LinearScorer):  # the prediction and the mask gradients from one pass
        logits, scores = _linear_pass(scorer, train_dataset, inputs, check_fingerprint)
        return _explain(scorer, train_dataset, target, None, logits[0], scores[0], False, **options)
    logits = predict(scorer, inputs)
    options["progress"] = progress
    return _explain(scorer, train_dataset, target, inputs, logits[0], None, check_fingerprint, **options)


def _scorer(
    model: nn.Module, method: str, scorer: TurnoverScorer | None, kwargs: dict[str, Any]
) -> TurnoverScorer:
    """The given scorer, or one made for ``method``; ``train_batch_size`` is the scorer's ids per forward."""
    if "batch_size" in kwargs:
        raise TypeError(
            "explain_prediction's training ids per forward are train_batch_size= (batch_size= is gone: in "
            "explain_predictions and the pipeline it counts targets per batch)."
        )
    if scorer is None:
        kwargs = dict(kwargs)
        if "train_batch_size" in kwargs:
            kwargs["batch_size"] = kwargs.pop("train_batch_size")
        return make_scorer(model, method, **kwargs)
    if kwargs or scorer.model is not model:
        raise ValueError(
            f"Pass either scorer= (a TurnoverScorer of this model) or scorer options {sorted(kwargs)}."
        )
    return scorer


def explain_predictions(
    model: nn.Module,
    train_dataset: datasets.Dataset,
    targets: Sequence[Mapping[str, Any]],
    *,
    batch_size: int = 16,
    scorer: TurnoverScorer | None = None,
    method: str = "linear",
    check_fingerprint: bool = True,
    **options: Any,
) -> list[dict[str, Any]]:
    """:func:`explain_prediction` for several targets (same output schema); with ``method="linear"`` (or a
    linear ``scorer``) the targets run ``batch_size`` at a time (targets per batch, as in transformers'
    pipelines), padded, through one forward and backward pass and one product with the mask table, so the fixed
    work is shared. ``options``: ``top_k``, ``restrict_to_label``, ``text_column``, ``progress``."""
    train_dataset = check_dataset(train_dataset, "train_dataset")
    if isinstance(targets, (str, Mapping)):
        raise TypeError(
            f"targets must be a list of tokenized inputs, got a {type(targets).__name__}: for one target use "
            "explain_prediction(model, train_dataset, target)."
        )
    names = model_input_names(model)
    for target in targets:
        check_target(target, names)
    scorer = scorer or make_scorer(model, method)
    if not isinstance(scorer, LinearScorer):
        return [
            explain_prediction(
                model, train_dataset, t, scorer=scorer, check_fingerprint=check_fingerprint, **options
            )  # fmt: skip
            for t in targets
        ]
    options.pop("progress", None)  # the linear method has no long loop to show
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


# where a saved model keeps the groups of method="pooled" (ids, labels, principal components per training row)
POOLING_FILE = "turnover_pooling.safetensors"


def training_pooled_basis(
    model: nn.Module,
    tokenizer: Any,
    train_dataset: datasets.Dataset,
    *,
    max_length: int | None = None,
    batch_size: int = 64,
    num_components: int = COMPONENTS,
    progress: bool | None = None,
) -> PooledBasis:
    """The :class:`~hf_turnover.pooled.PooledBasis` of ``method="pooled"`` for a text classifier: every training
    text's id, label, and ``num_components`` components from one forward pass per batch (in length order): the
    model's error on the text, then the top principal components of its head input. Seconds to a few minutes on a
    CPU (8,454 short sentences: about a minute); the pipeline saves it with the model
    (``turnover_pooling.safetensors``)."""
    columns = train_dataset.column_names
    text_column = next((c for c in TEXT_COLUMNS if c in columns), None)
    labels = label_column(columns)
    if text_column is None or labels is None:
        raise ValueError(
            f"method='pooled' builds its groups from the training set's text and label columns ({TEXT_COLUMNS}; "
            f"label/labels); it has {columns}. Build the basis yourself: "
            "hf_turnover.PooledBasis.from_features(ids, labels, features, errors=training_errors(logits, labels)) "
            "with features, logits = head_features(model, batches, return_logits=True)."
        )
    texts = train_dataset.with_format(None, columns=[text_column])[:][text_column]
    y = integer_column(train_dataset, labels)
    ids = integer_column(train_dataset, model.turnover_config.id_column)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # little padding; undone below
    names = set(model_input_names(model))
    bar = tqdm(total=len(texts), desc="Pooled basis: training texts", disable=not show_progress(progress))

    def batches():
        for start in range(0, len(order), batch_size):
            chunk = [texts[i] for i in order[start : start + batch_size]]
            encoded = tokenizer(
                chunk, truncation=True, max_length=max_length, padding=True, return_tensors="pt"
            )
            bar.update(len(chunk))
            yield {k: v.to(model.device) for k, v in encoded.items() if k in names}

    try:
        with torch.inference_mode():
            features, logits = head_features(model, batches(), return_logits=True)
    finally:
        bar.close()
    back = torch.as_tensor(order)  # row j of the pass is text order[j]
    unsorted, unsorted_logits = torch.empty_like(features), torch.empty_like(logits)
    unsorted[back], unsorted_logits[back] = features, logits
    errors = training_errors(unsorted_logits, y)
    return PooledBasis.from_features(ids, y, unsorted, num_components, errors=errors)


def dataset_pooled_basis(
    model: nn.Module,
    train_dataset: datasets.Dataset,
    *,
    batch_size: int = 64,
    num_components: int = COMPONENTS,
) -> PooledBasis:
    """The :class:`~hf_turnover.pooled.PooledBasis` of a training set of model inputs (token ids, or any input
    columns the model takes) with its id and label columns: the model's error on every row and its head input, in
    padded batches."""
    labels = label_column(train_dataset.column_names)
    if labels is None:
        raise ValueError(
            f"method='pooled' groups training rows by label: the training set has no label column "
            f"(labels/label; it has {train_dataset.column_names})."
        )
    ids = integer_column(train_dataset, model.turnover_config.id_column)
    order = length_order(train_dataset)  # similar lengths per batch: little padding; undone below
    rows = train_dataset if order is None else train_dataset.select(order)
    batches = (inputs for _, inputs, _ in padded_batches(rows, model, batch_size, model.device))
    features, logits = head_features(model, batches, return_logits=True)
    if order is not None:
        features[torch.as_tensor(order)] = features.clone()
        logits[torch.as_tensor(order)] = logits.clone()
    y = integer_column(train_dataset, labels)
    return PooledBasis.from_features(ids, y, features, num_components, errors=training_errors(logits, y))


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
    top_k: int | None = 5,
    restrict_to_label: bool | int | None = None,
    text_column: str | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """The explanation of one target from its logits (C,) and, for the linear scorer, the scores of every
    training id (N,); the exact scorer scores the candidates here, from ``inputs``."""
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None (every instance), got {top_k!r}.")
    probabilities = logits.softmax(-1)
    predicted = int(probabilities.argmax())
    labels = label_column(train_dataset.column_names)
    all_ids, label_values = _training_columns(scorer, train_dataset, labels, check_fingerprint)
    restricted = predicted if restrict_to_label is True else restrict_to_label
    candidates = _candidates(train_dataset, labels, restricted, label_values)
    ids = all_ids[candidates]
    if ids.numel() == 0:
        raise ValueError(
            f"No training instance carries label {restrict_to_label!r}: nothing to explain with."
        )
    if linear_scores is not None:  # one mask table for the whole training set, whatever the candidates
        scores = linear_scores[candidates]
        scorer._warn_if_unmasked(scores)
    else:
        scores = scorer.score(inputs, torch.tensor([predicted], device=scorer.device), ids, progress=progress)
    text_column = text_column or next((c for c in TEXT_COLUMNS if c in train_dataset.column_names), None)
    name = label_namer(scorer.model)
    helpful, harmful, percentiles = ranked_sides(scores, top_k)

    def describe(position: int) -> dict[str, Any]:
        row = train_dataset[int(candidates[position])]
        return {
            "train_id": int(ids[position]),
            "text": row[text_column] if text_column else None,
            "label": name(row[labels]) if labels else None,
            "score": float(scores[position]),
            "percentile": float(percentiles[position]),
        }

    true_label = next((target[c] for c in ("labels", "label") if target.get(c) is not None), None)
    return {
        "prediction": {"label": name(predicted), "score": float(probabilities[predicted])},
        "helpful": [describe(i) for i in helpful],
        "harmful": [describe(i) for i in harmful],
        "true_label": name(true_label),
        "restricted_to_label": None if restricted is None or restricted is False else name(restricted),
        "warnings": [],
    }


def ranked_sides(scores: torch.Tensor, top_k: int | None) -> tuple[list[int], list[int], torch.Tensor]:
    """Positions of the helpful (score > 0, highest first) and harmful (score < 0, lowest first) instances,
    at most ``top_k`` each (``None``: all), and every score's rank percentile (N,): 100 for the highest score,
    0 for the lowest (ties in order of position)."""
    order = torch.argsort(scores, descending=True, stable=True)
    n = len(order)
    percentiles = torch.empty(n, dtype=torch.float64)
    percentiles[order] = 100.0 * (n - 1 - torch.arange(n, dtype=torch.float64)) / max(n - 1, 1)
    positive = int((scores > 0).sum())
    negative = int((scores < 0).sum())
    k_pos = positive if top_k is None else min(top_k, positive)
    k_neg = negative if top_k is None else min(top_k, negative)
    return order[:k_pos].tolist(), order.flip(0)[:k_neg].tolist(), percentiles


def label_namer(model: nn.Module) -> Any:
    """``label id -> name`` from ``model.config.id2label`` (ids without a name, and ``None``, pass through)."""
    id2label = getattr(getattr(model, "config", None), "id2label", None) or {}

    def name(label: Any) -> Any:
        if label is None or isinstance(label, str):
            return label
        return id2label.get(int(label), label)

    return name


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
