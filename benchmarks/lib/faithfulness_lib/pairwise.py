"""Every pairwise method on one set-up: a (T, N) score matrix and its cost per method."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import ours, peers
from .cost import Cost, measure
from .retrain import Trained
from .setups import Setup


@dataclass
class Method:
    scores: np.ndarray  # (T, N)
    setup: Cost
    scoring: Cost
    notes: list[str] = field(default_factory=list)


def tracin_checkpoints(ref: Trained) -> list:
    """Every other end-of-epoch snapshot, always including the last (a few checkpoints, as TracIn uses)."""
    return ref.checkpoints[::-1][::2][::-1]


def peer_methods(setup: Setup, ref: Trained, x_t, y_t, workdir: Path, seed: int) -> dict[str, Method]:
    model = ref.stack.module(0)  # the full network: every peer explains it without masks
    n, out = len(setup.y_train), {}
    scores, cost = measure(lambda: peers.random_scores(len(y_t), n, seed))
    out["random"] = Method(scores, Cost(0.0, 0.0), cost)
    scores, cost = measure(lambda: peers.grad_dot(model, setup.x_train, setup.y_train, x_t, y_t))
    out["gradient dot product"] = Method(scores, Cost(0.0, 0.0), cost)
    checkpoints = tracin_checkpoints(ref)
    tracin, cost = measure(
        lambda: peers.tracin_explainer(checkpoints, setup.x_train, setup.y_train, setup.lr, workdir)
    )
    scores, scoring = measure(lambda: tracin.influence((x_t, y_t)).detach().numpy())
    out[f"TracInCP (Captum, {len(checkpoints)} ckpts)"] = Method(scores, cost, scoring)
    influence, cost = measure(lambda: peers.LastLayerInfluence(model, setup.x_train, setup.y_train))
    scores, scoring = measure(lambda: influence.scores(x_t, y_t))
    out[f"influence function (exact last layer, damping {peers.IF_DAMPING})"] = Method(scores, cost, scoring)
    return out


def turnover_methods(
    setup: Setup, refs: list[Trained], extra: list[Trained], train_cost: Cost, x_t, y_t, num_null: int
) -> dict[str, Method]:
    """The paper's estimator, footnote 4, ensembles and the two control variates, all on model ``refs[0]``."""
    targets, n, ref, out = ours.as_targets(x_t, y_t), len(setup.y_train), refs[0], {}
    own, cost = measure(lambda: ours.turnover_scores(ref.stack, ref.seed, targets, n))
    out["turn-over own vs flip (paper)"] = Method(own, Cost(0.0, 0.0), cost)
    scores, cost = measure(lambda: ours.turnover_scores(ref.stack, ref.seed, targets, n, "full"))
    out["turn-over full vs flip (footnote 4)"] = Method(scores, Cost(0.0, 0.0), cost)
    for models in (refs, refs + extra):
        if len(models) < 2:
            continue
        pairs = [(m.stack, m.seed) for m in models]
        scores, cost = measure(lambda pairs=pairs: ours.ensemble_scores(pairs, targets, n))
        extra_training = Cost(train_cost.seconds * (len(models) - 1), train_cost.peak_mb)
        out[f"turn-over own, mean of {len(models)} seeds"] = Method(
            scores, extra_training, cost, ["setup = training the extra models"]
        )
    scores, cost = measure(lambda: ours.null_mask_adjusted(ref.stack, ref.seed, targets, own, num_null))
    out[f"turn-over own - null-mask fit ({num_null} null ids)"] = Method(scores, Cost(0.0, 0.0),
                                                                        cost + out_cost(out))  # fmt: skip
    shape = (setup.x_train.shape[1], setup.hidden, setup.num_classes)
    scores, cost = measure(lambda: ours.minus_init(ref.seed, shape, targets, own))
    out["turn-over own - initial model's score"] = Method(scores, Cost(0.0, 0.0), cost + out_cost(out))
    return out


def out_cost(out: dict[str, Method]) -> Cost:
    """The paper's estimate is computed first and reused by the control variates: add its cost to theirs."""
    return out["turn-over own vs flip (paper)"].scoring


def self_influence_methods(
    setup: Setup, models: list[Trained], labels: torch.Tensor, workdir: Path, seed: int
):
    """(N,) suspicion scores (higher = more likely mislabelled) and their seconds, on models trained on
    ``labels`` (some flipped)."""
    x, ref = setup.x_train, models[0]
    model = ref.stack.module(0)
    train = ours.as_train(x, labels)
    out = {}
    out["random"] = measure(lambda: np.random.default_rng(seed).standard_normal(len(labels)))
    out["training loss (full network)"] = measure(lambda: peers.training_loss(model, x, labels))
    out["gradient norm^2"] = measure(lambda: peers.grad_norm_self(model, x, labels))
    checkpoints = tracin_checkpoints(ref)
    out[f"TracInCP self-influence ({len(checkpoints)} ckpts)"] = measure(
        lambda: peers.tracin_self(checkpoints, x, labels, setup.lr, workdir))  # fmt: skip
    out["influence function self (last layer)"] = measure(
        lambda: peers.LastLayerInfluence(model, x, labels).self_scores())  # fmt: skip
    out["turn-over self-influence own (paper)"] = measure(
        lambda: ours.turnover_self(ref.stack, ref.seed, train)
    )
    out["turn-over self-influence full (fn. 4)"] = measure(
        lambda: ours.turnover_self(ref.stack, ref.seed, train, "full"))  # fmt: skip
    if len(models) > 1:
        out[f"turn-over self-influence own, mean of {len(models)} seeds"] = measure(
            lambda: np.mean([ours.turnover_self(m.stack, m.seed, train) for m in models], axis=0))  # fmt: skip
    return out
