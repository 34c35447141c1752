"""Influence results are data: a `datasets.Dataset` plus the arguments that made it.

The arguments travel in ``dataset.info.description`` (JSON) and in the parquet file's metadata, so results
made with different settings (model, variant, training set, masks) are never mixed by accident.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.parquet as pq

from .atomic import atomic_path

METADATA_KEY = b"hf_turnover"
# Arguments that may differ between results that are still comparable (different targets, different k).
_MERGEABLE = ("top_k", "num_targets")


def scores_dataset(columns: dict[str, np.ndarray], arguments: dict[str, Any]) -> datasets.Dataset:
    info = datasets.DatasetInfo(description=json.dumps(arguments, sort_keys=True))
    return datasets.Dataset.from_dict(
        {k: list(v) if v.dtype == object else v for k, v in columns.items()}, info=info
    )


def score_arguments(scores: datasets.Dataset) -> dict[str, Any]:
    """The arguments recorded with ``scores`` (empty if it was not made by hf_turnover)."""
    try:
        return json.loads(scores.info.description or "{}")
    except json.JSONDecodeError:
        return {}


def save_scores(scores: datasets.Dataset, path: str | os.PathLike) -> Path:
    """Write ``scores`` to a parquet file with its arguments in the file metadata (atomically)."""
    path = Path(path)
    table = scores.with_format("arrow")[:]  # the rows a filter/select/sort kept, in their order
    table = table.replace_schema_metadata(
        {**(table.schema.metadata or {}), METADATA_KEY: scores.info.description.encode()}
    )
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def load_scores(path: str | os.PathLike) -> datasets.Dataset:
    """Read a parquet file written by :func:`save_scores` (or downloaded from the Hub)."""
    table = pq.read_table(path)
    description = (table.schema.metadata or {}).get(METADATA_KEY, b"{}").decode()
    table = table.replace_schema_metadata(
        {k: v for k, v in (table.schema.metadata or {}).items() if k != METADATA_KEY}
    )
    return datasets.Dataset(table, info=datasets.DatasetInfo(description=description))


def same_arguments(
    results: Sequence[datasets.Dataset], compared: Callable[[dict], dict], why: str = ""
) -> list[dict[str, Any]]:
    """The arguments of every result; raises unless ``compared(arguments)`` is the same for all of them."""
    arguments = [score_arguments(r) for r in results]
    reference = compared(arguments[0])
    for index, args in enumerate(arguments[1:], start=1):
        other = compared(args)
        if other != reference:
            diff = sorted(k for k in set(reference) | set(other) if reference.get(k) != other.get(k))
            raise ValueError(
                f"Result {index} was made with different arguments than result 0 (differing: {diff}){why}."
            )
    return arguments


def combine_scores(results: list[datasets.Dataset]) -> datasets.Dataset:
    """Concatenate results (e.g. scored on several machines); refuse results made with different arguments."""
    if not results:
        raise ValueError("combine_scores needs at least one result.")
    same_arguments(
        results,
        lambda args: {k: v for k, v in args.items() if k not in _MERGEABLE},
        "; influence scores made with different settings cannot be combined",
    )
    combined = datasets.concatenate_datasets(results)
    combined.info.description = results[0].info.description
    return combined


def push_scores(
    scores: datasets.Dataset, repo_id: str, path_in_repo: str = "influence.parquet", **kwargs
) -> str:
    """Upload ``scores`` (parquet with its arguments) to a Hub dataset repo; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="dataset", exist_ok=True, private=kwargs.pop("private", None))
    with tempfile.TemporaryDirectory() as tmp:
        local = save_scores(scores, Path(tmp) / "scores.parquet")
        info = api.upload_file(
            path_or_fileobj=str(local),
            path_in_repo=path_in_repo,
            repo_id=repo_id,
            repo_type="dataset",
            **kwargs,
        )
    return str(info)
