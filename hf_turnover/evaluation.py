"""Score influence estimates against retraining: the bundled `evaluate` modules for mislabel detection and the
linear datamodeling score (LDS), and helpers to turn score datasets into the matrices they take.

Sign convention everywhere: a positive influence score means the training instance *helped* the target (its
loss is lower with the instance), as in :func:`hf_turnover.estimate_influence`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import datasets
import numpy as np

from .data import BUNDLED_METRICS_DIR

if TYPE_CHECKING:
    import evaluate

FAITHFULNESS_METRICS = ("mislabel_detection", "linear_datamodeling")


def load_faithfulness_metric(name: str) -> evaluate.EvaluationModule:
    """Load ``"mislabel_detection"`` (ROC AUC and top-10% recall of flipped labels) or ``"linear_datamodeling"``
    (LDS) from the package, offline, with ``evaluate.load``."""
    import evaluate  # optional at import time, as in hf_turnover.data

    if name not in FAITHFULNESS_METRICS:
        raise ValueError(
            f"Unknown faithfulness metric {name!r}; valid names are {list(FAITHFULNESS_METRICS)}."
        )
    return evaluate.load(str(BUNDLED_METRICS_DIR / name))


def score_matrix(
    scores: datasets.Dataset,
    target_ids: Sequence[int] | None = None,
    train_ids: Sequence[int] | None = None,
    fill: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(matrix (T, N), target_ids, train_ids)`` from a ``(target_id, train_id, score)`` dataset.

    Rows and columns follow ``target_ids``/``train_ids`` when given (else sorted ids). A missing pair (e.g.
    results made with ``top_k``) raises unless ``fill`` gives its value.
    """
    # Read the arrow columns directly: iterating a Dataset column goes row by row (seconds for 10^4 rows).
    table = scores.with_format("arrow")[:]  # the rows a filter/select/sort kept
    t_col, n_col, s_col = (table.column(c).to_numpy() for c in ("target_id", "train_id", "score"))
    rows = np.unique(t_col) if target_ids is None else np.asarray(target_ids, dtype=np.int64)
    cols = np.unique(n_col) if train_ids is None else np.asarray(train_ids, dtype=np.int64)
    matrix = np.full((len(rows), len(cols)), np.nan)
    row_order, col_order = np.argsort(rows), np.argsort(cols)
    r = np.searchsorted(rows, t_col, sorter=row_order).clip(max=len(rows) - 1)
    c = np.searchsorted(cols, n_col, sorter=col_order).clip(max=len(cols) - 1)
    r, c = row_order[r], col_order[c]
    keep = (rows[r] == t_col) & (cols[c] == n_col)  # pairs outside the requested ids are ignored
    matrix[r[keep], c[keep]] = s_col[keep]
    missing = int(np.isnan(matrix).sum())
    if missing and fill is None:
        raise ValueError(
            f"{missing} (target, train) pairs have no score (results made with top_k?). Score every pair, or "
            "pass fill= (e.g. fill=0.0) to treat missing scores as that value."
        )
    if missing:
        matrix[np.isnan(matrix)] = fill
    return matrix, rows, cols


def random_half_subsets(num_train: int, num_subsets: int, seed: int = 0, fraction: float = 0.5) -> np.ndarray:
    """``(num_subsets, num_train)`` 0/1 matrix of random subsets holding ``fraction`` of the instances each, as
    the LDS protocol retrains on (TRAK uses half)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must lie in (0, 1), got {fraction}.")
    rng = np.random.default_rng(seed)
    size = int(round(fraction * num_train))
    members = np.zeros((num_subsets, num_train), dtype=np.int8)
    for j in range(num_subsets):
        members[j, rng.choice(num_train, size=size, replace=False)] = 1
    return members


def _row_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 along the last axis (continuous scores: ties are left to the sort order)."""
    return np.argsort(np.argsort(values, axis=-1, kind="stable"), axis=-1, kind="stable").astype(np.float64)


def _spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's rho of each row of ``a`` with the same row of ``b`` (NaN where a row is constant)."""
    ra, rb = _row_ranks(a), _row_ranks(b)
    ra -= ra.mean(-1, keepdims=True)
    rb -= rb.mean(-1, keepdims=True)
    denominator = np.sqrt((ra**2).sum(-1) * (rb**2).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (ra * rb).sum(-1) / denominator, np.nan)


def seed_agreement(
    scores_a: np.ndarray, scores_b: np.ndarray, top_k: int = 10, labels: np.ndarray | None = None
) -> dict[str, float]:
    """How much two influence estimates of the same targets and training set agree: the scores of two models
    trained on the same data with different seeds (for turn-over, different mask seeds), so the answer a user
    would get again after retraining.

    ``scores_a``/``scores_b``: ``(T, N)`` pairwise scores (rows: targets, columns: the same training instances in
    the same order; :func:`score_matrix` builds them), or ``(N,)`` per-instance scores such as self-influence.
    Returns, for a matrix, ``pairwise_spearman`` (per-target Spearman, mean over targets) with its standard error,
    ``mean_influence_spearman`` (Spearman of the mean over targets: the data-cleansing ranking) and
    ``top_k_overlap`` (share of a target's ``top_k`` most helpful instances that both name, mean over targets);
    for a vector, ``spearman`` and ``top_k_overlap`` of the vector itself. With the training ``labels`` (N,), a
    matrix also gets ``mean_influence_spearman_within_label``: that Spearman among the instances of each label,
    averaged over labels (weighted by count), which a per-label offset of the scores cannot move.
    """
    a, b = np.asarray(scores_a, dtype=np.float64), np.asarray(scores_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim not in (1, 2):
        raise ValueError(
            f"seed_agreement needs two score arrays of one shape, (T, N) or (N,); got {a.shape} and {b.shape}."
        )
    if not 1 <= top_k <= a.shape[-1]:
        raise ValueError(f"top_k={top_k} must lie in [1, {a.shape[-1]}] (the number of training instances).")

    def overlap(x: np.ndarray, y: np.ndarray) -> float:
        top_x = np.argsort(-x, axis=-1)[..., :top_k].reshape(-1, top_k)
        top_y = np.argsort(-y, axis=-1)[..., :top_k].reshape(-1, top_k)
        return float(np.mean([len(np.intersect1d(p, q)) / top_k for p, q in zip(top_x, top_y, strict=True)]))

    if a.ndim == 1:
        return {"spearman": float(_spearman_rows(a, b)), "top_k_overlap": overlap(a, b), "top_k": top_k}
    rows = _spearman_rows(a, b)
    rows = rows[~np.isnan(rows)]
    within = {}
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != a.shape[1:]:
            raise ValueError(
                f"labels has shape {labels.shape}; give one label per training instance, {a.shape[1:]}."
            )
        groups = [labels == c for c in np.unique(labels) if (labels == c).sum() > 1]
        rhos = [float(_spearman_rows(a.mean(0)[g], b.mean(0)[g])) for g in groups]
        within["mean_influence_spearman_within_label"] = float(
            np.average(rhos, weights=[g.sum() for g in groups])
        )
    return {
        **within,
        "pairwise_spearman": float(rows.mean()),
        "pairwise_spearman_se": float(rows.std(ddof=1) / np.sqrt(len(rows)))
        if len(rows) > 1
        else float("nan"),
        "mean_influence_spearman": float(_spearman_rows(a.mean(0), b.mean(0))),
        "top_k_overlap": overlap(a, b),
        "top_k": top_k,
    }


def explanation_checks(explanations: Sequence[dict], top_k: int | None = None) -> dict:
    """Two cheap checks of a model's explanations, without retraining (Hanawa et al. 2021, "Evaluation of
    similarity-based explanations"): the identical-class rate (the top helpful training instance carries the
    predicted label) and how many distinct training instances fill the top-1 and top-``top_k`` helpful lists
    (the same few instances on top of unrelated queries point at mask luck, not at causes).

    ``explanations``: what :func:`hf_turnover.explain_predictions` or the pipeline returns, one per query, each
    computed against the whole training set (not ``restrict_to_label``, which makes the first check trivial).
    """
    if not explanations:
        raise ValueError("explanation_checks needs at least one explanation.")
    lists = [e["helpful"] for e in explanations]
    if any(not items for items in lists):
        raise ValueError("An explanation has an empty helpful list; explain with top_k >= 1.")
    if any(e.get("restricted") is not None for e in explanations):
        raise ValueError("Explain against all training instances (restrict_to_label=None) for these checks.")
    top_k = top_k or max(len(items) for items in lists)

    def key(item: dict) -> int:
        return int(item["train_id"] if "train_id" in item else item["id"])

    return {
        "num_queries": len(explanations),
        "top_k": top_k,
        "identical_class_rate": float(
            np.mean(
                [
                    items[0]["label"] == e["prediction"]["label"]
                    for items, e in zip(lists, explanations, strict=True)
                ]
            )
        ),
        "distinct_top1": len({key(items[0]) for items in lists}),
        "distinct_top_k": len({key(item) for items in lists for item in items[:top_k]}),
    }
