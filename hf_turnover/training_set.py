"""The training set travels with a turn-over model, with the fingerprint of the exact instances and ids.

Beside the weights, ``training_set.json`` says where the training set is and what it must hash to:

* ``{"kind": "parquet", "file": "training_set.parquet"}``: saved beside the model (the default);
* ``{"kind": "package", "package": ..., "path": ..., "instance_ids": [...]}``: rows of a parquet file inside an
  installed Python package (the embedded default model uses the bundled Rotten Tomatoes sentences).

Loading checks the format version and the fingerprint against the one the model recorded in training; a
changed or missing training set is refused, since influence scores against it would be silently wrong.
Travels with Hub models as remote code (flat).
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any

import datasets
from transformers.utils import cached_file

from .atomic import atomic_path, atomic_write_text
from .fingerprint import check_fingerprint

INFO_FILE = "training_set.json"
DATA_FILE = "training_set.parquet"
FORMAT_VERSION = 1
TEXT_COLUMNS = ("sentence", "text")


def save_training_set(
    dataset: datasets.Dataset,
    directory: str | os.PathLike,
    fingerprint: dict[str, Any],
    text_column: str | None = None,
) -> Path:
    """Write the fingerprinted columns (and the text column) of ``dataset`` beside a model, atomically."""
    text_column = text_column or next((c for c in TEXT_COLUMNS if c in dataset.column_names), None)
    columns = list(dict.fromkeys([*fingerprint["columns"], *([text_column] if text_column else [])]))
    subset = dataset.select_columns(columns)
    check_fingerprint(fingerprint, subset, "the training set being saved")
    with atomic_path(Path(directory) / DATA_FILE) as tmp:
        subset.to_parquet(str(tmp))
    reference = {"kind": "parquet", "file": DATA_FILE, "text_column": text_column}
    return write_reference(directory, reference, fingerprint)


def write_reference(directory: str | os.PathLike, reference: dict[str, Any], fingerprint: dict) -> Path:
    """Write ``training_set.json``: where the training set is, and the fingerprint it must have."""
    info = {"format_version": FORMAT_VERSION, **reference, "fingerprint": fingerprint}
    ids = info.pop("instance_ids", None)  # thousands of ints: one line, not one line each
    text = json.dumps(info, indent=2)
    if ids is not None:
        text = text[: text.rindex("}")].rstrip() + f',\n  "instance_ids": {json.dumps(ids)}\n}}'
    return atomic_write_text(Path(directory) / INFO_FILE, text + "\n")


def load_training_set(
    name_or_path: str | os.PathLike, recorded: dict[str, Any] | None, **hub_kwargs: Any
) -> datasets.Dataset:
    """The training set that travels with the model at ``name_or_path`` (a folder or a Hub repo id).

    ``recorded`` is the model's training fingerprint (``config.turnover_training``); the loaded set must match
    it. ``hub_kwargs`` (``revision``, ``token``, ``cache_dir``...) address the model repo.
    """
    info_file = cached_file(
        str(name_or_path), INFO_FILE, _raise_exceptions_for_missing_entries=False, **hub_kwargs
    )
    if info_file is None:
        raise FileNotFoundError(
            f"No training set travels with the model at {name_or_path} (no {INFO_FILE}). Pass the exact "
            "training set it was trained on, with its instance ids: pipeline(..., train_dataset=dataset)."
        )
    info = json.loads(Path(info_file).read_text(encoding="utf-8"))
    if info.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{INFO_FILE} of {name_or_path} has format_version={info['format_version']}, but this code reads "
            f"versions up to {FORMAT_VERSION}. Upgrade hf_turnover (pip install -U hf_turnover)."
        )
    dataset = _resolve(info, name_or_path, hub_kwargs)
    if recorded and info.get("fingerprint", {}).get("sha256") != recorded.get("sha256"):
        raise ValueError(
            f"{INFO_FILE} of {name_or_path} describes a different training set than the model recorded "
            "in training; the folder mixes files of two models. Save the model and its training set again."
        )
    escape = ""
    if info.get("kind") == "package":  # e.g. a model exported before the bundled file was rebuilt
        escape = (
            f". This model reads rows of {info['path']} in the installed {info['package']} package, which has "
            f"changed since the model was made: install the {info['package']} version it was made with, or pass "
            "its training set (train_dataset=...)"
        )
    check_fingerprint(
        recorded or info.get("fingerprint"), dataset, f"the training set of {name_or_path}", escape
    )
    return dataset


def _resolve(info: dict[str, Any], name_or_path: str | os.PathLike, hub_kwargs: dict) -> datasets.Dataset:
    kind = info.get("kind")
    if kind == "parquet":
        path = cached_file(
            str(name_or_path), info["file"], _raise_exceptions_for_missing_entries=False, **hub_kwargs
        )
        if path is None:
            raise FileNotFoundError(
                f"{INFO_FILE} of {name_or_path} names {info['file']}, which is missing. Save the model with its "
                "training set again, or pass train_dataset= explicitly."
            )
        return datasets.Dataset.from_parquet(path)
    if kind == "package":
        table = datasets.Dataset.from_parquet(str(package_dir(info["package"]) / info["path"]))
        return select_ids(table, info["instance_ids"], info["fingerprint"]["columns"][0])
    raise ValueError(f"{INFO_FILE} of {name_or_path} has an unknown kind {kind!r}; upgrade hf_turnover.")


def package_dir(package: str) -> Path:
    """The folder of the installed package ``package`` (where bundled data and backbones are found)."""
    return Path(importlib.import_module(package).__file__).resolve().parent


def select_ids(table: datasets.Dataset, instance_ids: list[int], id_column: str) -> datasets.Dataset:
    position = {int(i): row for row, i in enumerate(table[id_column])}
    missing = [i for i in instance_ids if i not in position]
    if missing:
        raise ValueError(f"The referenced training set lacks the instance ids {missing[:5]}; it has changed.")
    return table.select([position[i] for i in instance_ids])
