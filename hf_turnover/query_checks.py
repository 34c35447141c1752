"""Cheap checks of how much a query's tokens say: unknown to the tokenizer, or never seen in the training set.

A text of emoji is one ``[UNK]``; a Russian sentence against an English training set is made of word pieces that no
training sentence holds. The model still predicts something with confidence, and the influence scores still rank
training instances, but neither says anything about the text. Two shares, over the query's non-special tokens:

- ``unknown_token_share``: tokens that are the tokenizer's unknown token;
- ``unseen_token_share``: tokens that occur in no training text (tokenized the same way, once per pipeline).

Above ``MOSTLY = 0.5`` the explanation carries a warning. Only tokens are compared: a text of familiar words in an
unfamiliar order passes (a distance in the model's representation would need a threshold calibrated per model).

This file travels with Hub models as remote code: installed packages only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

MOSTLY = 0.5  # a share of the query's tokens above which its explanation carries a warning


def content_ids(input_ids: Sequence[int], tokenizer: Any) -> list[int]:
    """The token ids of a query without the special tokens ([CLS], [SEP], padding)."""
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    unknown = getattr(tokenizer, "unk_token_id", None)
    return [int(i) for i in input_ids if int(i) not in special or int(i) == unknown]


def unknown_share(ids: list[int], tokenizer: Any) -> float:
    unknown = getattr(tokenizer, "unk_token_id", None)
    if not ids or unknown is None:
        return 0.0
    return sum(i == unknown for i in ids) / len(ids)


def seen_tokens(
    tokenizer: Any, texts: Sequence[str], max_length: int, batch_size: int = 1024
) -> torch.Tensor:
    """``(vocabulary,)`` bools: which token ids occur in ``texts`` (the training set, tokenized as queries are)."""
    seen = torch.zeros(len(tokenizer), dtype=torch.bool)
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(list(texts[start : start + batch_size]), truncation=True, max_length=max_length)
        for ids in encoded["input_ids"]:
            seen[torch.as_tensor(ids, dtype=torch.long)] = True
    return seen


def unseen_share(ids: list[int], seen: torch.Tensor | None) -> float | None:
    if seen is None:
        return None
    if not ids:
        return 0.0
    index = torch.as_tensor(ids, dtype=torch.long)
    inside = index < len(seen)
    return float((~inside).sum() + (~seen[index[inside]]).sum()) / len(ids)


def token_warnings(unknown: float, unseen: float | None) -> list[str]:
    """The warnings of a query whose tokens are mostly unknown or unseen (see the module docstring)."""
    out = []
    if unknown > MOSTLY:
        out.append(
            f"{unknown:.0%} of this input's tokens are unknown to the tokenizer: the prediction and its "
            "explanation say little about the text (another language or script, emoji?)."
        )
    if unseen is not None and unseen > MOSTLY:
        out.append(
            f"{unseen:.0%} of this input's tokens occur in no training text: it is far from the training data, "
            "so the prediction and its explanation say little about it."
        )
    return out
