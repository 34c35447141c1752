"""The LDS set-up of the default model: all-MiniLM-L6-v2 + ``seq_bn`` adapters in the top ``k`` layers + classifier.

The layers below the first adapter are frozen and carry no adapter, so their output (hidden states at every
position) is computed ONCE per sentence by the real MiniLM and cached (:func:`cache_hidden`). The model then runs
on the cache as itself: :func:`cut_bottom` swaps ``bert.embeddings`` for a module that returns ``inputs_embeds``
and the layers below for pass-throughs, so every remaining module keeps its name (turn-over masks are a function
of the name) and the library's hooks. :func:`verify_top` checks that the cut model on the cache gives the full
model's logits from tokens, unmasked and under own/flipped masks.

Training (:func:`train_top`) is the default recipe's: AdamW (no weight decay), linear schedule with warm-up, and
length-grouped minibatches (``transformers``' ``get_length_grouped_indices``, as ``group_by_length``). After the
last attention only [CLS] reaches the loss, so each step slices the inputs of the first module after it to
position 0 (``hf_turnover.reuse.keep_positions``, the scorer's own fast path): the same gradients, less work.

Peers: the exact last-layer influence function reuses :mod:`.minilm`; :func:`grad_dot` gives exact per-sample
gradient dot products (layers seen at one position factorise as in :class:`.minilm.GradFactors`; the lower
adapters, seen at every position, get explicit per-sample gradients). Positive = the training instance helped.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup
from transformers.trainer_pt_utils import get_length_grouped_indices

import hf_turnover
from hf_turnover import turnover_context
from hf_turnover.evaluation import score_matrix
from hf_turnover.heads import HEAD_CLASSIFIERS
from hf_turnover.linear import LinearScorer
from hf_turnover.linear import reference_gradient as linear_reference_gradient
from hf_turnover.pooled import head_features
from hf_turnover.reuse import keep_positions, tail_entry

from . import minilm as M
from .setups import CACHE_DIR


def reference_gradient(model, hidden: Hidden, num_rows: int = 1024, batch_size: int = 64) -> dict:
    """The ``method="centered"`` reference (:func:`hf_turnover.linear.reference_gradient`) of the first
    ``num_rows`` rows of ``hidden`` (the training sentences, already in a seeded order), under predicted labels."""
    rows = np.arange(min(num_rows, len(hidden)))
    batches = (hidden.batch(rows[s : s + batch_size]) for s in range(0, len(rows), batch_size))
    return linear_reference_gradient(model, batches)


# ----------------------------------------------------------------------------------------------------- cache
@dataclass
class Hidden:
    """Cached output of the frozen layers, one variable-length row per sentence, stored end to end."""

    values: torch.Tensor  # (sum of lengths, H)
    lengths: torch.Tensor  # (N,)

    def __post_init__(self) -> None:
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.int64), self.lengths.cumsum(0)])

    def __len__(self) -> int:
        return len(self.lengths)

    def row(self, i: int) -> torch.Tensor:
        return self.values[self.offsets[i] : self.offsets[i + 1]]  # (T_i, H)

    def batch(self, rows) -> dict[str, torch.Tensor]:
        """Model inputs for ``rows``: right-padded ``inputs_embeds`` (B, T, H) and ``attention_mask`` (B, T)."""
        rows = [int(r) for r in rows]
        embeds = nn.utils.rnn.pad_sequence([self.row(r) for r in rows], batch_first=True)
        mask = (torch.arange(embeds.shape[1])[None] < self.lengths[rows][:, None]).long()
        return {"inputs_embeds": embeds, "attention_mask": mask}

    def subset(self, rows) -> Hidden:
        rows = [int(r) for r in rows]
        return Hidden(torch.cat([self.row(r) for r in rows]), self.lengths[rows].clone())

    def chunks(self, size: int) -> Iterator[np.ndarray]:
        """Row indices in chunks of similar lengths (less padding)."""
        order = np.argsort(self.lengths.numpy(), kind="stable")
        for start in range(0, len(order), size):
            yield order[start : start + size]


@torch.no_grad()
def cache_hidden(
    model, tokenizer, sentences: list[str], below: int, batch_size: int = 64, use_disk: bool = True
) -> Hidden:
    """Hidden states after the bottom ``below`` layers of the real (adapter-free there) MiniLM, every position.

    Kept on disk keyed by the sentences, ``below`` and the backbone weights' path."""
    key = hashlib.sha256(("\n".join(sentences) + f"|{below}|" + M.backbone_path()).encode()).hexdigest()[:20]
    path = CACHE_DIR / f"minilm_hidden_{key}.pt"
    if use_disk and path.is_file():
        data = torch.load(path, weights_only=True)
        return Hidden(data["values"], data["lengths"])
    model.eval()
    rows: list[torch.Tensor | None] = [None] * len(sentences)
    layers = model.bert.encoder.layer
    top = [layers[i] for i in range(below, len(layers))]
    for i in range(below, len(layers)):  # their output is not needed here
        layers[i] = PassLayer()
    try:
        for index in np.array_split(np.argsort([len(s) for s in sentences], kind="stable"),
                                    max(1, math.ceil(len(sentences) / batch_size))):  # fmt: skip
            tokens = M._tokenize(tokenizer, [sentences[i] for i in index])
            hidden = model.bert(**tokens).last_hidden_state  # (B, T, H): the output of layer below - 1
            for r, i in enumerate(index):
                rows[i] = hidden[r, : int(tokens["attention_mask"][r].sum())].clone()
    finally:
        for i, layer in enumerate(top, start=below):
            layers[i] = layer
    cached = Hidden(torch.cat(rows), torch.tensor([len(r) for r in rows]))
    if use_disk:
        M.save_cache(path, {"values": cached.values, "lengths": cached.lengths})
    return cached


# ----------------------------------------------------------------------------------------------------- model
class PassEmbeddings(nn.Module):
    """Stands in for ``bert.embeddings``: the cached hidden states arrive as ``inputs_embeds``."""

    def forward(self, input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None, **kwargs):
        return inputs_embeds


class PassLayer(nn.Module):
    """Stands in for a frozen encoder layer whose output is already in the cache."""

    def forward(self, hidden_states, *args, **kwargs):
        return (hidden_states,)


def frozen_below(model) -> int:
    """Encoder layers below the first one with a trainable parameter."""
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and ".encoder.layer." in n]
    return min(int(n.split(".encoder.layer.")[1].split(".")[0]) for n in trainable)


@contextmanager
def cut_bottom(model, below: int) -> Iterator[None]:
    """Inside: ``model`` takes the cached output of its bottom ``below`` layers as ``inputs_embeds``. The swapped
    modules come back on exit."""
    layers = model.bert.encoder.layer
    saved = model.bert.embeddings, [layers[i] for i in range(below)]
    model.bert.embeddings = PassEmbeddings()
    for i in range(below):
        layers[i] = PassLayer()
    try:
        yield
    finally:
        model.bert.embeddings = saved[0]
        for i, layer in enumerate(saved[1]):
            layers[i] = layer


def no_dropout(model) -> None:
    """Plain dropout off (p=0): turn-over is the only dropout, so retraining on a subset is deterministic."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


class ClsOnly:
    """Forward-time context slicing the inputs of the first module after the last attention to [CLS]."""

    def __init__(self, model, hidden: Hidden) -> None:
        self.model = model
        self.entry = tail_entry(model, hidden.batch([0]))

    def __call__(self, length: int):
        return keep_positions(self.model, self.entry, [0], length)


@torch.no_grad()
def verify_top(model, below: int, tokenizer, sentences: list[str], ids: list[int]) -> dict:
    """Max |logit difference| between the full model from tokens and the cut model on the cache: unmasked, and
    under the own and flipped masks of ``ids`` (row r = instance ids[r])."""
    model.eval()
    tokens = M._tokenize(tokenizer, sentences)
    full = {"full": model(**tokens).logits}
    for mode in ("own", "flip"):
        with turnover_context(ids, mode):
            full[mode] = model(**tokens).logits
    inputs = cache_hidden(model, tokenizer, sentences, below, use_disk=False).batch(range(len(sentences)))
    out = {}
    with cut_bottom(model, below):
        out["full"] = float((model(**inputs).logits - full["full"]).abs().max())
        for mode in ("own", "flip"):
            with turnover_context(ids, mode):
                out[mode] = float((model(**inputs).logits - full[mode]).abs().max())
    out["logit_scale"] = float(full["full"].abs().max())
    out["masked_differs_from_full"] = float((full["own"] - full["full"]).abs().max())
    return out


# -------------------------------------------------------------------------------------------------- training
def train_top(
    model,
    init: dict[str, torch.Tensor],
    hidden: Hidden,
    labels: torch.Tensor,
    *,
    lr: float,
    epochs: int,
    order_seed: int,
    members: np.ndarray | None = None,
    batch_size: int = 32,
    warmup_ratio: float = 0.06,
    checkpoint_steps: tuple[int, ...] = (),
    schedule: str = "linear",
) -> M.TrainResult:
    """Turn-over training of the (cut) model's trainable parameters from ``init``: AdamW, warm-up, then a linear
    decay to zero (``schedule="linear"``) or a constant lr (``"constant"``).

    The minibatch sequence and the lr schedule depend on ``order_seed`` and N only; with ``members`` (0/1 per
    row) non-members are dropped from each minibatch, so every subset model sees the same batches, minus the
    non-members, with the same masks (ids = row indices) and the same lr at each step. ``checkpoint_steps``:
    minibatch counts after which to snapshot the parameters (TracIn)."""
    M.load_params(model, init)
    params = list(M.trainable(model).values())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    per_epoch = math.ceil(len(labels) / batch_size)
    warmup = math.ceil(warmup_ratio * epochs * per_epoch)
    if schedule == "constant":
        scheduler = get_constant_schedule_with_warmup(optimizer, warmup)
    else:
        scheduler = get_linear_schedule_with_warmup(optimizer, warmup, epochs * per_epoch)
    rng = torch.Generator().manual_seed(order_seed)
    keep = None if members is None else torch.as_tensor(members, dtype=torch.bool)
    cls_only = ClsOnly(model, hidden)
    out = M.TrainResult([], [], 0.0, 0)
    start_time, batches = time.perf_counter(), 0
    for _ in range(epochs):
        order = torch.tensor(get_length_grouped_indices(hidden.lengths.tolist(), batch_size, generator=rng))
        model.train()
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            rows = rows if keep is None else rows[keep[rows]]
            if len(rows):
                inputs = hidden.batch(rows)
                with turnover_context(rows), cls_only(inputs["attention_mask"].shape[1]):
                    loss = model(**inputs, labels=labels[rows]).loss  # K heads: the mean of their own losses
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                out.steps += 1
            scheduler.step()  # every minibatch of the sequence, empty or not: the same lr per step for all
            batches += 1
            if batches in checkpoint_steps:
                out.checkpoints.append(M.snapshot(model))
    model.eval()
    out.seconds = time.perf_counter() - start_time
    return out


def lr_at(lr: float, step: int, total: int, warmup_ratio: float, schedule: str = "linear") -> float:
    """The schedule's lr after ``step`` minibatches (TracIn's checkpoint weights)."""
    warmup = math.ceil(warmup_ratio * total)
    if step < warmup:
        factor = step / max(1, warmup)
    elif schedule == "constant":
        factor = 1.0
    else:
        factor = max(0.0, (total - step) / max(1, total - warmup))
    return lr * factor


# --------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def logits(model, hidden: Hidden, chunk: int = 128) -> torch.Tensor:
    model.eval()
    out = torch.empty(len(hidden), model.config.num_labels)
    for rows in hidden.chunks(chunk):
        out[rows] = model(**hidden.batch(rows)).logits
    return out


def accuracy(model, hidden: Hidden, labels: torch.Tensor) -> float:
    return float((logits(model, hidden).argmax(-1) == labels).float().mean())


def target_losses(model, hidden: Hidden, labels: torch.Tensor) -> np.ndarray:
    return F.cross_entropy(logits(model, hidden), labels, reduction="none").double().numpy()


@torch.no_grad()
def pooled_features(model, hidden: Hidden, chunk: int = 128, return_logits: bool = False):
    """(N, H) classifier inputs of the full network (no masks; K heads: (N, K H), their inputs side by side);
    ``return_logits``: also the logits (N, C) of the same pass, as ``(features, logits)``."""
    chunks = list(hidden.chunks(chunk))
    features, logits = head_features(model, (hidden.batch(rows) for rows in chunks), return_logits=True)
    rows = torch.as_tensor(np.concatenate(chunks))
    out, out_logits = torch.empty_like(features), torch.empty_like(logits)
    out[rows], out_logits[rows] = features, logits
    return (out, out_logits) if return_logits else out


def last_layer(model) -> SimpleNamespace:
    """The model's last linear layer as the influence function sees it. K heads: one layer on the K heads' inputs
    side by side (``top.pooled_features``), weights ``[W_0 ... W_K-1] / K`` and bias the mean, which computes the
    averaged model's logits exactly."""
    heads = [model.classifier, *getattr(model, HEAD_CLASSIFIERS, [])]
    layer = torch.nn.Linear(sum(h.in_features for h in heads), heads[0].out_features)
    with torch.no_grad():
        layer.weight.copy_(torch.cat([h.weight for h in heads], 1) / len(heads))
        layer.bias.copy_(torch.stack([h.bias for h in heads]).mean(0))
    return SimpleNamespace(classifier=layer)


def turnover_self_influence(model, hidden: Hidden, labels: torch.Tensor, chunk: int = 64) -> np.ndarray:
    """(N,) linearized ``I(z_i, z_i)`` of every cached training row (row i = instance i), as
    :func:`hf_turnover.self_influence` with ``method="linear"``."""
    scorer = LinearScorer(model)
    out = np.empty(len(hidden))
    for rows in hidden.chunks(chunk):
        ids = torch.as_tensor(rows, dtype=torch.int64)
        out[rows] = scorer.self_scores(hidden.batch(rows), labels[ids], ids).double().numpy()
    return out


def turnover_scores(
    model,
    hidden: Hidden,
    labels,
    num_train: int,
    method: str,
    batch_size=None,
    reference=None,
    basis=None,
    first_id: int = 0,
) -> np.ndarray:
    """(T, N) ``I(z_t, z_i)`` of ids ``first_id .. first_id + num_train - 1`` through
    :func:`hf_turnover.estimate_influence` on the cut model."""
    rows = [{"inputs_embeds": hidden.row(i), "attention_mask": torch.ones(int(hidden.lengths[i]), dtype=torch.long),
             "labels": int(labels[i])} for i in range(len(hidden))]  # fmt: skip
    ids = np.arange(first_id, first_id + num_train)
    result = hf_turnover.estimate_influence(model, None, rows, train_ids=ids.tolist(), method=method,
                                            reference=reference, basis=basis, batch_size=batch_size,
                                            check_fingerprint=False, progress=False)  # fmt: skip
    return score_matrix(result, range(len(rows)), ids)[0]
