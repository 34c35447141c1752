"""Smoke test of `accelerate launch recipes/sst2.py` with tiny settings: a 2-layer BERT backbone built here (with a
word-level vocabulary of the bundled sentences), 32 training sentences, one epoch. Checks that every output exists
and holds sane values; the full run's numbers are in the README."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import PINNED
from transformers import BertConfig, BertModel, BertTokenizerFast

from hf_turnover.data import load_bundled_dataset
from hf_turnover.results import load_scores

ROOT = Path(__file__).resolve().parents[1]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_backbone(folder: Path) -> Path:
    """A random 2-layer BERT whose vocabulary is the 300 most frequent words of the bundled training split."""
    counts: dict[str, int] = {}
    for sentence in load_bundled_dataset("rotten_tomatoes")["train"]["sentence"][:2000]:
        for word in re.findall(r"\w+|[^\w\s]", sentence.lower()):
            counts[word] = counts.get(word, 0) + 1
    words = sorted(counts, key=lambda w: -counts[w])[:300]
    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(SPECIAL + words) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(SPECIAL) + len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def recipe_output(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sst2")
    backbone = make_backbone(tmp / "backbone")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += [str(ROOT / "recipes" / "sst2.py"), "--model_name_or_path", str(backbone)]
    command += ["--max_train_samples", "32", "--max_eval_samples", "24", "--num_train_epochs", "1"]
    command += ["--per_device_train_batch_size", "8", "--max_length", "24", "--adapter_top_layers", "1"]
    command += ["--num_explained", "2", "--top_k", "3", "--curve_subset", "8", "--curve_points", "2"]
    command += ["--output_dir", str(tmp / "out"), "--disable_tqdm", "true"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **PINNED}
    result = subprocess.run(command, env=env, cwd=tmp, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return tmp / "out"


def test_outputs_exist_and_hold_sane_values(recipe_output):
    results = json.loads((recipe_output / "results.json").read_text())
    assert 0.0 <= results["accuracy_turnover"] <= 1.0 and 0.0 <= results["accuracy_baseline_dropout"] <= 1.0
    assert results["num_train"] == 32 and results["num_validation"] == 24
    assert results["turnover"]["p"] == 0.5 and results["timings"]["total_s"] > 0
    for name in ("learning_curves.png", "self_influence.png"):
        assert (recipe_output / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    scores = load_scores(recipe_output / "self_influence.parquet")
    assert len(scores) == 32 and torch.isfinite(torch.tensor(scores["score"])).all()
    report = (recipe_output / "misclassified.md").read_text()
    assert "with the error label" in report and "Highest self-influence" in report
    assert report.count("\n## ") == results["misclassified_explained"] <= 2
    pairs = re.findall(r"Gold: \*\*(\w+)\*\*, predicted: \*\*(\w+)\*\*", report)
    assert len(pairs) == results["misclassified_explained"] and all(gold != pred for gold, pred in pairs)


def test_learning_curves_were_logged(recipe_output):
    curves = json.loads((recipe_output / "results.json").read_text())["learning_curves"]
    assert len(curves) >= 2  # the PNG is drawn from these points
    for entry in curves:
        assert (
            entry["turnover_own_loss"] > 0
            and entry["turnover_flip_loss"] > 0
            and entry["turnover_eval_loss"] > 0
        )


def test_model_folder_has_card_fingerprint_and_adapters(recipe_output):
    model_dir = recipe_output / "model"
    assert (model_dir / "README.md").read_text().count("turn-over dropout (this model)") == 1
    config = json.loads((model_dir / "config.json").read_text())
    assert config["turnover_training"]["num_instances"] == 32
    assert config["adapters"]["config_map"], "the adapter set-up travels in config.json"


def test_saved_model_explains_with_the_pipeline(recipe_output):
    from hf_turnover.modeling_turnover import TurnoverBertForSequenceClassification
    from hf_turnover.pipeline_turnover import InfluencePipeline

    model = TurnoverBertForSequenceClassification.from_pretrained(recipe_output / "model")
    out = InfluencePipeline(model=model)("a gorgeous , witty movie .", top_k=2, restrict_to_label=True)
    assert out["prediction"]["label"] in ("negative", "positive") and len(out["helpful"]) == 2
    assert {item["label"] for item in out["helpful"]} == {out["restricted_to_label"]}


def test_saved_model_carries_the_pooled_basis(recipe_output, monkeypatch):
    """The recipe builds the pooled method's groups on its cached inputs and saves them: the pipeline reads them
    (the same ids as the training set) instead of running every training sentence again."""
    import hf_turnover.pipeline_turnover as module
    from hf_turnover.modeling_turnover import TurnoverBertForSequenceClassification
    from hf_turnover.pipeline_turnover import InfluencePipeline

    monkeypatch.setattr(module, "training_pooled_basis", lambda *a, **k: pytest.fail("rebuilt"))
    pipe = InfluencePipeline(
        model=TurnoverBertForSequenceClassification.from_pretrained(recipe_output / "model")
    )
    assert sorted(pipe.pooled_basis().ids.tolist()) == sorted(pipe.train_dataset["instance_id"])
    out = pipe("a gorgeous , witty movie .", top_k=2, method="pooled")
    assert len(out["helpful"]) == 2 and all(item["score"] > 0 for item in out["helpful"])
    timings = json.loads((recipe_output / "results.json").read_text())
    assert "pooled_basis_s" in json.dumps(timings)


def test_lora_option_masks_the_rank_units(tmp_path, monkeypatch):
    """`--adapter_config lora`, in-process: adapters' LoRA on query and value of every layer, turn-over on its rank
    units (and the baseline's plain dropout on the same units); the saved model carries them."""
    import importlib

    from hf_turnover.lora import ADAPTERS_LORA_MODULES
    from hf_turnover.model import turnover_layers
    from hf_turnover.modeling_turnover import TurnoverBertForSequenceClassification

    monkeypatch.syspath_prepend(str(ROOT / "recipes"))
    backbone = make_backbone(tmp_path / "backbone")
    argv = ["--model_name_or_path", str(backbone), "--adapter_config", "lora", "--lora_r", "4"]
    argv += ["--adapter_top_layers", "0", "--max_train_samples", "24", "--max_eval_samples", "16"]
    argv += ["--per_device_train_batch_size", "8", "--max_length", "24", "--num_explained", "1"]
    argv += ["--top_k", "2", "--curve_subset", "8", "--curve_points", "2", "--disable_tqdm", "true"]
    importlib.import_module("sst2").main([*argv, "--output_dir", str(tmp_path / "out")])
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["turnover"]["target_modules"] == ADAPTERS_LORA_MODULES
    assert 0.0 <= results["accuracy_turnover"] <= 1.0 and 0.0 <= results["accuracy_baseline_dropout"] <= 1.0
    model = TurnoverBertForSequenceClassification.from_pretrained(tmp_path / "out" / "model")
    masked = [name for name, where in turnover_layers(model).items() if where == "output"]
    assert len(masked) == 4 and all(name.endswith(".loras.sst2") for name in masked)
    assert model.get_submodule(masked[0]).lora_A.shape[0] == 4
    scores = torch.tensor(load_scores(tmp_path / "out" / "self_influence.parquet")["score"])
    assert len(scores) == 24 and torch.isfinite(scores).all() and scores.abs().max() > 0


def test_masked_heads_option_trains_and_saves_every_head(tmp_path, monkeypatch):
    """`--masked_heads 2`, in-process, on the cached frozen layer: two adapters and two masked classifiers in the
    saved model, which the pipeline loads and explains with."""
    import importlib

    from hf_turnover.model import turnover_layers
    from hf_turnover.modeling_turnover import TurnoverBertForSequenceClassification
    from hf_turnover.pipeline_turnover import InfluencePipeline

    monkeypatch.syspath_prepend(str(ROOT / "recipes"))
    backbone = make_backbone(tmp_path / "backbone")
    argv = ["--model_name_or_path", str(backbone), "--masked_heads", "2", "--adapter_top_layers", "1"]
    argv += ["--max_train_samples", "24", "--max_eval_samples", "16", "--per_device_train_batch_size", "8"]
    argv += ["--max_length", "24", "--num_explained", "1", "--top_k", "2", "--curve_subset", "8"]
    argv += ["--curve_points", "2", "--disable_tqdm", "true", "--baseline", "false"]
    importlib.import_module("sst2").main([*argv, "--output_dir", str(tmp_path / "out")])
    model = TurnoverBertForSequenceClassification.from_pretrained(tmp_path / "out" / "model")
    assert model.config.turnover_heads == ["sst2", "sst2_head1"]
    assert sorted(n for n, where in turnover_layers(model).items() if where == "input") == [
        "classifier",
        "turnover_classifiers.0",
    ]
    assert not torch.equal(model.classifier.weight, model.turnover_classifiers[0].weight)
    card = (tmp_path / "out" / "model" / "README.md").read_text()
    assert "2 masked heads" in card
    assert r"| `classifier\|turnover_classifiers\.\d+` |" in card  # the pattern's | escaped in the table
    out = InfluencePipeline(model=model)("a gorgeous , witty movie .", top_k=2)
    assert len(out["helpful"]) == 2 and all(item["score"] > 0 for item in out["helpful"])


@pytest.mark.parametrize(
    ("flags", "heads"),
    [
        ({}, 2),  # the embedded default's set-up
        ({"masked_heads": 1}, 1),
        ({"adapter_config": "lora"}, 1),
        ({"adapter_width": 0}, 1),
        ({"train_pooler": True}, 1),
        ({"paper_scale": True}, 1),
    ],
)
def test_two_masked_heads_only_on_the_default_set_up(flags, heads, monkeypatch):
    from types import SimpleNamespace

    from hf_turnover.config import TurnoverArguments
    from hf_turnover.heads import HEADS_HEAD_MODULES

    monkeypatch.syspath_prepend(str(ROOT / "recipes"))
    from sst2_model import ModelArguments, apply_presets

    model_args = ModelArguments(**{k: v for k, v in flags.items() if k != "paper_scale"})
    turnover_args = TurnoverArguments()
    recipe = SimpleNamespace(paper_scale=flags.get("paper_scale", False))
    data_args, training_args = SimpleNamespace(max_train_samples=None), SimpleNamespace(num_train_epochs=1)
    apply_presets(model_args, data_args, turnover_args, recipe, training_args)
    assert model_args.masked_heads == heads
    assert (turnover_args.turnover_head_modules == HEADS_HEAD_MODULES) == (heads > 1)


def test_masked_heads_must_be_positive(monkeypatch):
    from types import SimpleNamespace

    from hf_turnover.config import TurnoverArguments

    monkeypatch.syspath_prepend(str(ROOT / "recipes"))
    from sst2_model import ModelArguments, apply_presets

    with pytest.raises(ValueError, match="--masked_heads 0: give 1 or more"):
        apply_presets(ModelArguments(masked_heads=0), None, TurnoverArguments(), SimpleNamespace(paper_scale=False),
                      None)  # fmt: skip
