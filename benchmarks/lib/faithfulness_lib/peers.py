"""Peer methods on the same models: gradient dot product, TracIn (Captum ``TracInCP``), an exact last-layer
influence function, and random scores. Every method returns a (T, N) matrix with hf_turnover's sign convention
(positive: the training instance helped the target) and self-influence vectors (N,) where "higher = more
suspicious".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from .batched import MLPClassifier, Stack

IF_DAMPING = 0.01  # Koh & Liang's damping, fixed before looking at any result


def _per_sample_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, P) gradients of each row's cross-entropy w.r.t. all parameters."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([g.reshape(len(x), -1) for g in grads.values()], dim=1)


@torch.no_grad()
def grad_dot(model: MLPClassifier, x_train, y_train, x_t, y_t, chunk: int = 256) -> np.ndarray:
    """``g_t . g_i`` over all parameters at the final weights (train gradients recomputed, not stored)."""
    g_t = _per_sample_grads(model, x_t, y_t)  # (T, P)
    out = [(g_t @ _per_sample_grads(model, x_train[s : s + chunk], y_train[s : s + chunk]).T)
           for s in range(0, len(y_train), chunk)]  # fmt: skip
    return torch.cat(out, dim=1).numpy()


def grad_norm_self(model: MLPClassifier, x_train, y_train, chunk: int = 256) -> np.ndarray:
    return torch.cat([_per_sample_grads(model, x_train[s : s + chunk], y_train[s : s + chunk]).pow(2).sum(1)
                      for s in range(0, len(y_train), chunk)]).numpy()  # fmt: skip


def tracin_explainer(checkpoints: list[Stack], x_train, y_train, lr: float, workdir: Path):
    from captum.influence import TracInCP

    paths = []
    for index, snapshot in enumerate(checkpoints):
        path = workdir / f"checkpoint_{index}.pt"
        torch.save(snapshot.module(0).state_dict(), path)
        paths.append(str(path))

    def load(model: nn.Module, path: str) -> float:
        model.load_state_dict(torch.load(path, weights_only=True))
        return lr  # Adam's step size is not one number; TracIn's usual stand-in is the base rate

    model = checkpoints[-1].module(0)
    dataset = torch.utils.data.TensorDataset(x_train, y_train)
    return TracInCP(model, dataset, paths, checkpoints_load_func=load, loss_fn=nn.CrossEntropyLoss(reduction="sum"),
                    batch_size=256, sample_wise_grads_per_batch=True)  # fmt: skip


def tracin_self(checkpoints, x_train, y_train, lr: float, workdir: Path) -> np.ndarray:
    return tracin_explainer(checkpoints, x_train, y_train, lr, workdir).self_influence().detach().numpy()


class LastLayerInfluence:
    """Exact influence function restricted to the classifier layer: ``g_t^T (H + damping I)^{-1} g_i``.

    With the hidden features fixed, the cross-entropy Hessian w.r.t. the last layer's weights and bias is exactly
    ``mean_i (diag(p_i) - p_i p_i^T) kron [h_i, 1][h_i, 1]^T`` (Kronfluence does not install on torch 2.13 CPU
    without replacing torch, so EK-FAC is out). Removing z_i changes the target loss by about
    ``g_t^T H^{-1} g_i / N``: positive means z_i helped.
    """

    def __init__(self, model: MLPClassifier, x_train, y_train, damping: float = IF_DAMPING) -> None:
        self.model = model
        feats, probs = self._features(x_train)
        a = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]  # (N, C, C)
        n, c = probs.shape
        outer = feats[:, :, None] * feats[:, None, :]  # (N, H+1, H+1)
        hessian = (a.reshape(n, c * c).T @ outer.reshape(n, -1)) / n  # (C*C, (H+1)^2)
        d = feats.shape[1]
        hessian = hessian.reshape(c, c, d, d).permute(0, 2, 1, 3).reshape(c * d, c * d)
        self.factor = torch.linalg.cholesky(
            hessian.double() + damping * torch.eye(c * d, dtype=torch.float64)
        )
        self.g_train = self.grads(x_train, y_train)  # (N, C*(H+1)), small: the last layer only

    @torch.no_grad()
    def _features(self, x):
        h = torch.relu(self.model.fc1(x))
        feats = torch.cat([h, torch.ones(len(x), 1)], dim=1)  # (N, H+1)
        return feats, torch.softmax(self.model.classifier(h), dim=-1)

    def grads(self, x, y) -> torch.Tensor:
        feats, probs = self._features(x)
        err = probs - F.one_hot(y, probs.shape[1]).float()  # dL/dlogits, (N, C)
        return (err[:, :, None] * feats[:, None, :]).reshape(len(x), -1).double()  # row-major like W|b

    def scores(self, x_t, y_t) -> np.ndarray:
        solved = torch.cholesky_solve(self.grads(x_t, y_t).T, self.factor)  # (P, T)
        return (self.g_train @ solved).T.numpy()

    def self_scores(self) -> np.ndarray:
        solved = torch.cholesky_solve(self.g_train.T, self.factor)
        return (self.g_train * solved.T).sum(1).numpy()


def random_scores(num_targets: int, num_train: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((num_targets, num_train))


@torch.no_grad()
def training_loss(model: MLPClassifier, x_train, y_train) -> np.ndarray:
    """Per-instance training loss of the full network: the usual baseline for finding mislabelled data."""
    return F.cross_entropy(model(x_train), y_train, reduction="none").numpy()
