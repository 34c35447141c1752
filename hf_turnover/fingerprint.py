"""Fingerprint of the exact training instances and ids a turn-over model was trained on.

Influence scores are only meaningful against the training set the masks were drawn for: the same ids on the
same instances. A model records the fingerprint of its training set; scoring against a set whose fingerprint
differs is refused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import datasets

FINGERPRINT_KEY = "turnover_training"  # attribute of the model's PretrainedConfig
CONTENT_COLUMNS = ("sentence", "text", "input_ids", "pixel_values", "image")


def default_columns(dataset: datasets.Dataset, id_column: str) -> list[str]:
    """The id column, the label column and the first content column the dataset has."""
    columns = [id_column]
    columns += [c for c in ("labels", "label") if c in dataset.column_names][:1]
    columns += [c for c in CONTENT_COLUMNS if c in dataset.column_names][:1]
    return columns


def training_fingerprint(
    dataset: datasets.Dataset, id_column: str = "instance_id", columns: Sequence[str] | None = None
) -> dict[str, Any]:
    """``{"sha256", "columns", "num_instances"}`` of ``dataset``, independent of row order."""
    columns = list(columns) if columns is not None else default_columns(dataset, id_column)
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"The training set lacks the columns {missing} that its fingerprint covers (it has "
            f"{dataset.column_names}). Pass the training set the model was trained on."
        )
    table = dataset.select_columns(columns).to_pandas().sort_values(id_column, kind="stable")
    digest = hashlib.sha256()
    for row in table.itertuples(index=False):
        digest.update(json.dumps([_plain(v) for v in row], ensure_ascii=False).encode())
    return {"sha256": digest.hexdigest(), "columns": columns, "num_instances": len(table)}


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, bytes):
        return hashlib.sha256(value).hexdigest()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in sorted(value.items())}
    return value


def recorded_fingerprint(model: Any) -> dict[str, Any] | None:
    """The training fingerprint a model recorded in training (``None`` for a model not trained by us)."""
    return getattr(getattr(model, "config", None), FINGERPRINT_KEY, None)


def check_fingerprint(
    recorded: dict[str, Any] | None, dataset: datasets.Dataset, what: str = "train_dataset", escape: str = ""
) -> None:
    """Raise unless ``dataset`` (named ``what`` in the error) is the training set ``recorded`` describes;
    a no-op when nothing was recorded. The id column is the first fingerprinted column."""
    if not recorded:
        return
    found = training_fingerprint(dataset, recorded["columns"][0], recorded["columns"])
    if found["sha256"] != recorded["sha256"]:
        raise ValueError(
            f"Refusing {what}: its fingerprint {found['sha256'][:12]} ({found['num_instances']} instances) is not "
            f"the one the model was trained on, {recorded['sha256'][:12]} ({recorded['num_instances']} "
            f"instances, columns {recorded['columns']}). Influence scores against another training set are "
            f"silently wrong: pass the exact training set, with the same ids, labels and texts{escape}."
        )
