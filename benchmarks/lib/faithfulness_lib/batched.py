"""Train K one-hidden-layer turn-over MLPs at once, each with its own weight on every training row.

Model ``k`` sees the same initial parameters and the same minibatch sequence as every other; its loss on a
minibatch is the weighted mean ``sum_b w[k, b] * l[k, b] / sum_b w[k, b]``. A weight of 0 removes the row's
slot from the batch, so ``w = 1 - onehot(i)`` is the leave-one-out retraining of the paper's Eq. 1 and a 0/1
subset indicator trains on that subset (LDS). Adam is elementwise, so one optimizer over the stacked
parameters equals K separate optimizers. Every row trains with its own turn-over mask on the hidden units,
drawn by ``hf_turnover.masks`` exactly as the ``classifier`` hook draws it at scoring time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import PretrainedConfig

from hf_turnover.config import TurnoverConfig
from hf_turnover.masks import keep_bits, mask_values
from hf_turnover.model import add_turnover

MASKED_LAYER = "classifier"  # the hook masks this module's INPUT: the hidden units


class MLPClassifier(nn.Module):
    """``classifier(relu(fc1(features)))``; ``config`` lets hf_turnover record its settings on it."""

    def __init__(self, in_dim: int, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.classifier = nn.Linear(hidden, num_classes)
        self.config = PretrainedConfig()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.relu(self.fc1(features)))


def turnover_config(seed: int, p: float = 0.5) -> TurnoverConfig:
    return TurnoverConfig(p=p, seed=seed, target_modules=None, head_modules=MASKED_LAYER)


@dataclass
class Stack:
    """Parameters of K models: w1 (D, K, H) so the first layer is one GEMM, b1 (K, H), w2 (K, H, C), b2 (K, C)."""

    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor

    @property
    def size(self) -> int:
        return self.b1.shape[0]

    def logits(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """(K, B, C) logits of every model on the rows ``x`` (B, D); ``masks`` (B, H) scale the hidden units."""
        d, k, h = self.w1.shape
        hidden = torch.relu((x @ self.w1.reshape(d, k * h)).view(-1, k, h) + self.b1)  # (B, K, H)
        if masks is not None:
            hidden = hidden * masks[:, None, :]
        return torch.einsum("bkh,khc->kbc", hidden, self.w2) + self.b2[:, None, :]

    @torch.no_grad()
    def losses(self, x: torch.Tensor, y: torch.Tensor, chunk: int = 512) -> torch.Tensor:
        """(K, M) cross-entropy of every model's full (unmasked) network on every row."""
        out = []
        for start in range(0, len(y), chunk):
            logits = self.logits(x[start : start + chunk])
            labels = y[start : start + chunk].expand(self.size, -1)
            out.append(F.cross_entropy(logits.transpose(1, 2), labels, reduction="none"))
        return torch.cat(out, dim=1)

    def module(self, k: int, config: TurnoverConfig | None = None) -> MLPClassifier:
        """Model ``k`` as an ``nn.Module`` (with turn-over hooks when ``config`` is given)."""
        d, _, h = self.w1.shape
        model = MLPClassifier(d, h, self.w2.shape[2])
        with torch.no_grad():
            model.fc1.weight.copy_(self.w1[:, k, :].T)
            model.fc1.bias.copy_(self.b1[k])
            model.classifier.weight.copy_(self.w2[k].T)
            model.classifier.bias.copy_(self.b2[k])
        if config is not None:
            add_turnover(model, config)
        return model.eval()

    def select(self, k: int) -> Stack:
        return Stack(self.w1[:, k : k + 1].clone(), self.b1[k : k + 1].clone(), self.w2[k : k + 1].clone(),
                     self.b2[k : k + 1].clone())  # fmt: skip


def init_stack(d: int, h: int, c: int, k: int, seed: int) -> Stack:
    """nn.Linear's default initialisation, drawn once from ``seed`` and shared by all K models."""
    g = torch.Generator().manual_seed(seed)

    def uniform(shape, fan_in):
        bound = 1.0 / math.sqrt(fan_in)
        return (torch.rand(shape, generator=g) * 2 - 1) * bound

    w1, b1, w2, b2 = uniform((d, 1, h), d), uniform((1, h), d), uniform((1, h, c), h), uniform((1, c), h)
    return Stack(w1.repeat(1, k, 1), b1.repeat(k, 1), w2.repeat(k, 1, 1), b2.repeat(k, 1))


def own_masks(num_rows: int, hidden: int, config: TurnoverConfig | None) -> torch.Tensor | None:
    """(N, H) own-mask values of instances 0..N-1 (ids are row indices), as the scoring hook draws them."""
    if config is None:
        return None
    ids = torch.arange(num_rows, dtype=torch.int64)
    bits = keep_bits(ids, hidden, MASKED_LAYER, p=config.p, seed=config.seed, scheme=config.scheme,
                     codebook_size=config.codebook_size, codebook_k=config.codebook_k)  # fmt: skip
    return mask_values(bits, "own", config.p, torch.float32)


def weighted_step(
    optimizer: torch.optim.Optimizer, logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor
) -> None:
    """One optimizer step on the sum over the K models of each one's weighted mean loss of a minibatch:
    ``logits`` (K, B, C), ``labels`` (B,), ``weights`` (K, B)."""
    losses = F.cross_entropy(
        logits.transpose(1, 2), labels.expand(len(logits), -1), reduction="none"
    )  # (K, B)
    loss = ((weights * losses).sum(1) / weights.sum(1).clamp(min=1e-12)).sum()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def train_stack(
    x: torch.Tensor,
    y: torch.Tensor,
    weights: torch.Tensor,
    *,
    hidden: int,
    num_classes: int,
    seed: int,
    epochs: int,
    lr: float,
    config: TurnoverConfig | None,
    batch_size: int = 32,
    checkpoint_every_epoch: bool = False,
    progress: bool = False,
) -> tuple[Stack, list[Stack]]:
    """Train ``weights.shape[0]`` models on (x, y) with per-row weights (K, N); returns the stack and the
    end-of-epoch snapshots of model 0 (for TracIn) when ``checkpoint_every_epoch``."""
    k, n = weights.shape
    stack = init_stack(x.shape[1], hidden, num_classes, k, seed)
    masks = own_masks(n, hidden, config)
    return fit_stack(stack, x, y, weights, masks, seed=seed, epochs=epochs, lr=lr, batch_size=batch_size,
                     checkpoint_every_epoch=checkpoint_every_epoch, progress=progress)  # fmt: skip


def fit_stack(
    stack: Stack,
    x: torch.Tensor,
    y: torch.Tensor,
    weights: torch.Tensor,
    masks: torch.Tensor | None,
    *,
    seed: int,
    epochs: int,
    lr: float,
    batch_size: int = 32,
    checkpoint_every_epoch: bool = False,
    progress: bool = False,
) -> tuple[Stack, list[Stack]]:
    """Train the K models of ``stack`` in place (Adam, minibatch order drawn from ``seed``), row ``i`` under
    ``masks[i]`` (N, H) or unmasked; returns the stack and model 0's end-of-epoch snapshots if asked."""
    k, n = weights.shape
    params = [stack.w1, stack.b1, stack.w2, stack.b2]
    for param in params:
        param.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr, fused=True)  # fused: 2-3x faster on CPU here
    order_rng = torch.Generator().manual_seed(seed + 1_000_003)
    snapshots = []
    for _ in tqdm(range(epochs), desc=f"train {k} models", disable=not progress, leave=False):
        order = torch.randperm(n, generator=order_rng)
        for start in range(0, n, batch_size):
            rows = order[start : start + batch_size]
            logits = stack.logits(x[rows], None if masks is None else masks[rows])  # (K, B, C)
            weighted_step(optimizer, logits, y[rows], weights[:, rows])
        if checkpoint_every_epoch:
            with torch.no_grad():
                snapshots.append(stack.select(0))
    for param in params:
        param.requires_grad_(False)
    return stack, snapshots
