"""A resumable scoring run: influence scores written shard by shard to a folder, by one process or many.

The training ids are cut into shards of ``shard_size`` ids; the processes of an ``accelerate launch`` take
shards in turn (process ``r`` of ``K`` takes shards ``r, r + K, ...``) and write each one atomically as it is
finished. The folder::

    arguments.json                 the run's arguments (model and training-set fingerprints, targets, method...)
                                   and "complete": true once every shard is written
    shards/shard-00003-of-00010.parquet   one finished shard (its top and bottom ``top_k`` per target with top_k)
    data/*.parquet                 the result, a dataset: the shards themselves, or with top_k the global
                                   top and bottom ``top_k`` per target merged from them

An interrupted run started again with the same arguments skips its finished shards; a rerun of a complete run
does no work. Shards written with other arguments, another model or another training set are refused. The
scores equal those of :func:`hf_turnover.estimate_influence` (``kind="influence"``), ``self_influence`` and
``mean_influence`` run in one process, bit for bit on the CPU.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.parquet as pq
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.utils import logging

from . import influence as single
from .atomic import atomic_write_text
from .distributed import keep_candidates, merge_candidates, shard_scores
from .inputs import label_column, padded_batches, python_format
from .linear import LinearScorer, gradient_blocks, make_scorer
from .results import METADATA_KEY, combine_scores, load_scores, save_scores, score_arguments, scores_dataset
from .scoring_steps import TargetPrep, run_arguments, show_progress, target_rows
from .scoring_steps import scorer_kwargs as steps_scorer_kwargs

logger = logging.get_logger(__name__)

KINDS = ("influence", "self_influence", "mean_influence")
ARGUMENTS_FILE = "arguments.json"
# Arguments that, when they differ, mean the shards belong to another model or training set.
_IDENTITY = ("model_sha256", "training_fingerprint")


def model_sha256(model: nn.Module) -> str:
    """sha256 of every tensor of ``model.state_dict()`` (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def targets_sha256(rows: Sequence[Mapping[str, Any]]) -> str:
    return hashlib.sha256(
        json.dumps([dict(r) for r in rows], sort_keys=True, default=str).encode()
    ).hexdigest()


class ScoringRun:
    """Scores ``kind`` for ``model`` against ``train_dataset`` (and ``targets``) into ``output_dir``.

    ``train_dataset`` holds the id column (and, for self-influence, the model inputs and labels); ``targets``
    are rows with model inputs (and a label, else the predicted label is explained). ``scorer_kwargs`` go to
    :func:`hf_turnover.linear.make_scorer` (``method``, default ``"linear"`` as everywhere; ``variant``,
    ``train_batch_size``: training ids per forward of ``"exact"``; ``dtype``...).
    """

    def __init__(
        self,
        output_dir: str | Path,
        model: nn.Module,
        train_dataset: datasets.Dataset,
        targets: Sequence[Mapping[str, Any]] | datasets.Dataset | None = None,
        *,
        kind: str = "influence",
        top_k: int | None = None,
        shard_size: int = 4096,
        self_batch_size: int = 64,
        extra_arguments: Mapping[str, Any] | None = None,
        **scorer_kwargs: Any,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r} is unknown; use one of {KINDS}.")
        if kind != "self_influence" and targets is None:
            raise ValueError(f"kind={kind!r} needs targets.")
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}.")
        self.output_dir, self.model, self.kind, self.top_k = Path(output_dir), model, kind, top_k
        self.train = python_format(train_dataset)
        self.rows = target_rows(targets) if targets is not None else []
        self.scorer = make_scorer(
            model, scorer_kwargs.pop("method", "linear"), **steps_scorer_kwargs(scorer_kwargs)
        )
        self.ids = single.training_ids(model, self.train, None, check=True)
        self.self_batch_size = self_batch_size
        if kind == "self_influence":
            if label_column(self.train.column_names) is None:
                raise ValueError(
                    f"Self-influence needs labels; the training set has {self.train.column_names}."
                )
            shard_size = (
                -(-shard_size // self_batch_size) * self_batch_size
            )  # whole batches: the same padding
        self.shard_size = shard_size
        self.num_shards = -(-len(self.ids) // shard_size)
        self.arguments = {
            **run_arguments(model, self.scorer, kind, self.ids, top_k if kind == "influence" else None),
            "model_sha256": model_sha256(model),
            "targets_sha256": targets_sha256(self.rows),
            "num_targets": len(self.rows),
            "batch_size": self.scorer.batch_size if kind != "self_influence" else self_batch_size,
            "shard_size": shard_size,
            **dict(extra_arguments or {}),
        }
        self._prep = TargetPrep(self.scorer, self.scorer.config.id_column)
        self._gradients: list[tuple[int, dict[str, torch.Tensor]]] | None = None
        self._warned = False

    # -- files -------------------------------------------------------------------------------------------
    def shard_path(self, index: int) -> Path:
        folder = "shards" if self.top_k is not None and self.kind == "influence" else "data"
        return self.output_dir / folder / f"shard-{index:05d}-of-{self.num_shards:05d}.parquet"

    def data_files(self) -> list[Path]:
        return sorted((self.output_dir / "data").glob("*.parquet"))

    def check(self) -> bool:
        """Refuse a folder written with other arguments; ``True`` when the run there is complete."""
        found = self.output_dir / ARGUMENTS_FILE
        recorded = json.loads(found.read_text()) if found.is_file() else None
        if recorded is not None:
            self._compare(recorded, str(found))
        for path in sorted(self.output_dir.glob("*/shard-*.parquet")):
            metadata = pq.read_schema(path).metadata or {}
            self._compare(json.loads(metadata.get(METADATA_KEY, b"{}")), str(path))
        return bool(recorded and recorded.get("complete"))

    def _compare(self, recorded: Mapping[str, Any], what: str) -> None:
        recorded = {k: v for k, v in recorded.items() if k != "complete"}
        if recorded == self.arguments:
            return
        identity = [k for k in _IDENTITY if recorded.get(k) != self.arguments.get(k)]
        if identity:
            raise ValueError(
                f"Refusing {what}: it was written by another model or training set ({', '.join(identity)}: "
                f"{str(recorded.get(identity[0]))[:12]} there, {str(self.arguments[identity[0]])[:12]} now). "
                "Scores of different models or training sets must not be mixed: use another output_dir."
            )
        keys = sorted(
            k for k in set(recorded) | set(self.arguments) if recorded.get(k) != self.arguments.get(k)
        )
        raise ValueError(
            f"Refusing {what}: it was written with other arguments (differing: {keys}). Run with the same "
            "arguments to resume, or use another output_dir."
        )

    # -- scoring -----------------------------------------------------------------------------------------
    def run(
        self, state: Any | None = None, progress: bool | None = None, stop_after: int | None = None
    ) -> bool:
        """Score the missing shards of this process (all of them without ``state``); merge on the main process.

        ``stop_after`` stops after that many newly written shards (an interruption, for tests). Returns
        ``True`` when the run is complete.
        """
        rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
        main = rank == 0
        if self.check():
            return True
        if main:
            atomic_write_text(self.output_dir / ARGUMENTS_FILE, json.dumps(self.arguments, indent=2) + "\n")
        mine = [i for i in range(rank, self.num_shards, world) if not self.shard_path(i).is_file()]
        show = show_progress(progress) and main
        for written, index in enumerate(tqdm(mine, desc=f"Scoring {self.kind}", disable=not show)):
            if stop_after is not None and written >= stop_after:
                return False
            save_scores(self.score_shard(index), self.shard_path(index))
        if state is not None:
            state.wait_for_everyone()
        if main:
            self._finish()
        if state is not None:
            state.wait_for_everyone()
        return True

    def score_shard(self, index: int) -> datasets.Dataset:
        start, stop = index * self.shard_size, min(len(self.ids), (index + 1) * self.shard_size)
        if self.kind == "self_influence":
            columns = {"train_id": self.ids[start:stop].numpy(), "score": self._self_scores(start, stop)}
        elif self.kind == "mean_influence":
            columns = {"train_id": self.ids[start:stop].numpy(), "score": self._mean_scores(start, stop)}
        else:
            target_ids, train_ids, scores = [], [], []
            for row_index, vector in self._vectors(start, stop):
                keep = keep_candidates(vector, self.top_k)
                target = int(self.rows[row_index].get(self.scorer.config.id_column, row_index))
                target_ids.append(np.full(len(keep), target, dtype=np.int64))
                train_ids.append(self.ids[start:stop][keep].numpy())
                scores.append(vector[keep].numpy())
            columns = {
                "target_id": np.concatenate(target_ids),
                "train_id": np.concatenate(train_ids),
                "score": np.concatenate(scores),
            }
        return scores_dataset(columns, self.arguments)

    def _vectors(self, start: int, stop: int):
        """``(target index, scores of ids[start:stop])``; the linear method's gradients are computed once."""
        if not isinstance(self.scorer, LinearScorer):
            for index, row in enumerate(self.rows):
                inputs, labels = self._prep(row)
                self._warn_if_shards_cut_chunks(inputs)
                yield index, shard_scores(self.scorer, inputs, labels, self.ids, start, stop)
            return
        for first, grads in self._linear_gradients():
            matrix = self.scorer.scores_from_gradients(grads, self.ids[start:stop]).cpu()  # (T, n)
            for offset, vector in enumerate(matrix):
                yield first + offset, vector

    def _warn_if_shards_cut_chunks(self, inputs: dict[str, torch.Tensor]) -> None:
        step = self.scorer.ids_per_forward(inputs)
        if self.shard_size % step and len(self.ids) > self.shard_size and not self._warned:
            self._warned = True
            logger.warning(
                f"shard_size={self.shard_size} cuts the exact engine's chunks of {step} ids per forward: a shard "
                "computes the whole chunks it overlaps and keeps its part (same scores, more work). Use a "
                f"multiple of {step} (e.g. {max(step, self.shard_size // step * step)}), or batch_size."
            )

    def _linear_gradients(self, block: int = 32) -> list[tuple[int, dict[str, torch.Tensor]]]:
        if self._gradients is None:  # the blocks influence._score_targets uses
            self._gradients = [
                (s, gradient_blocks(self.scorer, [self._prep(r) for r in self.rows[s : s + block]]))
                for s in range(0, len(self.rows), block)
            ]
        return self._gradients

    def _mean_scores(self, start: int, stop: int) -> np.ndarray:
        if isinstance(self.scorer, LinearScorer):
            if self._gradients is None:
                grads: dict[str, torch.Tensor] = {}
                for row in self.rows:  # summed in the order influence.mean_influence sums them
                    for name, g in self.scorer.mask_gradients(*self._prep(row)).items():
                        grads[name] = grads.get(name, 0) + g.double().sum(0, keepdim=True)
                self._gradients = [(0, {n: g / len(self.rows) for n, g in grads.items()})]
            mean = self.scorer.scores_from_gradients(self._gradients[0][1], self.ids[start:stop])[0].cpu()
            return mean.float().numpy()
        total = torch.zeros(stop - start, dtype=torch.float64)
        for row in self.rows:
            total += shard_scores(self.scorer, *self._prep(row), self.ids, start, stop).double()
        return (total / len(self.rows)).float().numpy()

    def _self_scores(self, start: int, stop: int) -> np.ndarray:
        scores, done = torch.empty(stop - start), 0
        shard = self.train.select(range(start, stop))
        for rows, inputs, labels in padded_batches(
            shard, self.model, self.self_batch_size, self.scorer.device
        ):
            ids = self.ids[start + done : start + done + len(rows)]
            scores[done : done + len(rows)] = self.scorer.self_scores(inputs, labels, ids)
            done += len(rows)
        return scores.numpy()

    def _finish(self) -> None:
        """With top_k: merge the shards' candidates into the global top and bottom per target. Mark complete."""
        if self.kind == "influence" and self.top_k is not None:
            parts = [load_scores(self.shard_path(i)) for i in range(self.num_shards)]
            target_ids = [int(r.get(self.scorer.config.id_column, i)) for i, r in enumerate(self.rows)]
            merged = merge_top_k(parts, self.top_k, target_ids)
            save_scores(merged, self.output_dir / "data" / "top_k.parquet")
        complete = {**self.arguments, "complete": True}
        atomic_write_text(self.output_dir / ARGUMENTS_FILE, json.dumps(complete, indent=2) + "\n")


def merge_top_k(parts: list[datasets.Dataset], top_k: int, target_ids: Sequence[int]) -> datasets.Dataset:
    """The global top and bottom ``top_k`` per target from the shards' candidates (each in id order)."""
    tables = [p.with_format("numpy")[:] for p in parts]
    columns: dict[str, list[np.ndarray]] = {"target_id": [], "train_id": [], "score": []}
    for target in target_ids:
        picked = [
            (t["train_id"][t["target_id"] == target], t["score"][t["target_id"] == target]) for t in tables
        ]
        train_id, score = merge_candidates([p[0] for p in picked], [p[1] for p in picked], top_k)
        columns["target_id"].append(np.full(len(train_id), target, dtype=np.int64))
        columns["train_id"].append(train_id)
        columns["score"].append(score)
    return scores_dataset({k: np.concatenate(v) for k, v in columns.items()}, score_arguments(parts[0]))


def load_run(output_dir: str | Path) -> datasets.Dataset:
    """The result of a complete run in ``output_dir`` (its ``data/*.parquet``), with its arguments."""
    output_dir = Path(output_dir)
    found = output_dir / ARGUMENTS_FILE
    if not found.is_file() or not json.loads(found.read_text()).get("complete"):
        raise ValueError(f"{output_dir} holds no complete scoring run (start or resume it first).")
    return combine_scores([load_scores(p) for p in sorted((output_dir / "data").glob("*.parquet"))])
