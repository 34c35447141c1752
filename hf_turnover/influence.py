"""Influence of training instances on targets, from forward passes under turn-over masks.

Sign convention (as in the paper): ``I(z_t, z_i) = L(f with the flipped mask of z_i, z_t) - L(f with the own mask
of z_i, z_t)``. **Positive: z_i helped z_t** (the loss on z_t is lower in the sub-network trained on z_i).

``method="linear"``, the default of every function here and of the pipeline, takes the first-order form in the mask
values (one backward pass per target, then a product with the mask bits; see ``linear.py``); ``method="exact"``
runs the own and flipped forward passes (the paper). ``train_batch_size`` is the exact method's training ids per
forward (``batch_size`` keeps the transformers meaning: inputs per batch).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import datasets
import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.utils import logging

from .context import as_instance_ids
from .fingerprint import check_fingerprint, recorded_fingerprint
from .inputs import (
    LossFn,
    check_dataset,
    integer_column,
    label_column,
    length_order,
    padded_batches,
)
from .linear import LinearScorer, gradient_blocks, make_scorer
from .results import scores_dataset
from .scorer import TurnoverScorer
from .scoring_steps import (  # noqa: F401  (Targets and predict: imported from here by explain.py, variants.py)
    TargetPrep,
    Targets,
    predict,
    resolve_train_batch_size,
    run_arguments,
    scorer_kwargs,
    show_progress,
    target_rows,
    top_and_bottom,
)
from .sharding import shardable

logger = logging.get_logger(__name__)


def training_ids(
    model: nn.Module, train_dataset: datasets.Dataset | None, train_ids=None, check: bool = True
) -> torch.Tensor:
    """The ids to score: ``train_ids`` if given, else every id of ``train_dataset`` (checked by fingerprint)."""
    id_column = model.turnover_config.id_column
    if train_dataset is not None:
        train_dataset = check_dataset(train_dataset, "train_dataset")
        if id_column not in train_dataset.column_names:
            raise ValueError(
                f"train_dataset has no {id_column!r} column: it must be the set the model trained on."
            )
        if check:
            check_fingerprint(
                recorded_fingerprint(model),
                train_dataset,
                escape=", or check_fingerprint=False if you know better",
            )
    if train_ids is None:
        if train_dataset is None:
            raise ValueError("Pass train_dataset (the training set) or train_ids (the ids to score).")
        train_ids = integer_column(train_dataset, id_column)
    ids = as_instance_ids(
        list(train_ids) if not isinstance(train_ids, torch.Tensor) else train_ids, id_column
    )
    if ids.numel() == 0:
        raise ValueError("The training set is empty: there is no instance to score.")
    return ids


@shardable
def estimate_influence(
    model: nn.Module,
    train_dataset: datasets.Dataset | None,
    targets: Targets,
    *,
    variant: str = "own",
    method: str = "linear",
    reference: dict[str, torch.Tensor] | None = None,
    basis: Any = None,
    train_ids: Sequence[int] | torch.Tensor | None = None,
    top_k: int | None = None,
    train_batch_size: int | None = None,
    batch_size: int | None = None,
    loss_fn: LossFn | None = None,
    forward_fn: Callable | None = None,
    dtype: torch.dtype | None = None,
    positions: Sequence[int] | str | None = "auto",
    check_fingerprint: bool = True,
    progress: bool | None = None,
) -> datasets.Dataset:
    """``I(z_t, z_i)`` for every training instance ``i`` and every target ``t``, by forward passes only.

    ``I(z_t, z_i) = L(f^{flip(z_i)}, z_t) - L(f^{own(z_i)}, z_t)``: **positive means z_i helped z_t**.
    ``variant="full"`` uses ``L(f^{flip(z_i)}, z_t) - L(f, z_t)`` (the paper's footnote 4).

    Args:
        model: a model with turn-over layers, on the device to score on.
        train_dataset: the training set (its id column; checked against the model's recorded fingerprint).
        targets: a dataset, a list of rows or one row with the model's input columns; a label column
            (``labels``/``label``) if present, else the predicted label is explained; an id column if present,
            else the row index is the target id.
        method: ``"linear"``, the default (first order in the mask values: one forward and backward pass per
            target, then a product with the ids' mask bits; far faster for many ids, see
            :mod:`hf_turnover.linear`), ``"exact"`` (own and flipped forward passes, the paper) or ``"centered"`` (linear, with ``reference``, the mean
            mask gradient of :func:`hf_turnover.linear.reference_gradient`, subtracted from each target's).
        reference: the reference gradient of ``method="centered"``.
        basis: the training set's :class:`~hf_turnover.pooled.PooledBasis`, for ``method="pooled"``.
        train_ids: score only these training ids.
        top_k: keep only the ``top_k`` most helpful and ``top_k`` most harmful instances per target.
        train_batch_size: training ids per forward pass of ``method="exact"``; ``None`` sizes chunks to the
            input and device (about 4k rows x computed positions on the CPU: 32 ids for 64 tokens with every
            adapter masked, 2048 when only the [CLS] position is computed past the first masked layer).
        batch_size: the former name of ``train_batch_size`` (deprecated: a ``FutureWarning``).
        dtype: autocast dtype (e.g. ``torch.bfloat16``); ``None`` runs in the model's dtype.
        positions: positions the loss reads (``"auto"``: ``[0]`` for [CLS]-pooled classifiers); after the last
            attention only these are computed. ``None`` disables.

    Returns:
        A ``datasets.Dataset`` with columns ``target_id``, ``train_id``, ``score`` whose ``info.description``
        records the arguments that produced it (see :func:`hf_turnover.combine_scores`).
    """
    scorer = make_scorer(
        model, method, reference, basis=basis, variant=variant, batch_size=resolve_train_batch_size(train_batch_size, batch_size),
        loss_fn=loss_fn, forward_fn=forward_fn, dtype=dtype, positions=positions,
    )  # fmt: skip
    ids = training_ids(model, train_dataset, train_ids, check_fingerprint)
    rows = target_rows(targets)
    prep = TargetPrep(scorer, scorer.config.id_column)
    target_ids, train_out, scores = [], [], []
    progress_bar = tqdm(total=len(rows), desc="Scoring targets", disable=not show_progress(progress))
    for index, vector in _score_targets(scorer, prep, rows, ids):
        keep = top_and_bottom(vector, top_k)
        target_ids.append(
            np.full(len(keep), int(rows[index].get(scorer.config.id_column, index)), dtype=np.int64)
        )
        train_out.append(ids[keep].numpy())
        scores.append(vector[keep].numpy())
        progress_bar.update()
    progress_bar.close()
    return scores_dataset(
        {
            "target_id": np.concatenate(target_ids),
            "train_id": np.concatenate(train_out),
            "score": np.concatenate(scores),
        },
        run_arguments(model, scorer, "influence", ids, top_k),
    )


def _score_targets(
    scorer: TurnoverScorer, prep: TargetPrep, rows: list[dict], ids: torch.Tensor, block: int = 32
):
    """``(row index, scores (N,))`` per target; the linear method scores ``block`` targets per mask product."""
    if not isinstance(scorer, LinearScorer):
        for index, row in enumerate(rows):
            yield index, scorer.score(*prep(row), ids)
        return
    for start in range(0, len(rows), block):
        grads = gradient_blocks(scorer, [prep(row) for row in rows[start : start + block]])
        matrix = scorer.scores_from_gradients(grads, ids).cpu()  # (T, N)
        for offset, vector in enumerate(matrix):
            scorer._warn_if_unmasked(vector)
            yield start + offset, vector


@shardable
def mean_influence(
    model: nn.Module,
    train_dataset: datasets.Dataset | None,
    targets: Targets,
    *,
    progress: bool | None = None,
    **kwargs: Any,
) -> datasets.Dataset:
    """Mean of ``I(z_v, z_i)`` over the targets ``z_v`` (e.g. a validation set) for every training instance.

    Memory is one running sum per training instance; the ``N x T`` matrix is never kept. Columns:
    ``train_id``, ``score``. Used for data cleansing: drop the instances with the most negative mean.
    With ``method="linear"`` (the default) the mean of the linearized scores is the linearized score of the
    mean mask gradient: one product with the mask bits for the whole set; ``method="exact"`` runs the paper's
    forwards (``train_batch_size``: training ids per forward).
    """
    scorer, ids, rows, prep = mean_influence_setup(model, train_dataset, targets, kwargs)
    bar = tqdm(rows, desc="Mean influence", disable=not show_progress(progress))
    if isinstance(scorer, LinearScorer):
        grads: dict[str, torch.Tensor] = {}
        for row in bar:
            for name, g in scorer.mask_gradients(*prep(row)).items():
                grads[name] = grads.get(name, 0) + g.double().sum(0, keepdim=True)
        total = scorer.scores_from_gradients({n: g / len(rows) for n, g in grads.items()}, ids)[0].cpu()
    else:
        total = torch.zeros(len(ids), dtype=torch.float64)
        for row in bar:
            total += scorer.score(*prep(row), ids).double()
        total /= len(rows)
    return scores_dataset(
        {"train_id": ids.numpy(), "score": total.float().numpy()},
        {**run_arguments(model, scorer, "mean_influence", ids), "num_targets": len(rows)},
    )


@shardable
def self_influence(
    model: nn.Module,
    train_dataset: datasets.Dataset,
    *,
    batch_size: int = 64,
    progress: bool | None = None,
    **kwargs: Any,
) -> datasets.Dataset:
    """``I(z_i, z_i)`` for every training instance (the paper's Figure 7): high values flag instances the
    model fits only through themselves (memorised, atypical or mislabelled). Columns: ``train_id``, ``score``.

    ``train_dataset`` must hold the model inputs and labels (e.g. the tokenized training set). Here the
    training rows are the inputs, so ``batch_size`` counts them, as in transformers: rows per forward.
    ``method="linear"`` (the library functions' default): one forward and backward pass of the full network
    per batch, first order in the masks; ``method="exact"``: each batch under its own masks and then its flipped
    ones (the paper). Other keyword arguments go to :class:`~hf_turnover.scorer.TurnoverScorer`.
    """
    scorer, train_dataset, ids = self_influence_setup(model, train_dataset, kwargs)
    scores = torch.empty(len(ids))
    order = length_order(train_dataset)  # similar lengths per batch: little padding; scores go back in place
    if order is not None:
        train_dataset, ids_in_order = train_dataset.select(order), ids[order]
    else:
        order, ids_in_order = np.arange(len(ids)), ids
    batches = padded_batches(train_dataset, model, batch_size, scorer.device)
    start = 0
    for rows, inputs, labels in tqdm(
        batches,
        total=math.ceil(len(ids) / batch_size),
        desc="Self-influence",
        disable=not show_progress(progress),
    ):
        chunk = torch.from_numpy(order[start : start + len(rows)])
        scores[chunk] = scorer.self_scores(inputs, labels, ids_in_order[start : start + len(rows)])
        start += len(rows)
    return scores_dataset(
        {"train_id": ids.numpy(), "score": scores.numpy()},
        run_arguments(model, scorer, "self_influence", ids),
    )


def self_influence_setup(
    model: nn.Module, train_dataset: datasets.Dataset, kwargs: dict[str, Any]
) -> tuple[TurnoverScorer, datasets.Dataset, torch.Tensor]:
    """The scorer (``kwargs``: ``method``, ``check_fingerprint`` and scorer options), the training set and its
    ids, for self-influence in one process or across several."""
    check = kwargs.pop("check_fingerprint", True)
    train_dataset = check_dataset(train_dataset, "train_dataset")
    scorer = make_scorer(model, kwargs.pop("method", "linear"), **scorer_kwargs(kwargs))
    ids = training_ids(model, train_dataset, None, check)
    if label_column(train_dataset.column_names) is None:
        raise ValueError(
            f"Self-influence needs labels: train_dataset has no label column ({train_dataset.column_names})."
        )
    return scorer, train_dataset, ids


def mean_influence_setup(
    model: nn.Module, train_dataset: datasets.Dataset | None, targets: Targets, kwargs: dict[str, Any]
) -> tuple[TurnoverScorer, torch.Tensor, list[dict[str, Any]], TargetPrep]:
    """The scorer (``kwargs``: ``method``, ``check_fingerprint``, ``train_ids`` and scorer options), the ids, the
    target rows and their preparation, for mean influence in one process or across several."""
    check = kwargs.pop("check_fingerprint", True)
    train_ids = kwargs.pop("train_ids", None)
    scorer = make_scorer(model, kwargs.pop("method", "linear"), **scorer_kwargs(kwargs))
    ids = training_ids(model, train_dataset, train_ids, check)
    rows = target_rows(targets)
    return scorer, ids, rows, TargetPrep(scorer, scorer.config.id_column)
