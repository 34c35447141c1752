"""recipes/cleansing.py: the cached-bottom-layers model computes what the full model computes, the peer scores
are the quantities they claim, and the recipe runs end to end with tiny settings (a 2-layer BERT built here)."""

from __future__ import annotations

import importlib
import json
import sys
import types
from pathlib import Path

import adapters
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_recipe_sst2 import make_backbone
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from hf_turnover.results import load_scores

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SENTENCES = [
    "a gorgeous , witty film .",
    "dull and overlong .",
    "the plot is thin but the acting is fine .",
    "bad",
]
ADAPTERS = types.SimpleNamespace(
    adapter_layers=1, adapter_width=24, lower_adapter_width=8, turnover_top_layers=None
)


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> str:
    return str(make_backbone(tmp_path_factory.mktemp("cleansing") / "backbone"))


@pytest.fixture
def recipe(monkeypatch):
    monkeypatch.syspath_prepend(str(RECIPES))
    return importlib.import_module


def cached_batch(parts, backbone: str, layers: int, labels=(1, 0, 1, 0)) -> dict[str, torch.Tensor]:
    states, offsets = parts.bottom_layer_states(backbone, SENTENCES, 16, layers, batch_size=3)
    rows = [{"inputs_embeds": states[offsets[i] : offsets[i + 1]], "label": labels[i]} for i in range(4)]
    return parts.PadStates()(rows)


@pytest.mark.parametrize("adapter_layers", [1, 2])
def test_cached_model_equals_the_full_model(recipe, backbone, adapter_layers):
    parts, model_part = recipe("cleansing_parts"), recipe("cleansing_model")
    args = types.SimpleNamespace(**{**vars(ADAPTERS), "adapter_layers": adapter_layers})
    torch.manual_seed(0)
    cached = model_part.adapter_classifier(args, backbone, 2, cached_layers=2 - adapter_layers).eval()
    for p in cached.parameters():  # adapters start as the identity: make them matter
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    full = AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=2)
    adapters.init(full)
    full.add_adapter("cleansing", config=cached.adapters_config.get("cleansing"))
    result = full.load_state_dict(cached.state_dict(), strict=False)
    assert not result.unexpected_keys  # same names, same shapes: the cached model is the full one, cut
    full.eval()
    full.set_active_adapters("cleansing")
    tokens = AutoTokenizer.from_pretrained(backbone)(SENTENCES, padding=True, max_length=16, truncation=True,
                                                     return_tensors="pt")  # fmt: skip
    batch = cached_batch(parts, backbone, 2 - adapter_layers)
    expected = full(**tokens).logits
    got = cached(inputs_embeds=batch["inputs_embeds"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    full.set_active_adapters(None)
    assert not torch.allclose(full(**tokens).logits, expected, atol=1e-3)  # the adapters take part


def test_peer_scores_are_what_they_claim(recipe, backbone):
    parts, peers, model_part = recipe("cleansing_parts"), recipe("cleansing_peers"), recipe("cleansing_model")
    torch.manual_seed(0)
    model = model_part.adapter_classifier(ADAPTERS, backbone, 2, cached_layers=1).eval()
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    params = [p for p in model.parameters() if p.requires_grad]
    batch = cached_batch(parts, backbone, 1)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    direction = [torch.randn_like(p) for p in params]
    losses = F.cross_entropy(model(**inputs).logits, batch["labels"], reduction="none")
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        got = peers.directional_derivatives(losses, params, direction)
    for row in range(4):  # one row at a time: its own gradient, dotted
        one = {k: v[row : row + 1, : int(batch["attention_mask"][row].sum())] for k, v in inputs.items()}
        loss = F.cross_entropy(model(**one).logits, batch["labels"][row : row + 1])
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        expected = sum((g * d).sum() for g, d in zip(grads, direction, strict=True) if g is not None)
        torch.testing.assert_close(got[row], expected, rtol=1e-4, atol=1e-6)


def test_last_layer_influence_matches_autograd(recipe):
    peers = recipe("cleansing_peers")
    generator = torch.Generator().manual_seed(0)
    feats, weight = torch.randn(30, 5, generator=generator), torch.randn(3, 6, generator=generator)
    labels, target_feats = (
        torch.randint(0, 3, (30,), generator=generator),
        torch.randn(4, 5, generator=generator),
    )
    target_labels = torch.randint(0, 3, (4,), generator=generator)

    def logits(w, x):
        return torch.cat([x, torch.ones(len(x), 1)], 1).double() @ w.reshape(3, 6).T

    def mean_loss(w, x, y):
        return F.cross_entropy(logits(w, x), y)

    flat = weight.double().reshape(-1)
    hessian = torch.autograd.functional.hessian(lambda w: mean_loss(w, feats, labels), flat)
    g_target = torch.autograd.grad(mean_loss(flat.requires_grad_(), target_feats, target_labels), flat)[0]
    expected = [
        g_target @ torch.linalg.solve(hessian + peers.IF_DAMPING * torch.eye(18, dtype=torch.float64),
                                      torch.autograd.grad(mean_loss(flat, feats[i : i + 1], labels[i : i + 1]), flat)[0])
        for i in range(30)
    ]  # fmt: skip
    probs = logits(flat.detach(), feats).softmax(-1).float()
    target_probs = logits(flat.detach(), target_feats).softmax(-1).float()
    got = peers.last_layer_influence(feats, probs, labels.numpy(), target_feats, target_probs, target_labels)
    np.testing.assert_allclose(got, torch.stack(expected).detach().numpy(), rtol=1e-6, atol=1e-10)


def test_cleansing_runs_end_to_end(recipe, backbone, tmp_path):
    out = tmp_path / "cleansing"
    options = {
        "model_name_or_path": backbone, "max_train_samples": 60, "max_validation_samples": 8, "max_test_samples": 20,
        "num_seeds": 2, "num_train_epochs": 1, "remove_fraction": 0.1, "per_device_train_batch_size": 16,
        "adapter_layers": 1, "adapter_width": 24, "lower_adapter_width": 8, "max_length": 16,
        "peers": "gradient_dot,loss", "output_dir": out, "disable_tqdm": "true", "seed": 0,
    }  # fmt: skip
    results = recipe("cleansing").main([item for k, v in options.items() for item in (f"--{k}", str(v))])
    assert json.loads((out / "results.json").read_text()) == results
    conditions = ["no removal", "random removal", "turn-over mean influence", "turn-over centered mean influence",
                  "gradient_dot", "loss"]  # fmt: skip
    assert [r["condition"] for r in results["rows"]] == conditions
    for row in results["rows"]:
        assert len(row["accuracies"]) == len(row["losses"]) == 2 and row["seeds"] == [0, 1]
        assert all(0.0 <= a <= 1.0 for a in row["accuracies"]) and all(loss > 0 for loss in row["losses"])
        assert row["accuracy_mean"] == pytest.approx(np.mean(row["accuracies"]))
        assert row["accuracy_se"] == pytest.approx(np.std(row["accuracies"], ddof=1) / np.sqrt(2))
        random_accuracies = results["rows"][1]["accuracies"]
        assert row["accuracy_vs_random"] == pytest.approx(np.subtract(row["accuracies"], random_accuracies))
    table = (out / "table.md").read_text().splitlines()
    assert table[2].startswith("| no removal | ") and "78.3 +- 0.2" in table[4] and len(table) == 2 + 6 + 2
    # Each method removes its 10% most negative scores (6 of 60); ids are row positions.
    scores = load_scores(out / "mean_influence.parquet").to_pandas().set_index("train_id").score
    assert len(scores) == 60 and scores.notna().all() and (scores != 0).any()
    removed = results["removed_train_ids"]
    assert list(removed["turn-over mean influence"]) == scores.sort_values(kind="stable").index[:6].tolist()
    peer = load_scores(out / "peer_scores.parquet").to_pandas()
    assert set(peer.columns) == {"train_id", "gradient_dot", "influence_function", "loss"}
    assert sorted(removed["loss"]) == sorted(peer.train_id[peer.loss.argsort(kind="stable")[:6]].tolist())
    assert (peer.loss < 0).all()  # minus the training loss
    stats = results["removal_stats"]
    assert stats["loss"]["misclassified"] >= stats["base_misclassified"]  # the highest losses are the errors
    assert (out / "cleansing.png").stat().st_size > 0 and (out / "removed.md").read_text().count("\n| ") == 7

    # benchmarks/faithfulness/cleansing_label_control.py: random removals with the loss ranking's label counts,
    # paired with the run's seeds; retraining the run's own condition reproduces its number (the pairing holds).
    sys.path.insert(0, str(RECIPES.parent / "benchmarks" / "faithfulness"))
    control = importlib.import_module("cleansing_label_control")
    labels = np.asarray(
        recipe("cleansing_parts").load_splits(_split_args(60))["train"]["label"]
    )  # ids: positions
    drawn = control.label_matched(labels, removed["loss"], seed=0)
    assert sorted(labels[drawn].tolist()) == sorted(labels[removed["loss"]].tolist()) and len(set(drawn)) == 6
    got = control.main(["--run", str(out), "--method", "loss"])
    assert got["reproduced_first_seed"]["again"] == pytest.approx(got["reproduced_first_seed"]["run"])
    assert len(got["control_accuracies"]) == 2 and sum(got["removed_labels"].values()) == 6
    loss_row = next(r for r in results["rows"] if r["condition"] == "loss")
    expected = 100 * (np.asarray(loss_row["accuracies"]) - got["control_accuracies"])
    assert got["method_minus_control"][0] == pytest.approx(expected.mean())


def test_frozen_setup_still_runs(recipe, tmp_path):
    out = tmp_path / "frozen"
    options = {
        "setup": "frozen", "max_train_samples": 60, "max_validation_samples": 8, "max_test_samples": 20,
        "num_seeds": 2, "num_train_epochs": 1, "remove_fraction": 0.1, "hidden_size": 16, "peers": "",
        "output_dir": out, "disable_tqdm": "true", "seed": 0, "pooled": "true",
    }  # fmt: skip
    results = recipe("cleansing").main([item for k, v in options.items() for item in (f"--{k}", str(v))])
    assert [r["condition"] for r in results["rows"]] == [
        "no removal",
        "random removal",
        "turn-over mean influence",
        "turn-over centered mean influence",
        "turn-over pooled mean influence",
    ]
    assert len(results["removed_train_ids"]["turn-over mean influence"]) == 6
    pooled = load_scores(out / "mean_influence_pooled.parquet").to_pandas().set_index("train_id").score
    assert len(pooled) == 60 and not pooled.equals(
        load_scores(out / "mean_influence.parquet").to_pandas().score
    )
    removed = results["removed_train_ids"]["turn-over pooled mean influence"]
    assert list(removed) == pooled.sort_values(kind="stable").index[:6].tolist()


def _two_head_model(backbone: str, train) -> torch.nn.Module:
    """A 2-head turn-over model with adapters in both layers of the tiny backbone, its adapters and classifiers
    random (so that masks and heads matter), recording ``train`` as its training set."""
    from hf_turnover import TurnoverBertForSequenceClassification
    from hf_turnover.fingerprint import FINGERPRINT_KEY, training_fingerprint

    torch.manual_seed(0)
    model = TurnoverBertForSequenceClassification.from_backbone(backbone, heads=2)
    for name, p in model.named_parameters():
        if ".adapters." in name or "classifier" in name:
            torch.nn.init.normal_(p, std=0.2)
    setattr(
        model.config,
        FINGERPRINT_KEY,
        training_fingerprint(train, "instance_id", ["instance_id", "label", "sentence"]),
    )
    return model.eval()


def test_peer_features_of_k_heads_give_the_averaged_logits(recipe, backbone):
    """The influence function's last layer of a K-head model: the heads' classifier inputs side by side, weights
    [W_0 W_1] / 2 and the mean bias, compute the averaged model's logits exactly."""
    parts, peers, model_part = recipe("cleansing_parts"), recipe("cleansing_peers"), recipe("cleansing_model")
    train = parts.load_splits(_split_args(60))["train"]
    model = model_part._on_cache(_two_head_model(backbone, train), 0)
    batch = cached_batch(parts, backbone, 0)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    features = peers._Features(model)
    try:
        logits = model(**inputs).logits
    finally:
        features.remove()
    heads = [model.classifier, *model.turnover_classifiers]
    assert features.value.shape == (4, sum(h.in_features for h in heads))
    weight = torch.cat([h.weight for h in heads], 1) / 2
    bias = torch.stack([h.bias for h in heads]).mean(0)
    torch.testing.assert_close(features.value @ weight.T + bias, logits.detach(), rtol=1e-5, atol=1e-6)
    with model.single_head(1):
        alone = model(**inputs).logits
    assert not torch.allclose(alone, logits, atol=1e-3)  # the second head takes part


def _split_args(max_train: int) -> types.SimpleNamespace:
    return types.SimpleNamespace(dataset_name=None, dataset_config_name=None, target_dataset_name="amazon_electronics",
                                 max_train_samples=max_train, max_validation_samples=8, max_test_samples=20)  # fmt: skip


def test_cleansing_scores_with_a_trained_turnover_model(recipe, backbone, tmp_path):
    """--turnover_model: the recipe scores with the given (2-head) model as it is, on the cached inputs, and
    refuses a model trained on another set or with adapters in the cached layers."""
    parts = recipe("cleansing_parts")
    train = parts.load_splits(_split_args(60))["train"]
    model = _two_head_model(backbone, train)
    model.save_pretrained(tmp_path / "model")
    options = {
        "model_name_or_path": backbone, "turnover_model": tmp_path / "model", "adapter_layers": 2,
        "max_train_samples": 60, "max_validation_samples": 8, "max_test_samples": 20, "num_seeds": 1,
        "remove_fraction": 0.1, "per_device_train_batch_size": 16, "adapter_width": 24, "lower_adapter_width": 8,
        "max_length": 16, "peers": "influence_function", "centered": "false", "pooled": "true",
        "output_dir": tmp_path / "out", "cache_dir": tmp_path / "cache", "disable_tqdm": "true", "seed": 0,
    }  # fmt: skip
    argv = lambda **changes: [x for k, v in {**options, **changes}.items() for x in (f"--{k}", str(v))]  # noqa: E731
    results = recipe("cleansing").main(argv())
    assert [r["condition"] for r in results["rows"]] == [
        "no removal", "random removal", "turn-over mean influence", "turn-over pooled mean influence",
        "influence_function",
    ]  # fmt: skip
    for name in ("mean_influence", "mean_influence_pooled"):
        scores = load_scores(tmp_path / "out" / f"{name}.parquet").to_pandas().score
        assert len(scores) == 60 and scores.notna().all() and (scores != 0).any()
    # The scored model is the saved one, untrained: its accuracy on the targets from tokens, without the cache.
    validation = parts.load_splits(_split_args(60))["validation"]
    tokens = AutoTokenizer.from_pretrained(backbone)(list(validation["sentence"]), padding=True, max_length=16,
                                                     truncation=True, return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        predicted = model(**tokens).logits.argmax(-1).numpy()
    expected = float((predicted == np.asarray(validation["label"])).mean())
    assert results["turnover_model_validation_accuracy"] == pytest.approx(expected)
    with pytest.raises(ValueError, match="fingerprint .*--turnover_model"):
        recipe("cleansing").main(argv(max_train_samples=50))
    with pytest.raises(ValueError, match="adapters in layer 0.*raise --adapter_layers"):
        recipe("cleansing").main(argv(adapter_layers=1))
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight.add_(0.01)
    model.save_pretrained(tmp_path / "other_backbone")
    with pytest.raises(ValueError, match="word_embeddings.weight differs from the backbone"):
        recipe("cleansing").main(argv(turnover_model=tmp_path / "other_backbone"))
    with pytest.raises(ValueError, match="--turnover_model .* needs --setup adapters"):
        recipe("cleansing").main(argv(setup="frozen"))


def test_paired_batches_skip_removed_rows_in_place_and_train_on_exactly_them(recipe, tmp_path):
    import datasets
    from transformers import TrainingArguments

    paired = recipe("paired_retraining")
    assert paired.skip_rows([[0, 1, 2], [3, 4, 5], [6]], {1, 3, 6}) == [[0, 2], [4, 5]]
    train = datasets.Dataset.from_dict({"x": [[float(i)] for i in range(10)], "label": [i % 2 for i in range(10)],
                                        "length": [1, 9, 2, 8, 3, 7, 4, 6, 5, 5]})  # fmt: skip
    batches = paired.fixed_batches(train, 4, seed=3)
    assert sorted(sum(batches, [])) == list(range(10)) and [len(b) for b in batches] == [4, 4, 2]
    assert batches == paired.fixed_batches(train, 4, seed=3) != paired.fixed_batches(train, 4, seed=4)
    assert batches[0][0] == 1  # length-grouped as group_by_length: the longest row comes first
    seen = []

    def collate(rows):
        seen.append([int(r["x"][0]) for r in rows])
        return {"x": torch.tensor([r["x"] for r in rows]), "labels": torch.tensor([r["label"] for r in rows])}

    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(1, 2)

        def forward(self, x, labels):
            return {"loss": torch.nn.functional.cross_entropy(self.layer(x), labels)}

    args = TrainingArguments(str(tmp_path), num_train_epochs=2, report_to=[], use_cpu=True, save_strategy="no",
                             remove_unused_columns=False, disable_tqdm=True, dataloader_pin_memory=False)  # fmt: skip
    skipped = paired.skip_rows(batches, [batches[1][0]])
    paired.FixedBatchesTrainer(
        Linear(), args, train_dataset=train, data_collator=collate, batches=skipped
    ).train()
    assert seen == skipped + skipped  # every epoch, in order
