"""Faithfulness tooling: the metric modules against hand-computed values, the ensemble variant, the benchmark's
retraining (it must be the leave-one-out of the paper's Eq. 1), and a smoke run of the whole benchmark."""

import importlib.util
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn
from transformers import PretrainedConfig

from hf_turnover import (
    TurnoverConfig,
    add_turnover,
    estimate_influence,
    score_arguments,
    self_influence,
    turnover_context,
)
from hf_turnover.evaluation import load_faithfulness_metric, random_half_subsets, score_matrix
from hf_turnover.variants import average_scores, ensemble_influence

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks" / "faithfulness"
COMMON = BENCHMARKS.parent / "lib"  # bench_common, faithfulness_lib
sys.path[:0] = [str(BENCHMARKS), str(COMMON)]

from faithfulness_lib.batched import own_masks, train_stack, turnover_config  # noqa: E402


@pytest.fixture(scope="module")
def mislabel_metric():
    return load_faithfulness_metric("mislabel_detection")


@pytest.fixture(scope="module")
def lds_metric():
    return load_faithfulness_metric("linear_datamodeling")


@pytest.mark.parametrize(
    "predictions, references, top_fraction, auc, recall",
    [
        # flipped 0.9 beats all 3 clean, flipped 0.3 beats only 0.1: 4 of 6 pairs; top 1 row holds 1 of 2 flipped
        ([0.9, 0.1, 0.8, 0.3, 0.5], [1, 0, 0, 1, 0], 0.2, 4 / 6, 0.5),
        # a tie between a flipped and a clean instance counts half: (0.5 + 1) / 2
        ([1.0, 1.0, 0.0], [1, 0, 0], 0.34, 0.75, 1.0),
        ([0.0, 1.0, 2.0, 3.0], [1, 1, 0, 0], 0.5, 0.0, 0.0),  # worst ranking
    ],
)
def test_mislabel_detection_hand_values(mislabel_metric, predictions, references, top_fraction, auc, recall):
    out = mislabel_metric.compute(predictions=predictions, references=references, top_fraction=top_fraction)
    assert out["roc_auc"] == pytest.approx(auc)
    assert out["top_fraction_recall"] == pytest.approx(recall)
    assert out["num_flipped"] == sum(references)


def test_mislabel_detection_matches_sklearn(mislabel_metric):
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    flipped = (rng.random(200) < 0.1).astype(int)
    scores = rng.normal(size=200) + flipped  # flipped rows score higher on average
    scores[:20] = np.round(scores[:20])  # some ties
    out = mislabel_metric.compute(predictions=scores, references=flipped)
    assert out["roc_auc"] == pytest.approx(roc_auc_score(flipped, scores))


def test_mislabel_detection_rejects_one_class(mislabel_metric):
    with pytest.raises(ValueError, match="both flipped and clean"):
        mislabel_metric.compute(predictions=[0.1, 0.2], references=[0, 0])


def test_lds_hand_value(lds_metric):
    subsets = [[1, 0, 0], [0, 1, 1], [1, 1, 1]]  # summed scores: 1, 2, 3
    margin = lds_metric.compute(predictions=[[1.0, 0.0, 2.0]], references=[[0.5, 0.1, 0.9]], subsets=subsets,
                                output="margin")  # fmt: skip
    assert margin["lds"] == pytest.approx(0.5)  # ranks (1,2,3) vs (2,1,3): 1 - 6*2/24
    loss = lds_metric.compute(predictions=[[1.0, 0.0, 2.0]], references=[[0.5, 0.1, 0.9]], subsets=subsets)
    assert loss["lds"] == pytest.approx(-0.5)  # helpful scores predict LOWER loss


def test_lds_matches_scipy_and_skips_constant_targets(lds_metric):
    rng = np.random.default_rng(1)
    scores, members = rng.normal(size=(3, 12)), random_half_subsets(12, 8, seed=2)
    losses = rng.normal(size=(3, 8))
    losses[2] = 1.0  # a constant target has no correlation
    out = lds_metric.compute(predictions=scores, references=losses, subsets=members)
    expected = [spearmanr(members @ scores[t], -losses[t])[0] for t in range(2)]
    assert out["num_targets"] == 2 and np.isnan(out["lds_per_target"][2])
    assert out["lds"] == pytest.approx(np.mean(expected))
    with pytest.raises(ValueError, match="Shapes disagree"):
        lds_metric.compute(predictions=scores, references=losses[:, :3], subsets=members)


def test_random_half_subsets_and_score_matrix():
    members = random_half_subsets(10, 4, seed=0)
    assert members.shape == (4, 10) and (members.sum(1) == 5).all()
    table = datasets.Dataset.from_dict(
        {"target_id": [7, 7, 3], "train_id": [1, 2, 1], "score": [0.5, -1.0, 2.0]}
    )
    matrix, rows, cols = score_matrix(table, fill=0.0)
    assert rows.tolist() == [3, 7] and cols.tolist() == [1, 2]
    assert matrix.tolist() == [[2.0, 0.0], [0.5, -1.0]]
    with pytest.raises(ValueError, match="no score"):
        score_matrix(table)


class TinyMLP(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1, self.classifier, self.config = nn.Linear(6, 16), nn.Linear(16, 3), PretrainedConfig()

    def forward(self, features):
        return self.classifier(torch.relu(self.fc1(features)))


def _tiny_models(seeds):
    config = dict(target_modules=None, head_modules="classifier")
    return [add_turnover(TinyMLP(s), TurnoverConfig(seed=s, **config)).eval() for s in seeds]


def test_ensemble_is_the_mean_of_its_models():
    g = torch.Generator().manual_seed(0)
    targets = datasets.Dataset.from_dict(
        {"features": torch.randn(2, 6, generator=g).numpy(), "labels": [0, 2]}
    )
    kwargs = dict(train_ids=list(range(5)), method="exact", check_fingerprint=False, progress=False)
    models = _tiny_models([1, 2, 3])
    single = [score_matrix(estimate_influence(m, None, targets, **kwargs))[0] for m in models]
    averaged = ensemble_influence(models, None, targets, **kwargs)
    np.testing.assert_allclose(score_matrix(averaged)[0], np.mean(single, axis=0), rtol=1e-5, atol=1e-6)
    train = datasets.Dataset.from_dict(
        {
            "instance_id": list(range(5)),
            "features": torch.randn(5, 6, generator=g).numpy(),
            "labels": [0, 1, 2, 0, 1],
        }
    )
    selfs = [self_influence(m, train, check_fingerprint=False, progress=False) for m in models]
    mean_self = average_scores(selfs).sort("train_id")
    expected = np.mean([np.asarray(r.sort("train_id")["score"]) for r in selfs], axis=0)
    np.testing.assert_allclose(np.asarray(mean_self["score"]), expected, rtol=1e-5, atol=1e-6)
    assert score_arguments(mean_self)["ensemble"] == {"num_models": 3, "mask_seeds": [1, 2, 3]}
    with pytest.raises(ValueError, match="share mask seeds"):
        average_scores([estimate_influence(m, None, targets, **kwargs) for m in _tiny_models([4, 4])])
    with pytest.raises(ValueError, match="top_k"):
        ensemble_influence(models, None, targets, top_k=1, **kwargs)


def test_batched_leave_one_out_equals_retraining_without_the_slot():
    """Model k of the stack (weight 0 on one row) == an nn.Module trained through hf_turnover's hooks on the same
    minibatches with that row's slot removed, from the same initial parameters."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 5, generator=g), torch.randint(0, 3, (20,), generator=g)
    weights = torch.ones(2, 20)
    weights[1, 7] = 0.0
    config = turnover_config(seed=3)
    kw = dict(hidden=8, num_classes=3, seed=5, epochs=2, lr=1e-2, config=config, batch_size=4)
    stack, _ = train_stack(x, y, weights, **kw)
    start, _ = train_stack(x, y, weights, **{**kw, "epochs": 0})
    model = start.module(0, config).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    order_rng = torch.Generator().manual_seed(5 + 1_000_003)  # the stack's minibatch sequence
    for _ in range(2):
        order = torch.randperm(20, generator=order_rng)
        for begin in range(0, 20, 4):
            rows = [int(r) for r in order[begin : begin + 4] if r != 7]
            with turnover_context(rows, "own"):
                loss = nn.functional.cross_entropy(model(x[rows]), y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    trained = stack.module(1)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, dict(trained.named_parameters())[name], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(stack.module(0).fc1.weight, trained.fc1.weight)  # removing the row mattered
    masks = own_masks(20, 8, config)
    with turnover_context(list(range(20)), "own"):  # the stack's masks are the hook's masks
        torch.testing.assert_close(
            stack.module(0, config)(x), stack.logits(x, masks)[0], rtol=1e-5, atol=1e-5
        )


def test_benchmark_smoke(tmp_path):
    pytest.importorskip("captum")
    spec = importlib.util.spec_from_file_location("faithfulness_driver", BENCHMARKS / "faithfulness.py")
    driver = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = driver  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(driver)
    results = driver.main(["--output_dir", str(tmp_path), "--smoke", "true", "--setups", "mnist,text"])
    assert (tmp_path / "results.json").is_file() and (tmp_path / "results.md").is_file()
    for name, result in results["setups"].items():
        methods = [r["method"] for r in result["pairwise"]]
        assert any(m.startswith("turn-over own vs flip") for m in methods) and "random" in methods, name
        assert any(m.startswith("influence function") for m in methods) and any(
            "TracIn" in m for m in methods
        )
        for row in result["pairwise"]:
            assert -1.0 <= row["loo"] <= 1.0 and -1.0 <= row["lds"] <= 1.0, row
            assert row["per_target_s"] > 0.0, row
        for row in result["mislabel"]:
            assert 0.0 <= row["roc_auc"] <= 1.0 and 0.0 <= row["top10_recall"] <= 1.0, row
        assert 0.0 <= result["diagnosis"]["signal_variance_share"] <= 1.0
        figures = sorted(p.name for p in (tmp_path / "figures").iterdir())
        assert f"{result['setup']['name']}_estimate_vs_truth.png" in figures
