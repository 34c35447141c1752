"""Mislabel detection as a local `evaluate` module: how well a ranking of training instances finds the flipped
labels. Loads offline with `evaluate.load(<this directory>)`.

Inputs are one row per training instance: `predictions`, a suspicion score (higher = more likely mislabelled,
e.g. self-influence or training loss), and `references`, 1 if the instance's label was flipped, else 0.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Mislabel detection (Koh & Liang 2017; Pruthi et al. 2020; Kobayashi et al. 2020): rank training instances by a
suspicion score and check whether the instances whose labels were flipped come first.

- roc_auc: the probability that a random flipped instance scores above a random clean one (ties count half),
  i.e. the Mann-Whitney U statistic over n_flipped * n_clean. 0.5 is a random ranking.
- top_fraction_recall: the fraction of all flipped instances found among the `top_fraction` highest scores
  (with 10% flipped and top_fraction=0.1, a perfect ranking gives 1.0 and a random one about 0.1).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `float`): Suspicion score per training instance; higher = more likely mislabelled.
    references (`list` of `int`): 1 if the instance's label was flipped, 0 if it is clean.
    top_fraction (`float`): Share of the ranking inspected for `top_fraction_recall`, in (0, 1]. Default 0.1.

Returns:
    roc_auc (`float`): ROC AUC in [0, 1].
    top_fraction_recall (`float`): Fraction of the flipped instances found in the top `top_fraction`.
    num_flipped (`int`), num_instances (`int`).

Examples:
    >>> metric = evaluate.load("hf_turnover/resources/metrics/mislabel_detection")
    >>> metric.compute(predictions=[0.9, 0.1, 0.8, 0.3], references=[1, 0, 0, 0], top_fraction=0.25)
    {'roc_auc': 1.0, 'top_fraction_recall': 1.0, 'num_flipped': 1, 'num_instances': 4}
"""

_CITATION = """
@inproceedings{kobayashi2020efficient,
  title={Efficient Estimation of Influence of a Training Instance},
  author={Kobayashi, Sosuke and Yokoi, Sho and Suzuki, Jun and Inui, Kentaro},
  booktitle={Proceedings of SustaiNLP: Workshop on Simple and Efficient Natural Language Processing},
  year={2020}
}
"""


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties sharing their average rank (as scipy.stats.rankdata's default)."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = (start + end + 1) / 2.0  # mean of ranks start+1 .. end
    return ranks


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MislabelDetection(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("float64"), "references": datasets.Value("int32")}
            ),
            license="Apache-2.0",
        )

    def _compute(self, predictions, references, top_fraction: float = 0.1) -> dict:
        scores = np.asarray(predictions, dtype=np.float64)
        flipped = np.asarray(references, dtype=np.int64)
        if not 0.0 < top_fraction <= 1.0:
            raise ValueError(f"top_fraction must lie in (0, 1], got {top_fraction}.")
        if not np.isin(flipped, (0, 1)).all():
            raise ValueError(
                f"references must be 0 (clean) or 1 (flipped), got {sorted(set(flipped.tolist()))}."
            )
        if np.isnan(scores).any():
            raise ValueError("predictions contain NaN; score every instance with a finite number.")
        num_flipped = int(flipped.sum())
        num_clean = len(flipped) - num_flipped
        if num_flipped == 0 or num_clean == 0:
            raise ValueError(
                f"Need both flipped and clean instances, got {num_flipped} flipped of {len(flipped)}."
            )
        ranks = average_ranks(scores)
        u_statistic = ranks[flipped == 1].sum() - num_flipped * (num_flipped + 1) / 2.0
        top = int(np.ceil(top_fraction * len(scores)))
        # A stable sort on the negated scores: ties keep the input order, so the result is deterministic.
        top_rows = np.argsort(-scores, kind="mergesort")[:top]
        return {
            "roc_auc": float(u_statistic / (num_flipped * num_clean)),
            "top_fraction_recall": float(flipped[top_rows].sum() / num_flipped),
            "num_flipped": num_flipped,
            "num_instances": len(flipped),
        }
