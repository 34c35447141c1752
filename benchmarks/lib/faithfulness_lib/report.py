"""Metrics of every method, the markdown tables, and the estimate-vs-truth plots."""

from __future__ import annotations

import functools
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from hf_turnover.atomic import atomic_path  # noqa: E402
from hf_turnover.evaluation import load_faithfulness_metric  # noqa: E402


def mean_spearman(estimate: np.ndarray, truth: np.ndarray) -> float:
    """Per-target (row) Spearman between estimate and truth, averaged over targets."""
    values = [spearmanr(e, t)[0] for e, t in zip(estimate, truth, strict=True)]
    return float(np.nanmean(values))


def spearman_standard_error(estimate: np.ndarray, truth: np.ndarray) -> float:
    """Standard error of :func:`mean_spearman` over targets (std of the per-target values / sqrt(T))."""
    values = np.array([spearmanr(e, t)[0] for e, t in zip(estimate, truth, strict=True)])
    values = values[~np.isnan(values)]
    return float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")


def add_array_statistics(result: dict, arrays_path: Path) -> None:
    """From the saved score and truth arrays: ``loo_se`` / ``loo_mean_se`` of every pairwise row, and the share of
    the paper's scores that is linear in the mask bits (``diagnosis["mask_linear_r2"]``, seed-0 model)."""
    from .ours import mask_luck_r2

    with np.load(arrays_path) as arrays:
        paper = arrays["scores/turn-over own vs flip (paper)"]
        result["diagnosis"]["mask_linear_r2"] = mask_luck_r2(result["setup"]["hidden"], 0, paper)
        removed = arrays["removed"]
        truths = [arrays[k] for k in sorted(k for k in arrays.files if k.startswith("truth_seed"))]
        for row in result["pairwise"]:
            scores = arrays[f"scores/{row['method']}"][:, removed]
            row["loo_se"] = spearman_standard_error(scores, truths[0])
            row["loo_mean_se"] = spearman_standard_error(scores, np.mean(truths, axis=0))


def noise_floor(truths: list[np.ndarray]) -> float:
    """Mean over seed pairs of the per-target Spearman between two leave-one-out truths."""
    pairs = [(a, b) for a in range(len(truths)) for b in range(a + 1, len(truths))]
    return float(np.mean([mean_spearman(truths[a], truths[b]) for a, b in pairs])) if pairs else float("nan")


@functools.cache
def _metric(name: str):
    return load_faithfulness_metric(name)  # evaluate.load copies and imports the module: once is enough


def lds(scores: np.ndarray, members: np.ndarray, losses: np.ndarray) -> float:
    metric = _metric("linear_datamodeling")
    return metric.compute(predictions=scores, references=losses, subsets=members, output="loss")["lds"]


def mislabel(suspicion: np.ndarray, flipped: np.ndarray) -> dict[str, float]:
    metric = _metric("mislabel_detection")
    out = metric.compute(predictions=suspicion, references=flipped, top_fraction=0.1)
    return {"roc_auc": out["roc_auc"], "top10_recall": out["top_fraction_recall"]}


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _pm(value, error) -> str:
    return _fmt(value) if error is None else f"{_fmt(value)} ± {_fmt(error)}"


def pairwise_table(rows: list[dict]) -> str:
    head = ("| method | LOO rho (seed-0 truth) | LOO rho (mean truth) | LDS | setup s | s / target | "
            "peak MB |\n|---|---|---|---|---|---|---|")  # fmt: skip
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['method']} | {_pm(r.get('loo'), r.get('loo_se'))} | {_pm(r.get('loo_mean'), r.get('loo_mean_se'))} | "
            f"{_fmt(r.get('lds'))} | "
            f"{_fmt(r.get('setup_s'), 2)} | {_fmt(r.get('per_target_s'), 4)} | {_fmt(r.get('peak_mb'), 0)} |"
        )
    return "\n".join(lines)


def mislabel_table(rows: list[dict]) -> str:
    lines = ["| ranking | ROC AUC | flipped found in top 10% | s (all N) |", "|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['method']} | {_fmt(r['roc_auc'])} | {_fmt(r['top10_recall'])} | {_fmt(r.get('seconds'), 2)} |"
        )
    return "\n".join(lines)


def save_figure(fig, path: Path) -> None:
    """Atomic PNG write."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(
                tmp, dpi=100, format="png"
            )  # the plots call tight_layout; bbox "tight" would draw twice
    finally:
        plt.close(fig)


def plot_estimates(
    name: str, truth: np.ndarray, estimates: dict[str, np.ndarray], path: Path, columns: int = 3
):
    """Estimate vs leave-one-out truth: one row per method, one column per example target (the targets whose
    truths spread most, so that there is something to agree with)."""
    targets = np.argsort(-truth.std(axis=1))[:columns]
    fig, axes = plt.subplots(len(estimates), len(targets), figsize=(3.3 * len(targets), 2.5 * len(estimates)),
                             squeeze=False)  # fmt: skip
    for row, (method, est) in enumerate(estimates.items()):
        for col, t in enumerate(targets):
            ax = axes[row, col]
            ax.scatter(truth[t], est[t], s=8, alpha=0.6)
            ax.set_title(f"target {t}: Spearman {spearmanr(est[t], truth[t])[0]:.2f}", fontsize=8)
            ax.axvline(0, color="grey", lw=0.5)
            ax.axhline(0, color="grey", lw=0.5)
            ax.tick_params(labelsize=7)
            if row == len(estimates) - 1:
                ax.set_xlabel("LOO truth: L(without z_i) - L(with)", fontsize=7)
        axes[row, 0].set_ylabel("\n".join(textwrap.wrap(method, 28)), fontsize=7)
    fig.suptitle(f"{name}: estimates vs leave-one-out retraining (positive = helped)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def plot_diagnosis(name: str, truth: np.ndarray, signal: np.ndarray, luck: np.ndarray, path: Path) -> None:
    """The turn-over score split into what z_i caused (signal) and mask luck, against the LOO truth."""
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    score = signal + luck
    for ax, values, label in zip(axes, (score, signal, luck), ("score (paper)", "signal: caused by z_i",
                                                             "mask luck: z_i never trained"), strict=True):  # fmt: skip
        rho = mean_spearman(values, truth)
        ax.scatter(truth.ravel(), values.ravel(), s=4, alpha=0.4)
        ax.set_title(f"{label}\nmean per-target rho vs LOO = {rho:.3f}", fontsize=8)
        ax.set_xlabel("LOO truth", fontsize=8)
    share = float(np.mean(signal.var(axis=1) / score.var(axis=1)))
    fig.suptitle(f"{name}: share of the score's per-target variance caused by z_i = {share:.3f}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def setup_markdown(name: str, result: dict) -> str:
    """One set-up's section of RESULTS.md: settings, noise floor, diagnosis and both tables."""
    s, d = result["setup"], result["diagnosis"]
    lines = [
        f"### {s['name']} ({s['num_train']} training instances, {s['features']} features, hidden {s['hidden']}, "
        f"{s['epochs']} epochs; test accuracy of the seed-0 model {s['test_accuracy_seed0']:.3f})",
        "",
        f"Data: {s['source']}. LOO noise floor (per-target Spearman between the LOO truths of two seeds, mean over "
        f"seed pairs): **{result['noise_floor']:.3f}**.",
        "",
        pairwise_table(result["pairwise"]),
        "",
        f"Diagnosis (seed 0): the part of the paper's score that z_i caused is {d['signal_variance_share']:.3f} of "
        f"its per-target variance; rho vs LOO of the score {d['rho_score']:.3f}, of that part alone "
        f"{d['rho_signal']:.3f}, of the mask luck alone {d['rho_luck']:.3f}. A linear function of the mask bits "
        f"explains {d.get('mask_linear_r2', float('nan')):.3f} of the score variance.",
        "",
        mislabel_table(result["mislabel"]),
    ]
    if result.get("width_sweep"):
        lines += ["", "| hidden width | signal share of score variance | rho score | rho signal | rho IF |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for w in result["width_sweep"]:
            lines.append(
                f"| {w['hidden']} | {w['signal_variance_share']:.3f} | {w['rho_score']:.3f} | "
                f"{w['rho_signal']:.3f} | {w['rho_influence_function']:.3f} |"
            )
    return "\n".join(lines)
