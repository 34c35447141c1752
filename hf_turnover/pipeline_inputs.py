"""Reading the inputs and options of ``InfluencePipeline``: texts from lists, generators and datasets, and
the token limits, checked with errors that name the bad value and the fix.

This file travels with Hub models as remote code: installed packages and sibling modules only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import datasets

from .training_set import TEXT_COLUMNS

DEFAULT_MAX_LENGTH = 128  # tokens per text (or the model's limit, if lower)


def checked_texts(texts: list[Any], offset: int = 0) -> list[str]:
    """``texts`` if each is a non-empty string, else the error naming the first bad one (by its position)."""
    for index, text in enumerate(texts, start=offset):
        if not isinstance(text, str):
            raise TypeError(f"Input {index} is a {type(text).__name__} ({text!r:.80}), not a text.")
        if not text.strip():
            raise ValueError(f"Input {index} is an empty string: there is no prediction to explain.")
    return texts


def texts_of(inputs: Any) -> Iterable[Any]:
    """The texts of a generator, ``KeyDataset``, torch dataset or ``datasets.Dataset``, read lazily."""
    if isinstance(inputs, datasets.Dataset):
        column = next((c for c in ("text", *TEXT_COLUMNS) if c in inputs.column_names), None)
        if column is None:
            raise ValueError(
                f"The dataset has no text column ('text' or 'sentence'; it has {inputs.column_names}): pass "
                "KeyDataset(dataset, 'your_column') (transformers.pipelines.pt_utils) or dataset['your_column']."
            )
        return (row[column] for row in inputs.select_columns([column]))
    if isinstance(inputs, (Mapping, bytes)) or inputs is None:
        raise TypeError(
            f"InfluencePipeline takes a text, a list of texts, a generator, a KeyDataset or a datasets.Dataset, "
            f"got {type(inputs).__name__}: {inputs!r:.80}."
        )
    if hasattr(inputs, "__len__") and hasattr(inputs, "__getitem__") and not hasattr(inputs, "__iter__"):
        return (inputs[i] for i in range(len(inputs)))  # torch-style datasets such as KeyDataset
    if not hasattr(inputs, "__iter__"):
        raise TypeError(
            f"InfluencePipeline takes a text or a list of texts, got {type(inputs).__name__}: {inputs!r:.80}."
        )
    return inputs


def query_fields(prepared: dict[str, Any]) -> dict[str, Any]:
    keys = ("truncated", "unknown_token_share", "unseen_token_share")
    return {**{k: prepared[k] for k in keys}, "query_warnings": prepared["warnings"]}


def truncation_flag(value: Any) -> bool:
    """``truncation`` as transformers accepts it: a bool or a tokenizer strategy name."""
    if isinstance(value, bool):
        return value
    if value in ("longest_first", "only_first"):
        return True
    if value == "do_not_truncate":
        return False
    raise ValueError(
        f"truncation={value!r} is not a bool or a strategy ('longest_first', 'only_first', 'do_not_truncate')."
    )


def checked_max_length(model: Any, tokenizer: Any, max_length: int | None) -> int:
    """``max_length``, by default ``DEFAULT_MAX_LENGTH`` (or the model's limit if lower); above the limit is
    refused (the position embeddings end there)."""
    limit = model_token_limit(model, tokenizer)
    if max_length is None:
        return min(DEFAULT_MAX_LENGTH, limit)
    if max_length > limit:
        raise ValueError(
            f"max_length={max_length} is more than this model reads ({limit} tokens, its position embeddings "
            f"and tokenizer): pass max_length={limit} or less; longer texts are truncated to it."
        )
    return max_length


def positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")
    return value


def model_token_limit(model: Any, tokenizer: Any) -> int:
    limit = getattr(model.config, "max_position_embeddings", None) or 512
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if tokenizer_limit and tokenizer_limit < 1_000_000:  # "no limit" is a huge sentinel value
        limit = min(limit, tokenizer_limit)
    return limit
