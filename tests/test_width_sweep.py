"""The width / N / p sweep benchmark (benchmarks/faithfulness/width_sweep.py): a smoke run end to end, and its pieces against
independent computations (per-sample gradients, Captum's TracInCP, hand-computed own/flip losses)."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks" / "faithfulness"
COMMON = BENCHMARKS.parent / "lib"  # bench_common, faithfulness_lib
sys.path[:0] = [str(BENCHMARKS), str(COMMON)]

from faithfulness_lib import peers  # noqa: E402
from faithfulness_lib.batched import init_stack  # noqa: E402
from faithfulness_lib.sweep import factorized_grad_dot  # noqa: E402


def _load_driver():
    spec = importlib.util.spec_from_file_location("width_sweep", BENCHMARKS / "width_sweep.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["width_sweep"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("width_sweep")
    results = _load_driver().main(["--output_dir", str(out), "--smoke", "true"])
    return out, results


def test_factorized_grad_dot_equals_per_sample_gradients():
    torch.manual_seed(0)
    model = init_stack(12, 7, 3, 1, seed=3).module(0)
    x_train, y_train = torch.randn(9, 12), torch.randint(0, 3, (9,))
    x_t, y_t = torch.randn(4, 12), torch.randint(0, 3, (4,))
    expected = peers.grad_dot(model, x_train, y_train, x_t, y_t)
    np.testing.assert_allclose(factorized_grad_dot(model, x_train, y_train, x_t, y_t), expected, rtol=1e-4,
                               atol=1e-6)  # fmt: skip


def test_smoke_run_writes_results_and_report(smoke):
    out, results = smoke
    for name in ("results.json", "results.md", "arrays.npz", "figures/width_sweep_lds.png"):
        assert (out / name).is_file(), name
    on_disk = json.loads((out / "results.json").read_text())
    assert {c["group"] for c in on_disk["cells"]} == {"width", "n", "p", "idea"}
    assert {c["variant"] for c in on_disk["cells"]} == {"standard", "input_mask", "frozen"}
    assert sorted(c["num_train"] for c in on_disk["cells"] if c["group"] == "n") == [64, 128]
    text = (out / "results.md").read_text()
    assert "| H | test acc | LDS exact" in text and results["command"] in text


def test_smoke_lds_values_are_finite_correlations(smoke):
    _, results = smoke
    for cell in results["cells"]:
        values = [cell["lds_exact"], cell["lds_linear"], *(p["lds"] for p in cell["peers"].values())]
        values += [cell[k] for k in ("lds_mean_linear", "lds_mean_exact") if k in cell]
        for value in values:
            assert isinstance(value, float) and math.isfinite(value) and -1.0 <= value <= 1.0, (
                cell["key"],
                value,
            )
        assert 0.0 <= cell["test_accuracy"] <= 1.0
        assert cell["exact_s_per_target"] > 0 and cell["linear_s_per_target"] > 0
    width = [c for c in results["cells"] if c["group"] == "width"]
    assert all(c.get("ensemble_seeds") == 3 for c in width)
    assert any("influence function" in name for name in width[0]["peers"])


def test_trainer_masks_are_the_library_masks(smoke):
    # the library's exact own/flip score equals a hand computation with the masks the trainer trained with,
    # for the plain, input-mask and frozen variants
    _, results = smoke
    for cell in results["cells"]:
        assert cell["hooks_vs_trainer_max_abs_diff"] < 1e-4, cell["key"]


def test_linear_scores_track_exact_scores(smoke):
    _, results = smoke
    for cell in results["cells"]:
        assert cell["sign_agreement"] > 0.75, cell["key"]
        assert cell["rank_agreement"] > 0.5, cell["key"]
        if cell["variant"] != "input_mask":  # one masked layer: nearly linear in the masks at this size
            assert cell["sign_agreement"] > 0.95, cell["key"]


def test_factorized_tracin_equals_captum(smoke):
    out, results = smoke
    with np.load(out / "arrays.npz") as arrays:
        keys = [k for k in arrays.files if "/peer/TracInCP" in k]
        captum = [k for k in keys if "Captum" in k]
        assert captum
        for key in captum:
            factorized = key.replace("Captum, ", "").replace(" ckpts)", " ckpts, factorized)")
            np.testing.assert_allclose(arrays[factorized], arrays[key], rtol=1e-3, atol=1e-5)
