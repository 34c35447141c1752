"""Accuracy as a local `evaluate` module, so that `evaluate.load(<this directory>)` works offline.

Same inputs and output as the Hub's `accuracy` metric, computed with numpy instead of scikit-learn.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Accuracy is the proportion of correct predictions among the examples:
Accuracy = (TP + TN) / (TP + TN + FP + FN).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): Predicted labels.
    references (`list` of `int`): Ground truth labels.
    normalize (`bool`): If False, return the number (or total weight) of correct predictions instead of the
        fraction. Defaults to True.
    sample_weight (`list` of `float`): Sample weights. Defaults to None (all weights 1).

Returns:
    accuracy (`float`): The fraction of correct predictions in [0, 1] (or their count if `normalize=False`).

Examples:
    >>> accuracy_metric = evaluate.load("hf_turnover/resources/metrics/accuracy")
    >>> accuracy_metric.compute(references=[0, 1, 2, 0, 1, 2], predictions=[0, 1, 1, 2, 1, 0])
    {'accuracy': 0.5}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
            ),
            license="MIT",
        )

    def _compute(
        self, predictions, references, normalize: bool = True, sample_weight=None
    ) -> dict[str, float]:
        correct = np.asarray(predictions) == np.asarray(references)
        weight = (
            np.ones(len(correct)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        )
        total = float(np.sum(weight * correct))
        return {"accuracy": total / float(np.sum(weight)) if normalize else total}
