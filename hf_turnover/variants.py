"""Estimator variants: averaging turn-over scores over several independently seeded models.

A single turn-over model scores ``I(z_t, z_i)`` through the one mask ``m(z_i)``; most of that score is the luck of
the mask (how well the random half-network suits ``z_t``), not ``z_i``'s contribution: in
``benchmarks/RESULTS.md`` the part of the score that ``z_i`` caused is a few percent of its variance. Models
trained with different seeds draw independent masks, so their mask luck is independent and averages out while
the contribution of ``z_i`` does not.

Sign convention as everywhere in hf_turnover: **positive means z_i helped z_t**.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import datasets
import numpy as np
from torch import nn

from .influence import Targets, estimate_influence
from .results import same_arguments, score_arguments, scores_dataset

# Arguments that legitimately differ between the models of an ensemble (plus the mask seed).
_PER_MODEL = ("training_fingerprint", "num_targets")


def _keys(result: datasets.Dataset) -> list[str]:
    return [c for c in ("target_id", "train_id") if c in result.column_names]


def _shared(arguments: dict[str, Any]) -> dict[str, Any]:
    """The arguments that must agree across an ensemble: all but the per-model ones and the mask seed."""
    shared = {k: v for k, v in arguments.items() if k not in _PER_MODEL}
    shared["turnover"] = {k: v for k, v in arguments.get("turnover", {}).items() if k != "seed"}
    return shared


def _check_same_kind(results: Sequence[datasets.Dataset]) -> list[dict[str, Any]]:
    top_k = score_arguments(results[0]).get("top_k")
    if top_k is not None:
        raise ValueError(
            f"Result 0 was made with top_k={top_k}: each model keeps different pairs, so the "
            "average would be biased. Score every pair (top_k=None) and select after averaging."
        )
    return same_arguments(results, _shared)


def average_scores(results: Sequence[datasets.Dataset]) -> datasets.Dataset:
    """Average influence results of several turn-over models (``estimate_influence``, ``self_influence`` or
    ``mean_influence`` outputs, one per model) pair by pair.

    The models should differ in their mask seed (``TurnoverConfig.seed``) and are best trained with different
    initialisations and data orders too; every result must hold the same (target, train) pairs. Same columns
    as the inputs; the arguments record ``"ensemble": {"num_models", "mask_seeds"}``.
    """
    if len(results) < 1:
        raise ValueError("average_scores needs at least one result.")
    arguments = _check_same_kind(results)
    seeds = [a.get("turnover", {}).get("seed") for a in arguments]
    if len(set(seeds)) < len(seeds):
        raise ValueError(
            f"Results share mask seeds {seeds}: models with the same masks repeat the same mask luck. Train the "
            "ensemble's models with different TurnoverConfig.seed values."
        )
    keys = _keys(results[0])
    frames = [r.select_columns([*keys, "score"]).to_pandas().set_index(keys)["score"] for r in results]
    index = frames[0].index
    for position, frame in enumerate(frames[1:], start=1):
        if len(frame) != len(index) or not frame.index.isin(index).all():
            raise ValueError(f"Result {position} scores other (target, train) pairs than result 0.")
    mean = np.mean([frame.reindex(index).to_numpy(dtype=np.float64) for frame in frames], axis=0)
    columns = {k: index.get_level_values(k).to_numpy(dtype=np.int64) for k in keys}
    merged = {k: v for k, v in arguments[0].items() if k != "turnover"}
    merged["ensemble"] = {"num_models": len(results), "mask_seeds": seeds}
    merged["turnover"] = {k: v for k, v in arguments[0].get("turnover", {}).items() if k != "seed"}
    return scores_dataset({**columns, "score": mean.astype(np.float32)}, json.loads(json.dumps(merged)))


def ensemble_influence(
    models: Sequence[nn.Module], train_dataset: datasets.Dataset | None, targets: Targets, **kwargs: Any
) -> datasets.Dataset:
    """:func:`hf_turnover.estimate_influence` with each model, averaged (:func:`average_scores`).

    ``models`` are turn-over models trained on the same training set with different seeds (mask seed, and
    ideally initialisation and data order). Costs one scoring pass per model. Keyword arguments go to
    ``estimate_influence`` (``top_k`` is not allowed: select after averaging).
    """
    if kwargs.get("top_k") is not None:
        raise ValueError(
            "ensemble_influence scores every pair; pick the top_k of the averaged result instead."
        )
    if not models:
        raise ValueError("ensemble_influence needs at least one model.")
    return average_scores([estimate_influence(m, train_dataset, targets, **kwargs) for m in models])
