"""Frozen bottom layers, run once: their output is cached per token and the model trains and scores on it.

When only the top layers of a backbone train (adapters in the top ``k`` layers, the classifier above them), the
embeddings and the layers below give every sentence the same output in every step. ``bottom_layer_states`` runs
them once per sentence (eval mode), ``with_states`` stores the result as an ``inputs_embeds`` column, and
``cut_bottom`` swaps those modules for pass-throughs so the model runs on the cache as itself: every remaining
module keeps its name, so turn-over masks and hooks are unchanged. ``restore_bottom`` puts the real modules back
(for token inputs, saving and pushing). Used by `sst2.py` (the main job) and `cleansing.py`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer

from hf_turnover.atomic import atomic_path


@torch.inference_mode()
def bottom_layer_states(
    model_path: str, sentences: list[str], max_length: int, layers: int, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Hidden states after the embeddings and the bottom ``layers`` encoder layers (eval mode: no dropout), per
    token of every sentence: ``(sum of lengths, D)`` float32 and the offsets ``(N + 1,)`` of each sentence."""
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    encoder = AutoModel.from_pretrained(model_path, add_pooling_layer=False).eval()
    encoder.encoder.layer = encoder.encoder.layer[:layers]  # the layers above are not needed here
    lengths = [len(ids) for ids in tokenizer(sentences, truncation=True, max_length=max_length)["input_ids"]]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    out = np.empty((offsets[-1], encoder.config.hidden_size), dtype=np.float32)
    for rows, batch in length_sorted_batches(tokenizer, sentences, max_length, batch_size, "Bottom layers"):
        hidden = encoder(**batch).last_hidden_state  # (B, T, D)
        for row, states in zip(rows, hidden, strict=True):
            out[offsets[row] : offsets[row + 1]] = states[: lengths[row]].numpy()
    return out, offsets


def length_sorted_batches(tokenizer, sentences: list[str], max_length: int, batch_size: int, desc: str):
    """``(rows, tokenized batch)`` over ``sentences`` in order of length: little padding per batch."""
    order = np.argsort([len(s) for s in sentences], kind="stable")
    for start in tqdm(range(0, len(order), batch_size), desc=desc):
        rows = order[start : start + batch_size]
        texts = [sentences[i] for i in rows]
        yield (
            rows,
            tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"),
        )


def cached(compute, cache_dir: Path, kind: str, *key: Any) -> tuple[np.ndarray, ...]:
    """``compute()`` (a tuple of arrays) once per ``key``, kept in ``cache_dir`` as ``<kind>-<hash>.npz``."""
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
    path = cache_dir / f"{kind}-{digest}.npz"
    if not path.is_file():
        arrays = compute()
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, *arrays)
    with np.load(path) as stored:
        return tuple(stored[f"arr_{i}"] for i in range(len(stored.files)))


def states_column(states: np.ndarray, offsets: np.ndarray) -> pa.Array:
    """Per-sentence ``(T_i, D)`` states as one Arrow list column, without copying through Python lists."""
    inner = pa.FixedSizeListArray.from_arrays(pa.array(states.reshape(-1)), states.shape[1])
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), inner)


def with_states(split: datasets.Dataset, states: np.ndarray, offsets: np.ndarray) -> datasets.Dataset:
    """``split`` with the cached states as ``inputs_embeds`` (read as numpy arrays) and their ``length`` (for
    ``group_by_length``); its other columns (ids, labels, text) stay as they are."""
    split = split.add_column("length", np.diff(offsets).tolist())
    return split.add_column("inputs_embeds", states_column(states, offsets)).with_format(
        "numpy", columns=["inputs_embeds"], output_all_columns=True
    )


class PadStates:
    """Collates rows of cached states: pads ``inputs_embeds`` to the batch's longest row, adds the attention
    mask, and drops the other columns (text, length) that Trainer keeps when ``remove_unused_columns=False``."""

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        states = [torch.as_tensor(f["inputs_embeds"]) for f in features]  # each (T_i, D)
        lengths = torch.tensor([len(s) for s in states])
        mask = (torch.arange(int(lengths.max()))[None, :] < lengths[:, None]).long()  # (B, T)
        batch = {"inputs_embeds": nn.utils.rnn.pad_sequence(states, batch_first=True), "attention_mask": mask}
        batch["labels"] = torch.tensor([int(f["label"]) for f in features])
        return batch


class CachedEmbeddings(nn.Module):
    """Stands in for the embeddings: ``inputs_embeds`` already holds the output of the cached layers."""

    def forward(self, inputs_embeds: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return inputs_embeds


class CachedLayer(nn.Module):
    """Stands in for a frozen bottom encoder layer whose output is cached: passes the hidden states through."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor]:
        return (hidden_states,)


def cut_bottom(model: nn.Module, layers: int) -> nn.Module:
    """Swap ``model.bert``'s embeddings and bottom ``layers`` encoder layers for pass-throughs (in place; returns
    ``model``): its inputs are then the cached states of :func:`with_states`. :func:`restore_bottom` undoes it."""
    bert = model.bert
    trainable = [n for n, p in bert.encoder.layer[:layers].named_parameters() if p.requires_grad]
    if trainable or any(p.requires_grad for p in bert.embeddings.parameters()):
        raise ValueError(
            f"The bottom {layers} layers train ({trainable[:3] or 'the embeddings'}...): their output cannot be "
            "cached. Cache fewer layers, or freeze them."
        )
    model.__dict__["_frozen_bottom"] = (bert.embeddings, list(bert.encoder.layer[:layers]))  # not submodules
    bert.embeddings = CachedEmbeddings()
    for index in range(layers):
        bert.encoder.layer[index] = CachedLayer()
    return model


def restore_bottom(model: nn.Module) -> nn.Module:
    """Put back the modules :func:`cut_bottom` took out (in place; returns ``model``): it takes tokens again."""
    embeddings, layers = model.__dict__.pop("_frozen_bottom")
    model.bert.embeddings = embeddings
    for index, layer in enumerate(layers):
        model.bert.encoder.layer[index] = layer
    return model
