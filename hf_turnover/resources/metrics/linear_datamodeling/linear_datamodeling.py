"""Linear datamodeling score (LDS, Park et al. 2023, "TRAK") as a local `evaluate` module. Loads offline with
`evaluate.load(<this directory>)`.

One input row per target: `predictions` holds the target's attribution score for every training instance
(positive = the instance helped the target, hf_turnover's sign convention), `references` holds the target's
measured loss (or margin) under each of J models retrained on random subsets of the training set. The
`subsets` keyword gives the J x N 0/1 membership matrix of those subsets, in the same instance order as
`predictions`.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Linear datamodeling score: for each target, the Spearman correlation between the predicted effect of each
training subset (the sum of the target's scores over the subset's members) and the measured outcome of the model
retrained on that subset; averaged over targets. With `output="loss"` (default) the measured losses are negated
first, since positive scores mean "helped" and so predict a LOWER loss; with `output="margin"` they are used as
they are. 1.0 is a perfect linear model of retraining, 0.0 no information.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): Per target, the scores of the N training instances.
    references (`list` of `list` of `float`): Per target, the measured loss (or margin) of the J subset models.
    subsets (`list` of `list` of `int` or array (J, N)): 1 if instance n was in subset j's training set, else 0.
    output (`str`): "loss" (lower is better; default) or "margin" (higher is better).

Returns:
    lds (`float`): Mean over targets of the per-target Spearman correlation (targets whose predicted or
        measured values are all equal have no correlation and are left out; see num_targets).
    lds_per_target (`list` of `float`): Per-target correlations, NaN where undefined.
    num_targets (`int`): Targets with a defined correlation.  num_subsets (`int`): J.

Examples:
    >>> metric = evaluate.load("hf_turnover/resources/metrics/linear_datamodeling")
    >>> metric.compute(predictions=[[1.0, 0.0, 2.0]], references=[[0.5, 0.1, 0.9]],
    ...                subsets=[[1, 0, 0], [0, 1, 1], [1, 1, 1]], output="margin")["lds"]
    0.5
"""

_CITATION = """
@inproceedings{park2023trak,
  title={TRAK: Attributing Model Behavior at Scale},
  author={Park, Sung Min and Georgiev, Kristian and Ilyas, Andrew and Leclerc, Guillaume and Madry, Aleksander},
  booktitle={International Conference on Machine Learning},
  year={2023}
}
"""

OUTPUTS = ("loss", "margin")


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties sharing their average rank (as scipy.stats.rankdata's default)."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho (Pearson of average ranks); NaN when either side is constant."""
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = np.sqrt((ra**2).sum() * (rb**2).sum())
    return float((ra * rb).sum() / denominator) if denominator > 0 else float("nan")


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class LinearDatamodeling(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float64")),
                    "references": datasets.Sequence(datasets.Value("float64")),
                }
            ),
            license="Apache-2.0",
        )

    def _compute(self, predictions, references, subsets=None, output: str = "loss") -> dict:
        if subsets is None:
            raise ValueError("Pass subsets=: the (J, N) 0/1 membership matrix of the retrained subsets.")
        if output not in OUTPUTS:
            raise ValueError(f"output={output!r} is unknown; use one of {OUTPUTS}.")
        members = np.asarray(subsets, dtype=np.float64)
        scores = np.asarray(predictions, dtype=np.float64)  # (T, N)
        measured = np.asarray(references, dtype=np.float64)  # (T, J)
        if (
            members.ndim != 2
            or scores.shape[1:] != members.shape[1:]
            or measured.shape[1:] != members.shape[:1]
        ):
            raise ValueError(
                f"Shapes disagree: subsets {members.shape} must be (J, N) with predictions (T, N)={scores.shape} "
                f"and references (T, J)={measured.shape}."
            )
        predicted = scores @ members.T  # (T, J): summed scores of each subset's members
        sign = -1.0 if output == "loss" else 1.0
        per_target = [spearman(predicted[t], sign * measured[t]) for t in range(len(scores))]
        defined = [r for r in per_target if not np.isnan(r)]
        return {
            "lds": float(np.mean(defined)) if defined else float("nan"),
            "lds_per_target": per_target,
            "num_targets": len(defined),
            "num_subsets": int(members.shape[0]),
        }
