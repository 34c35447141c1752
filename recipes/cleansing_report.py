"""The reports of `recipes/cleansing.py`: the removed sentences, the table of conditions (mean and standard error
over seeds, paired differences), the statistics of each removal set, and the figure."""

from __future__ import annotations

import textwrap
from pathlib import Path

import datasets
import numpy as np
from common import markdown_table, mean_std, pyplot, save_figure


def removed_report(
    by_id: dict[int, float], train: datasets.Dataset, text_column: str, removed: list[int]
) -> str:
    rows = [
        [i, f"{by_id[i]:+.4g}", train[i]["label"], train[i][text_column]]
        for i in removed  # ids == row positions
    ]
    title = f"# The {len(removed)} removed training sentences (most negative mean influence first)\n\n"
    return title + markdown_table(["train id", "mean influence", "label", "sentence"], rows)


PAPER = {"no removal": [77.0, 0.9], "random removal": [76.8, 1.1], "turn-over mean influence": [78.3, 0.2]}


def mean_se(values) -> tuple[float, float]:
    """Mean and standard error (sample std / sqrt(n); 0.0 for one value)."""
    mean, std = mean_std(values)
    return mean, float(std / np.sqrt(len(values)))


def summarize(rows: list[dict], seeds: list[int]) -> list[dict]:
    """Means and standard errors per condition, and each condition minus random / no removal paired by seed."""
    by_name = {r["condition"]: r for r in rows}
    for row in rows:
        row["seeds"] = seeds
        row["accuracy_mean"], row["accuracy_se"] = mean_se(row["accuracies"])
        row["loss_mean"], row["loss_se"] = mean_se(row["losses"])
        for other, key in (("random removal", "vs_random"), ("no removal", "vs_none")):
            diffs = np.subtract(row["accuracies"], by_name[other]["accuracies"])
            row[f"accuracy_{key}"] = diffs.tolist()
            row[f"accuracy_{key}_mean"], row[f"accuracy_{key}_se"] = mean_se(diffs)
        row["paper_accuracy"] = PAPER.get(row["condition"])
    return rows


def removal_stats(
    removals: dict[str, list[int]], rankings: dict[str, dict[int, float]], train, train_loss
) -> dict:
    """Per method: share of positive labels and of sentences the turn-over model gets wrong among the removed
    (training loss > ln 2, i.e. the given label has probability < 0.5: mislabelled or ambiguous candidates), the
    overlap with the other removal sets, and the Spearman correlation of the full rankings."""
    labels = np.asarray(train["label"])
    wrong = np.asarray(train_loss) > np.log(2.0)
    names = list(removals)
    order = {n: np.argsort(np.argsort([rankings[n][i] for i in range(len(labels))])) for n in names}
    out = {"base_positive": float(labels.mean()), "base_misclassified": float(wrong.mean())}
    for name, ids in removals.items():
        out[name] = {
            "positive": float(labels[ids].mean()),
            "misclassified": float(wrong[ids].mean()),
            "overlap": {other: len(set(ids) & set(removals[other])) for other in names if other != name},
            "spearman": {
                other: float(np.corrcoef(order[name], order[other])[0, 1]) for other in names if other != name
            },
        }
    out["random_overlap_expected"] = len(next(iter(removals.values()))) ** 2 / len(labels)
    return out


def _cell(mean: float, se: float, scale: float = 100.0, signed: bool = False) -> str:
    return f"{scale * mean:{'+' if signed else ''}.2f} +- {scale * se:.2f}"


def format_table(rows: list[dict], n_train: int, n_removed: int, num_seeds: int) -> str:
    headers = [
        f"Condition ({n_train} training sentences, {n_removed} removed, {num_seeds} seeds)",
        "Test accuracy (%)",
        "minus random removal (points, paired)",
        "minus no removal (points, paired)",
        "Test loss",
        "Paper, 1% removed (%)",
    ]
    cells = [
        [
            r["condition"],
            _cell(r["accuracy_mean"], r["accuracy_se"]),
            _cell(r["accuracy_vs_random_mean"], r["accuracy_vs_random_se"], signed=True),
            _cell(r["accuracy_vs_none_mean"], r["accuracy_vs_none_se"], signed=True),
            _cell(r["loss_mean"], r["loss_se"], scale=1.0),
            "{:.1f} +- {:.1f}".format(*r["paper_accuracy"]) if r["paper_accuracy"] else "",
        ]
        for r in rows
    ]
    return (
        markdown_table(headers, cells)
        + "\nMean +- standard error over seeds (std / sqrt(n)); the paper's column is mean +- std.\n"
    )


def plot(scores: datasets.Dataset, cutoff: float, rows: list[dict], path: Path) -> None:
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(12, 3.8), gridspec_kw={"width_ratios": [1, 1.5]})
    left.hist(scores["score"], bins=60, color="tab:blue")
    left.axvline(cutoff, color="tab:red", linestyle="--", label="removal cut-off")
    left.set(
        xlabel="turn-over mean influence on the target validation set",
        ylabel="training sentences",
        yscale="log",
    )
    left.legend()
    for x, r in enumerate(rows):
        right.scatter([x] * len(r["accuracies"]), 100 * np.array(r["accuracies"]), color="gray", s=12)
        right.errorbar(x + 0.15, 100 * r["accuracy_mean"], yerr=100 * r["accuracy_se"], fmt="o", capsize=4)
    names = [textwrap.fill(r["condition"].replace("_", " "), 9) for r in rows]
    right.set_xticks(range(len(rows)), names, fontsize=8)
    right.set(
        ylabel="target test accuracy (%)", title="retrained without turn-over (mean +- SE, seeds in gray)"
    )
    save_figure(fig, path)


def most_harmful(by_id: dict[int, float], fraction: float) -> list[int]:
    """The ids of the ``fraction`` of training instances with the most negative score, most harmful first."""
    n_remove = max(1, round(fraction * len(by_id)))
    ids = list(by_id)
    order = np.argsort(np.asarray([by_id[i] for i in ids]), kind="stable")
    return [int(ids[i]) for i in order[:n_remove]]
