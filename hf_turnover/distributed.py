"""Influence scoring across processes (``accelerate launch``): each process scores a shard of the training ids.

``estimate_influence``, ``self_influence`` and ``mean_influence`` take ``distributed=True``: launched with
``accelerate launch --num_processes K`` (CPU or GPU), process ``r`` scores the ``r``-th of ``K`` contiguous
shards of the training ids and the parts are gathered (``accelerate.utils.gather_object``) into the
``datasets.Dataset`` that one process returns, on every process. Not launched (one process), the call is the
single-process one. Opt-in, because every process must make the call: a script that scores on the main
process only keeps ``distributed=False`` (the default).

The scores are those of the single-process run, bit for bit on the CPU: the exact engine scores an id in the
same chunk of ids as one process does (a shard starting inside a chunk computes that whole chunk and keeps
its part), self-influence shards are whole batches (the same padding), the linear method's product is per id,
and a mean sums every id's scores over the targets in the same order. With ``top_k`` each process keeps its
own top and bottom ``top_k`` per target and the merge keeps the global ones: memory stays flat in N. The
linear method's gradients (one backward pass per target) are shared out by target and gathered; the product
with the mask bits, the part that grows with N, is sharded by id (each process builds the mask table of its
shard only).

Each implementation registers itself with ``sharding.implements``; ``sharding.shardable`` (on the functions of
``influence.py``) calls it. This module imports ``influence.py``, never the reverse.

This file travels with Hub models as remote code: installed packages and sibling modules only.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .influence import mean_influence_setup, self_influence_setup, training_ids
from .inputs import padded_batches
from .linear import LinearScorer, make_scorer
from .results import scores_dataset
from .scorer import TurnoverScorer
from .scoring_steps import (
    TargetPrep,
    resolve_train_batch_size,
    run_arguments,
    show_progress,
    target_rows,
    top_and_bottom,
)
from .sharding import implements, process_state, shard_range, shardable

__all__ = ["keep_candidates", "merge_candidates", "process_state", "shard_range", "shard_scores", "shardable"]


def shard_scores(
    scorer: TurnoverScorer, inputs: dict, labels: torch.Tensor, ids: torch.Tensor, start: int, stop: int
) -> torch.Tensor:
    """``I(target, z_i)`` for ``ids[start:stop]``, computed in the chunks of ids one process would use.

    The exact engine chunks ``ids`` from 0 in steps of its ids per forward; a shard that starts or ends inside
    a chunk computes that whole chunk and keeps its part, so no score depends on where the shards are cut.
    """
    if stop <= start:
        return torch.empty(0)
    if isinstance(scorer, LinearScorer):
        return scorer.score(inputs, labels, ids[start:stop])
    step = scorer.ids_per_forward(inputs)
    low, high = start - start % step, min(len(ids), stop + (-stop) % step)
    return scorer.score(inputs, labels, ids[low:high])[start - low : stop - low]


def target_gradients(state: Any, scorer: LinearScorer, prep: Any, rows: list[dict]) -> list[dict]:
    """Every target's mask gradients ``{layer: (1, d)}`` in target order, each computed by one process (targets
    ``r, r + K, ...`` on process ``r``) and gathered: the same tensors one process computes, at 1/K of the cost."""
    mine = {
        index: {name: g.cpu() for name, g in scorer.mask_gradients(*prep(rows[index])).items()}
        for index in range(state.process_index, len(rows), state.num_processes)
    }
    merged: dict[int, dict] = {}
    for part in _gather(state, mine):
        merged.update(part)
    return [{name: g.to(scorer.device) for name, g in merged[index].items()} for index in range(len(rows))]


def _shard_vectors(
    state: Any, scorer: TurnoverScorer, prep: Any, rows: list[dict], ids: torch.Tensor, start: int, stop: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """``(row index, scores of ids[start:stop])`` per target, as ``influence._score_targets`` yields them (the
    linear method: gradients of blocks of 32 targets times the mask table of the shard)."""
    if not isinstance(scorer, LinearScorer):
        for index, row in enumerate(rows):
            yield index, shard_scores(scorer, *prep(row), ids, start, stop)
        return
    grads, block = target_gradients(state, scorer, prep, rows), 32
    for first in range(0, len(rows), block):
        part = {name: torch.cat([g[name] for g in grads[first : first + block]]) for name in grads[0]}
        if stop <= start:
            matrix = torch.empty(len(grads[first : first + block]), 0)
        else:
            matrix = scorer.scores_from_gradients(part, ids[start:stop]).cpu()  # (T, n)
        for offset, vector in enumerate(matrix):
            scorer._warn_if_unmasked(vector)
            yield first + offset, vector


def keep_candidates(vector: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """Positions of the scores a shard keeps for the merge (its top and bottom ``top_k``), in id order."""
    return top_and_bottom(vector, top_k).sort().values


def merge_candidates(
    positions: list[np.ndarray], scores: list[np.ndarray], top_k: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """The global top and bottom ``top_k`` (all, sorted, without ``top_k``) from the shards' candidates, in the
    order one process returns them: ``(positions in the id list, scores)``."""
    position, score = np.concatenate(positions), np.concatenate(scores)
    keep = top_and_bottom(torch.from_numpy(score), top_k).numpy()
    return position[keep], score[keep]


def _bar(state: Any, progress: bool | None, **kwargs: Any) -> tqdm:
    return tqdm(disable=not (show_progress(progress) and state.is_main_process), **kwargs)


def _gather(state: Any, part: Any) -> list[Any]:
    from accelerate.utils import gather_object

    return gather_object([part])


@implements("estimate_influence")
def estimate_influence(state: Any, model, train_dataset, targets, **options: Any):
    """:func:`hf_turnover.estimate_influence` over the processes of ``state``."""
    top_k, progress = options["top_k"], options["progress"]
    scorer = make_scorer(
        model, options["method"], variant=options["variant"],
        batch_size=resolve_train_batch_size(options["train_batch_size"], options["batch_size"]),
        loss_fn=options["loss_fn"], forward_fn=options["forward_fn"], dtype=options["dtype"],
        positions=options["positions"],
    )  # fmt: skip
    ids = training_ids(model, train_dataset, options["train_ids"], options["check_fingerprint"])
    rows = target_rows(targets)
    prep = TargetPrep(scorer, scorer.config.id_column)
    start, stop = shard_range(len(ids), state.process_index, state.num_processes)
    parts = []
    bar = _bar(state, progress, total=len(rows), desc="Scoring targets")
    for _index, vector in _shard_vectors(state, scorer, prep, rows, ids, start, stop):
        keep = keep_candidates(vector, top_k)
        parts.append(((start + keep).numpy(), vector[keep].numpy()))
        bar.update()
    bar.close()
    gathered = _gather(state, parts)  # [process][target] -> (positions, scores)
    target_ids, train_out, scores = [], [], []
    for index, row in enumerate(rows):
        position, score = merge_candidates(
            [p[index][0] for p in gathered], [p[index][1] for p in gathered], top_k
        )
        target_ids.append(
            np.full(len(position), int(row.get(scorer.config.id_column, index)), dtype=np.int64)
        )
        train_out.append(ids[torch.from_numpy(position)].numpy())
        scores.append(score)
    return scores_dataset(
        {
            "target_id": np.concatenate(target_ids),
            "train_id": np.concatenate(train_out),
            "score": np.concatenate(scores),
        },
        run_arguments(model, scorer, "influence", ids, top_k),
    )


@implements("mean_influence")
def mean_influence(state: Any, model, train_dataset, targets, *, progress=None, **kwargs: Any):
    """:func:`hf_turnover.mean_influence` over the processes of ``state``."""
    scorer, ids, rows, prep = mean_influence_setup(model, train_dataset, targets, kwargs)
    start, stop = shard_range(len(ids), state.process_index, state.num_processes)
    bar = _bar(state, progress, total=len(rows), desc="Mean influence")
    if isinstance(scorer, LinearScorer):
        grads: dict[str, torch.Tensor] = {}
        for target in target_gradients(state, scorer, prep, rows):  # summed in one process's order
            for name, g in target.items():
                grads[name] = grads.get(name, 0) + g.double().sum(0, keepdim=True)
            bar.update()
        total = torch.empty(0, dtype=torch.float64)
        if stop > start:
            mean_grads = {n: g / len(rows) for n, g in grads.items()}
            total = scorer.scores_from_gradients(mean_grads, ids[start:stop])[0].cpu()
    else:
        total = torch.zeros(stop - start, dtype=torch.float64)
        for row in rows:
            total += shard_scores(scorer, *prep(row), ids, start, stop).double()
            bar.update()
        total /= len(rows)
    bar.close()
    total = np.concatenate(_gather(state, total.float().numpy()))
    return scores_dataset(
        {"train_id": ids.numpy(), "score": total},
        {**run_arguments(model, scorer, "mean_influence", ids), "num_targets": len(rows)},
    )


@implements("self_influence")
def self_influence(state: Any, model, train_dataset, *, batch_size=64, progress=None, **kwargs: Any):
    """:func:`hf_turnover.self_influence` over the processes of ``state``: shards are whole batches."""
    scorer, train_dataset, ids = self_influence_setup(model, train_dataset, kwargs)
    start, stop = shard_range(len(ids), state.process_index, state.num_processes, unit=batch_size)
    scores = torch.empty(stop - start)
    shard = train_dataset.select(range(start, stop))
    bar = _bar(state, progress, total=-(-(stop - start) // batch_size), desc="Self-influence")
    done = 0
    for rows, inputs, labels in padded_batches(shard, model, batch_size, scorer.device):
        chunk = ids[start + done : start + done + len(rows)]
        scores[done : done + len(rows)] = scorer.self_scores(inputs, labels, chunk)
        done += len(rows)
        bar.update()
    bar.close()
    scores = np.concatenate(_gather(state, scores.numpy()))
    return scores_dataset(
        {"train_id": ids.numpy(), "score": scores}, run_arguments(model, scorer, "self_influence", ids)
    )
