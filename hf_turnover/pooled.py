"""Pooled turn-over scores: what the masks measure about groups of alike training instances, plus the part of each
instance's own score that rises above the mask noise.

The linear score of training instance ``z_i`` for a target is ``s_i = x_i . g`` (:mod:`.linear`): ``g`` the
target's mask gradient over the ``W`` masked units, ``x_i = c (b_i - p)`` the instance's centred keep-bits. A unit's
gradient holds a trace of every instance that trained it, and of its random init; ``x_i . g`` reads all of it
through a random +-1 projection. An id that was never trained gets a score from the same projection: its variance
is the noise floor. :func:`signal_share` compares the two; on the default model (N = 8,454, W = 2,304 masked units,
one epoch) the training ids' scores vary only 1-2% more than never-trained ids' do, so the ranking of single
instances is mostly the mask draw.

Pooling reads the masks in aggregate. With ``G`` (N x C) a design of groups of training instances, one-hot labels
and their interactions with ``k`` components of each instance (the model's error on it, then the top principal
components of the model's own representation of it),
``n = X^T G`` (W x C) is what each group's instances left in each unit if they all left the same trace. Per target,

    psi   = argmin |g - n psi|                        (a least-squares fit over W units, C << W)
    group = |x_i|^2 (G psi)_i                         (the score of z_i's group, measured from thousands of masks)
    r_i   = s_i - x_i . n psi                         (z_i's own score, its group's part taken out)
    score = group + lambda r_i,   lambda = max(0, 1 - var(noise r) / var(r))

``lambda`` is the share of the residuals' variance above that of never-trained ids (shrinkage toward the group).
``k`` is picked per target by cross-validation over the units (fit on half of them, predict the other half), so
the number of components follows the data, not a benchmark. The error component (``1 - p(label)`` under the
trained model) is there because an instance's trace is the sum of its loss gradients: instances the model still
gets wrong pushed its units harder and for longer than ones it fitted early, which the masks can measure only if
the groups tell them apart. The result is an estimate of the same quantity as
``method="linear"`` (``E[s_i] = |x_i|^2 kappa_i`` for a per-instance trace ``kappa_i``), much less noisy where
instances of one group influence a target alike, and equal for instances that the group design cannot tell apart
and whose own traces are lost in the noise.

This file travels with Hub models as remote code: installed packages and sibling modules only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .model import turnover_hooks

NOISE_IDS = 2048  # never-trained ids per scorer: the noise floor of a score
COMPONENTS = 16  # principal components of the representation kept in a basis (k is chosen <= this per target)
SPLITS = 4  # unit splits of the cross-validation that picks k


@dataclass
class PooledBasis:
    """The groups of :mod:`pooled` scores, fixed once per training set: ``ids`` (N,) training ids, ``labels`` (N,)
    their label ids, ``components`` (N, K) standardised principal components of the model's representation of each
    instance (:meth:`from_features`). Saved with the model as three tensors (:meth:`state_dict`)."""

    ids: torch.Tensor
    labels: torch.Tensor
    components: torch.Tensor

    def __post_init__(self) -> None:
        self.ids = torch.as_tensor(self.ids, dtype=torch.int64).flatten()
        self.labels = torch.as_tensor(self.labels, dtype=torch.int64).flatten()
        self.components = torch.as_tensor(self.components, dtype=torch.float32)
        if self.components.dim() == 1:
            self.components = self.components[:, None]
        n = len(self.ids)
        if len(self.labels) != n or len(self.components) != n:
            raise ValueError(
                f"PooledBasis: {n} ids, {len(self.labels)} labels and {len(self.components)} component rows; "
                "give one label and one row of components per training id."
            )
        if n and self.labels.min() < 0:
            raise ValueError("PooledBasis: labels must be label ids >= 0 (-1 marks an unlabeled row).")

    @classmethod
    def from_features(
        cls, ids: Any, labels: Any, features: Any, num_components: int = COMPONENTS, errors: Any = None
    ) -> PooledBasis:
        """The basis of training instances whose representations are the rows of ``features`` (N, D), e.g. the
        classification head's input (:func:`head_features`): their top principal components, each scaled to unit
        variance, ``num_components`` in all. ``errors`` (N,): the trained model's error on each instance
        (:func:`training_errors`); when given, it is the first component (standardised) and the principal
        components follow."""
        x = torch.as_tensor(np.asarray(features), dtype=torch.float64)
        if x.dim() != 2 or len(x) < 2:
            raise ValueError(f"features must be (N, D) with N >= 2; got shape {tuple(x.shape)}.")
        first = []
        if errors is not None:
            e = torch.as_tensor(errors).detach().cpu().double().flatten()
            if len(e) != len(x):
                raise ValueError(
                    f"errors has {len(e)} values for {len(x)} rows of features; give one per training instance "
                    "(hf_turnover.pooled.training_errors(logits, labels))."
                )
            first = [((e - e.mean()) / e.std().clamp_min(1e-12))[:, None]] if num_components > 0 else []
        x = x - x.mean(0)
        k = max(0, min(num_components - len(first), x.shape[1], len(x) - 1))
        u, s, _ = torch.linalg.svd(x, full_matrices=False)
        pcs = u[:, :k] * s[:k]
        pcs = pcs / pcs.std(0).clamp_min(1e-12)
        return cls(ids, labels, torch.cat([*first, pcs], 1).float())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"ids": self.ids, "labels": self.labels, "components": self.components.contiguous()}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> PooledBasis:
        return cls(state["ids"], state["labels"], state["components"])

    def design(self, num_labels: int) -> torch.Tensor:
        """``G`` (N, L (1 + K)): label one-hots, then label one-hot x component 1, ..., x component K; the first
        ``L (1 + k)`` columns are the design with ``k`` components."""
        onehot = torch.nn.functional.one_hot(self.labels, num_labels).double()
        blocks = [onehot] + [
            onehot * self.components[:, [j]].double() for j in range(self.components.shape[1])
        ]
        return torch.cat(blocks, 1)


def training_errors(logits: Any, labels: Any) -> torch.Tensor:
    """``(N,)``: ``1 - p(label)`` of each row of ``logits`` (N, C) under its label: the trained model's error on
    each training instance, the size of its loss gradient at the logits (:meth:`PooledBasis.from_features`)."""
    logits = torch.as_tensor(logits).detach().cpu().double()
    labels = torch.as_tensor(labels).detach().cpu().long().flatten()
    if logits.dim() != 2 or len(logits) != len(labels):
        raise ValueError(
            f"training_errors takes logits (N, C) and N labels; got logits {tuple(logits.shape)} and "
            f"{len(labels)} labels."
        )
    return 1 - torch.softmax(logits, -1).gather(1, labels[:, None])[:, 0]


@torch.no_grad()
def head_features(model: nn.Module, batches: Any, return_logits: bool = False) -> Any:
    """``(N, D)``: the input of the model's turn-over layers that mask their input (the classification head; with
    several heads, their inputs side by side), or else the output of its last turn-over layer at the first
    position, for every row of ``batches`` (dicts of model inputs), in order. The representation
    :meth:`PooledBasis.from_features` groups instances by. ``return_logits``: also the model's logits (N, C) of
    the same pass, as ``(features, logits)``."""
    hooks = turnover_hooks(model)
    if not hooks:
        raise ValueError(
            "The model has no turn-over layers: pooled scores need a model trained with turn-over."
        )
    names = [n for n, h in hooks.items() if h.where == "input"] or [list(hooks)[-1]]
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in names}

    def keep(name: str, x: torch.Tensor) -> None:
        x = x.detach().float()
        rows[name].append((x[:, 0] if x.dim() == 3 else x.flatten(1)).cpu())

    handles = []
    for name in names:
        module = model.get_submodule(name)
        if hooks[name].where == "input":
            handles.append(module.register_forward_pre_hook(lambda m, args, name=name: keep(name, args[0])))
        else:
            handles.append(module.register_forward_hook(lambda m, args, out, name=name: keep(name, out)))
    was_training = model.training
    model.eval()
    logits = []
    try:
        for inputs in batches:
            out = model(**inputs)
            if return_logits:
                logits.append((out.logits if hasattr(out, "logits") else out[0]).detach().float().cpu())
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if not rows[names[0]]:
        raise ValueError("head_features got no batches: pass at least one batch of inputs.")
    features = torch.cat([torch.cat(rows[name]) for name in names], 1)
    return (features, torch.cat(logits)) if return_logits else features


def signal_share(scores: torch.Tensor, noise_scores: torch.Tensor) -> torch.Tensor:
    """``(T,)``: ``1 - var(noise) / var(scores)`` per target, clipped to [0, 1]: the share of the variance of the
    training ids' scores (T, N) above that of never-trained ids' scores (T, M) under the same target gradient.
    Near 0: the ranking of single training instances is the mask draw, not the training."""
    ratio = noise_scores.double().var(1) / scores.double().var(1).clamp_min(1e-300)
    return (1 - ratio).clamp(0, 1).float()


def choose_components(n: torch.Tensor, g: torch.Tensor, num_labels: int) -> torch.Tensor:
    """``(T,)`` components k per target: the fewest of 0, 1, 2, 4, ... K whose fit on half of the units best
    predicts the other half (mean squared error over ``SPLITS`` random halves, a fixed seed); 0 (labels only)
    where the masked units are too few (under 4 per fitted unknown) to compare fits."""
    width, max_cols = n.shape
    options = [k for k in (0, 1, 2, 4, 8, 16, 32, 64) if num_labels * (1 + k) <= min(max_cols, width // 4)]
    if len(options) < 2:  # too few units to compare fits: labels only
        return torch.zeros(len(g), dtype=torch.int64, device=g.device)
    generator = torch.Generator().manual_seed(0)
    errors = torch.zeros(len(options), len(g), dtype=torch.float64, device=g.device)
    for _ in range(SPLITS):
        perm = torch.randperm(width, generator=generator).to(g.device)
        fit, held = perm[: width // 2], perm[width // 2 :]
        for j, k in enumerate(options):
            cols = num_labels * (1 + k)
            psi = torch.linalg.lstsq(n[fit, :cols], g[:, fit].T).solution
            errors[j] += ((g[:, held].T - n[held, :cols] @ psi) ** 2).sum(0)
    return torch.as_tensor(options, device=g.device)[errors.argmin(0)]
