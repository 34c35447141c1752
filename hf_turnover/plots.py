"""Figures: learning curves (the paper's Figure 2) and the self-influence histogram (Figure 7)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import datasets

from .atomic import atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _figure() -> Figure:
    """A matplotlib figure without pyplot (never changes the user's backend); matplotlib is imported here, on
    first use, as it takes about a second to import."""
    from matplotlib.figure import Figure

    return Figure(figsize=(6, 4))


CURVES = {
    "turnover_own_loss": "train loss, own masks (trained with z)",
    "turnover_flip_loss": "train loss, flipped masks (never saw z)",
    "turnover_eval_loss": "eval loss, full network",
    "eval_loss": "eval loss (Trainer)",
}


def plot_learning_curves(log_history: Sequence[dict], path: str | os.PathLike) -> Path:
    """Plot the losses that :class:`LearningCurveCallback` (and Trainer evaluation) logged, against steps."""
    fig = _figure()
    ax = fig.subplots()
    for key, label in CURVES.items():
        points = [(e["step"], e[key]) for e in log_history if key in e and "step" in e]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=label)
    ax.set_xlabel("training step")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title("Turn-over learning curves")
    ax.legend()
    return _save(fig, path)


def plot_self_influence(scores: datasets.Dataset, path: str | os.PathLike, bins: int = 50) -> Path:
    """Histogram of self-influence ``I(z_i, z_i)`` (column ``score``); the long right tail is worth reading."""
    fig = _figure()
    ax = fig.subplots()
    ax.hist(scores["score"], bins=bins, color="tab:blue", alpha=0.8)
    ax.set_xlabel("self-influence  I(z_i, z_i) = L(flip) - L(own)")
    ax.set_ylabel("training instances")
    ax.set_title(f"Self-influence of {len(scores)} training instances")
    return _save(fig, path)


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    fig.tight_layout()
    with atomic_path(path) as tmp:  # the format from the real name's suffix: the temporary one has none
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=110)
    return path
