"""Peer rankings for `recipes/cleansing.py`, read off the same trained model as turn-over's mean influence.

Every score follows hf_turnover's sign convention, **positive: the training sentence helped the targets** (the
target validation sentences), and the recipe removes the most negative ones. All of them use the full network
(eval mode: no mask, no dropout) at the end of training:

* ``gradient_dot``: ``g_v . g_i``, the mean target-loss gradient dotted with the sentence's loss gradient over
  every trainable parameter (adapters and classifier): TracIn at the last checkpoint, without the learning rate.
* ``influence_function``: ``g_v^T (H + damping I)^{-1} g_i`` on the classifier's weights and bias only, with the
  exact cross-entropy Hessian of that layer over the training set (features held fixed), as Koh & Liang. With K
  masked heads the layer is the heads' classifiers as one (their inputs side by side, weights ``[W_0 ... W_K-1] / K``,
  the mean bias), which computes the averaged model's logits.
* ``loss``: minus the sentence's training loss (the highest-loss sentences are removed: the usual way to find
  mislabelled data).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import partial

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from hf_turnover.heads import HEAD_CLASSIFIERS
from hf_turnover.inputs import model_input_names

PEERS = ("gradient_dot", "influence_function", "loss")
IF_DAMPING = 0.01  # as benchmarks/lib/faithfulness_lib/peers.py, fixed before looking at any result


def _batches(data: datasets.Dataset, collator, batch_size: int) -> Iterator[tuple[np.ndarray, dict]]:
    """``(row positions, collated batch)`` over ``data`` in length order (less padding)."""
    lengths = data["length"] if "length" in data.column_names else np.zeros(len(data))
    order = np.argsort(np.asarray(lengths), kind="stable")
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        yield rows, collator([data[int(i)] for i in rows])


def _inputs(model: nn.Module, batch: dict) -> dict:
    names = model_input_names(model)
    return {k: v for k, v in batch.items() if k in names}


class _Features:
    """Records the classifier's input (the pooled [CLS] features) of every forward while active; with K masked
    heads (``hf_turnover.heads``) the K heads' inputs side by side, the input of one linear layer with weights
    ``[W_0 ... W_K-1] / K`` that computes the averaged model's logits exactly."""

    def __init__(self, model: nn.Module) -> None:
        self.classifiers = [model.classifier, *getattr(model, HEAD_CLASSIFIERS, [])]
        self.inputs: dict[int, torch.Tensor] = {}
        self.handles = [
            c.register_forward_pre_hook(partial(self._record, k)) for k, c in enumerate(self.classifiers)
        ]

    def _record(self, head: int, module: nn.Module, args: tuple) -> None:
        self.inputs[head] = args[0].detach()

    @property
    def value(self) -> torch.Tensor:
        return torch.cat([self.inputs[k] for k in range(len(self.classifiers))], 1)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def peer_scores(
    model: nn.Module,
    train: datasets.Dataset,
    targets: datasets.Dataset,
    collator,
    batch_size: int = 64,
) -> dict[str, np.ndarray]:
    """``{peer: scores (N,)}`` for every peer in ``PEERS``, in the row order of ``train`` (positive: helped
    ``targets``)."""
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    features = _Features(model)
    try:
        with sdpa_kernel(SDPBackend.MATH):  # the fused CPU attention kernel has no double backward
            target_grad, *target = _target_pass(model, targets, collator, params)
            train_out = _train_pass(model, train, collator, params, target_grad, batch_size, features)
    finally:
        features.remove()
    influence = last_layer_influence(train_out["feats"], train_out["probs"], train_out["labels"], *target)
    return {"gradient_dot": train_out["dot"], "influence_function": influence, "loss": -train_out["loss"]}


def _target_pass(model, targets, collator, params):
    """Mean target-loss gradient over ``params``, and the targets' classifier features, probabilities, labels."""
    grads = [torch.zeros_like(p) for p in params]
    feats, probs, labels = [], [], []
    features = _Features(model)
    try:
        for _, batch in _batches(targets, collator, 64):
            logits = model(**_inputs(model, batch)).logits
            loss = F.cross_entropy(logits, batch["labels"], reduction="sum") / len(targets)
            for total, g in zip(grads, torch.autograd.grad(loss, params, allow_unused=True), strict=True):
                if g is not None:
                    total += g
            feats.append(features.value)
            probs.append(logits.detach().softmax(-1))
            labels.append(batch["labels"])
    finally:
        features.remove()
    return grads, torch.cat(feats), torch.cat(probs), torch.cat(labels)


def _train_pass(model, train, collator, params, target_grad, batch_size, features) -> dict[str, np.ndarray]:
    """Per training row: loss, ``g_v . g_i`` (one double-backward per batch), classifier features and
    probabilities, in the row order of ``train``."""
    n = len(train)
    out = {"loss": np.empty(n), "dot": np.empty(n), "labels": np.empty(n, dtype=np.int64)}
    feats, probs = [None] * n, [None] * n
    for rows, batch in _batches(train, collator, batch_size):
        logits = model(**_inputs(model, batch)).logits
        losses = F.cross_entropy(logits, batch["labels"], reduction="none")  # (B,)
        out["dot"][rows] = directional_derivatives(losses, params, target_grad).numpy()
        out["loss"][rows] = losses.detach().numpy()
        out["labels"][rows] = batch["labels"].numpy()
        for row, f, p in zip(rows, features.value, logits.detach().softmax(-1), strict=True):
            feats[row], probs[row] = f, p
    return {**out, "feats": torch.stack(feats), "probs": torch.stack(probs)}


def directional_derivatives(
    losses: torch.Tensor, params: Sequence[torch.Tensor], direction: Sequence[torch.Tensor]
) -> torch.Tensor:
    """``(B,)``: each row's loss gradient w.r.t. ``params`` dotted with ``direction``, without per-row gradients.

    ``J^T u`` (the gradient of ``u . losses``) is linear in ``u``, so its dot with ``direction`` differentiated
    by ``u`` is ``J direction``: one backward pass with a graph and one more through it.
    """
    u = torch.ones_like(losses, requires_grad=True)
    grads = torch.autograd.grad((u * losses).sum(), params, create_graph=True, allow_unused=True)
    dot = sum((g * d).sum() for g, d in zip(grads, direction, strict=True) if g is not None)
    return torch.autograd.grad(dot, u)[0].detach()


def last_layer_influence(feats, probs, labels, target_feats, target_probs, target_labels) -> np.ndarray:
    """``g_v^T (H + damping I)^{-1} g_i`` on the classifier's weights and bias (see the module docstring)."""
    x = torch.cat([feats, torch.ones(len(feats), 1)], dim=1).double()  # (N, D+1)
    p = probs.double()
    n, c = p.shape
    a = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # (N, C, C)
    hessian = torch.einsum("nab,nd,ne->adbe", a, x, x).reshape(c * x.shape[1], -1) / n
    hessian += IF_DAMPING * torch.eye(len(hessian), dtype=torch.float64)
    g_train = _classifier_grads(x, p, torch.as_tensor(labels))  # (N, C*(D+1)), row-major like [W | b]
    xt = torch.cat([target_feats, torch.ones(len(target_feats), 1)], dim=1).double()
    g_target = _classifier_grads(xt, target_probs.double(), target_labels).mean(0)
    return (g_train @ torch.linalg.solve(hessian, g_target)).numpy()


def _classifier_grads(x: torch.Tensor, p: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    err = p - F.one_hot(labels, p.shape[1]).double()  # dL/dlogits, (N, C)
    return (err[:, :, None] * x[:, None, :]).reshape(len(x), -1)
