"""hf_turnover.evaluation.seed_agreement: the agreement of two seeds' scores, against scipy's Spearman."""

import numpy as np
import pytest
from scipy.stats import spearmanr

from hf_turnover.evaluation import seed_agreement


def test_matrix_agreement_equals_scipy_and_counts_the_top_k():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((6, 50))
    b = a + 0.7 * rng.standard_normal((6, 50))
    out = seed_agreement(a, b, top_k=5)
    rows = [spearmanr(x, y)[0] for x, y in zip(a, b, strict=True)]
    assert out["pairwise_spearman"] == pytest.approx(np.mean(rows))
    assert out["pairwise_spearman_se"] == pytest.approx(np.std(rows, ddof=1) / np.sqrt(6))
    assert out["mean_influence_spearman"] == pytest.approx(spearmanr(a.mean(0), b.mean(0))[0])
    shared = [len(set(np.argsort(-x)[:5]) & set(np.argsort(-y)[:5])) / 5 for x, y in zip(a, b, strict=True)]
    assert out["top_k_overlap"] == pytest.approx(np.mean(shared))


def test_identical_scores_agree_fully_and_independent_ones_do_not():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((4, 200))
    same = seed_agreement(a, a.copy())
    assert same["pairwise_spearman"] == pytest.approx(1.0) and same["top_k_overlap"] == 1.0
    other = seed_agreement(a, rng.standard_normal((4, 200)))
    assert abs(other["pairwise_spearman"]) < 0.2


def test_vectors_and_bad_shapes():
    a = np.arange(20.0)
    assert seed_agreement(a, -a)["spearman"] == pytest.approx(-1.0)
    with pytest.raises(ValueError, match=r"\(3, 4\) and \(4, 3\)"):
        seed_agreement(np.zeros((3, 4)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="top_k=50"):
        seed_agreement(a, a, top_k=50)
