"""Ground truth by retraining: leave-one-out (the paper's Eq. 1) and random-subset outcomes (LDS).

Every retrained model keeps turn-over training (each remaining instance on its own mask), the initial
parameters and the minibatch sequence of the reference model of the same seed; targets are scored with the
full (unmasked) network, the network every method explains.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .batched import Stack, train_stack, turnover_config
from .setups import Setup


@dataclass
class Trained:
    """A turn-over model of one seed: its stack (model 0 is the reference) and TracIn checkpoints."""

    seed: int
    stack: Stack
    checkpoints: list[Stack]


def loo_truth(
    setup: Setup,
    removed: np.ndarray,
    x_t: torch.Tensor,
    y_t: torch.Tensor,
    seed: int,
    hidden: int | None = None,
) -> tuple[np.ndarray, Stack, Trained]:
    """``truth[t, j] = L(model without removed[j], t) - L(model, t)`` (positive: the instance helped), shape
    (T, L); the whole stack (model 0 the reference, model j + 1 without removed[j]); and the reference model
    with its end-of-epoch checkpoints."""
    n = len(setup.y_train)
    weights = torch.ones(len(removed) + 1, n)
    weights[torch.arange(1, len(removed) + 1), torch.from_numpy(removed)] = 0.0
    stack, checkpoints = train_stack(
        setup.x_train, setup.y_train, weights, hidden=hidden or setup.hidden, num_classes=setup.num_classes,
        seed=seed, epochs=setup.epochs, lr=setup.lr, config=turnover_config(seed), checkpoint_every_epoch=True,
        progress=True,
    )  # fmt: skip
    losses = stack.losses(x_t, y_t).double()  # (L + 1, T)
    truth = (losses[1:] - losses[0]).T.numpy()
    return truth, stack, Trained(seed, stack.select(0), checkpoints)


def subset_losses(
    setup: Setup, members: np.ndarray, x_t: torch.Tensor, y_t: torch.Tensor, seed: int, chunk: int = 50
) -> np.ndarray:
    """(T, J) full-network loss on each target of the model retrained on each subset (rows of ``members``)."""
    out = []
    for start in range(0, len(members), chunk):
        weights = torch.from_numpy(members[start : start + chunk].astype(np.float32))
        stack, _ = train_stack(
            setup.x_train, setup.y_train, weights, hidden=setup.hidden, num_classes=setup.num_classes, seed=seed,
            epochs=setup.epochs, lr=setup.lr, config=turnover_config(seed), progress=True,
        )  # fmt: skip
        out.append(stack.losses(x_t, y_t).double().T.numpy())
    return np.concatenate(out, axis=1)


def train_seeds(setup: Setup, seeds: list[int], labels: torch.Tensor | None = None) -> list[Trained]:
    """One reference model per seed (init, minibatch order and mask seed all follow the seed)."""
    ones = torch.ones(1, len(setup.y_train))
    out = []
    for seed in seeds:
        stack, checkpoints = train_stack(
            setup.x_train, setup.y_train if labels is None else labels, ones, hidden=setup.hidden,
            num_classes=setup.num_classes, seed=seed, epochs=setup.epochs, lr=setup.lr,
            config=turnover_config(seed), checkpoint_every_epoch=True,
        )  # fmt: skip
        out.append(Trained(seed, stack, checkpoints))
    return out


def accuracy(stack: Stack, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((stack.logits(x)[0].argmax(-1) == y).float().mean())
