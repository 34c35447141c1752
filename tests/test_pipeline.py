"""InfluencePipeline ("turnover-influence"): outputs, options, bad input, the training set it refuses."""

from __future__ import annotations

import json
import logging
import shutil

import datasets
import pytest
from hub_fixtures import fresh_env, make_model, make_saved, run_fresh
from transformers import pipeline

from hf_turnover import estimate_influence
from hf_turnover.default_model import DEFAULT_MODEL_DIR
from hf_turnover.hub import register_with_transformers
from hf_turnover.modeling_turnover import TurnoverBertForSequenceClassification
from hf_turnover.pipeline_turnover import TASK, InfluencePipeline

FRESH_PIPELINE = """
import json, sys
from transformers import pipeline
explain = pipeline(model=sys.argv[1], trust_remote_code=True)
print(json.dumps([explain("w1 w2 w3", top_k=3, method="exact"),
                  explain(["w12 w14", "w5 w6"], top_k=2, restrict_to_label=True, method="exact"),
                  explain("w1 w2 w3", top_k=3)]))
"""


def assert_close(a, b, tol=1e-6):
    """Nested outputs equal, floats within ``tol`` (different batch sizes sum in a different order)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_close(a[key], b[key], tol)
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_close(x, y, tol)
    elif isinstance(a, float):
        assert abs(a - b) <= tol, (a, b)
    else:
        assert a == b


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    model, tokenizer, train = make_saved(tmp)
    pipe = InfluencePipeline(model=model, tokenizer=tokenizer, train_dataset=train)
    return pipe, train, tmp


def test_output_holds_prediction_and_ranked_instances(trained):
    pipe, train, _ = trained
    out = pipe("w1 w2 w3 w4", top_k=3)
    assert set(out) == {
        "prediction", "helpful", "harmful", "truncated", "restricted_to_label", "warnings", "unknown_token_share",
        "unseen_token_share",
    }  # fmt: skip
    assert out["prediction"]["label"] in ("negative", "positive") and 0.5 <= out["prediction"]["score"] <= 1
    assert len(out["helpful"]) == len(out["harmful"]) == 3 and out["truncated"] is False
    helpful = [item["score"] for item in out["helpful"]]
    harmful = [item["score"] for item in out["harmful"]]
    assert helpful == sorted(helpful, reverse=True) and harmful == sorted(harmful) and helpful[0] > harmful[0]
    by_id = {row["instance_id"]: row for row in train}
    for item in out["helpful"] + out["harmful"]:
        assert set(item) == {"train_id", "text", "label", "score", "percentile"}
        assert item["text"] == by_id[item["train_id"]]["sentence"]
        assert item["label"] == pipe.model.config.id2label[by_id[item["train_id"]]["label"]]


def test_scores_are_the_engine_scores_for_the_predicted_label(trained):
    pipe, train, _ = trained
    out = pipe("w1 w2 w3 w4", top_k=None, method="exact")  # every training instance, ranked
    target = dict(pipe.tokenizer("w1 w2 w3 w4"), label=pipe.model.config.label2id[out["prediction"]["label"]])
    engine = estimate_influence(pipe.model, train, [target], method="exact", progress=False)
    expected = dict(zip(engine["train_id"], engine["score"], strict=True))
    listed = {i["train_id"]: i["score"] for i in out["helpful"] + out["harmful"]}
    assert listed == pytest.approx({k: v for k, v in expected.items() if v != 0}, abs=1e-6)


def test_pooled_is_the_default_method(trained):
    pipe, _, _ = trained
    assert pipe("w1 w2 w3", top_k=4) == pipe("w1 w2 w3", top_k=4, method="pooled")
    assert pipe("w1 w2 w3", top_k=4) != pipe("w1 w2 w3", top_k=4, method="linear")


def test_linear_method_scores_are_the_engine_linear_scores(trained):
    pipe, train, _ = trained
    out = pipe("w1 w2 w3", top_k=100, method="linear")
    label = pipe.model.config.label2id[out["prediction"]["label"]]
    target = {**dict(pipe.tokenizer("w1 w2 w3")), "label": label}
    engine = estimate_influence(pipe.model, train, [target], method="linear", progress=False)
    expected = dict(zip(engine["train_id"], engine["score"], strict=True))
    assert {item["train_id"]: item["score"] for item in out["helpful"]} == pytest.approx(
        {item["train_id"]: expected[item["train_id"]] for item in out["helpful"]}, rel=1e-5, abs=1e-7
    )
    assert out["helpful"][0]["score"] == pytest.approx(max(expected.values()), rel=1e-5)


def test_list_input_equals_one_by_one(trained):
    pipe, _, _ = trained
    texts = ["w1 w2", "w13 w15 w16", "w3"]
    assert pipe(texts, top_k=2, method="exact") == [pipe(text, top_k=2, method="exact") for text in texts]


@pytest.mark.parametrize("label", [True, "negative", "positive", 0, 1])
def test_restrict_to_label(trained, label):
    pipe, _, _ = trained
    out = pipe("w12 w14 w1", top_k=4, restrict_to_label=label)
    expected = out["prediction"]["label"] if label is True else pipe.model.config.id2label.get(label, label)
    assert out["restricted_to_label"] == expected
    assert {item["label"] for item in out["helpful"] + out["harmful"]} == {expected}


def test_train_batch_size_does_not_change_scores(trained):
    pipe, _, _ = trained
    small = pipe("w1 w9 w12", top_k=5, train_batch_size=3, method="exact")
    assert_close(small, pipe("w1 w9 w12", top_k=5, train_batch_size=64, method="exact"))
    with pytest.raises(ValueError, match="train_batch_size must be a positive int"):
        pipe("w1", train_batch_size=0)


@pytest.mark.parametrize("method", ["linear", "exact"])
def test_batch_size_counts_texts_per_batch(trained, method, monkeypatch):
    """batch_size is the transformers one: texts per batch (the linear methods run one pass per batch)."""
    pipe, _, _ = trained
    texts = ["w1 w2", "w13 w15 w16", "w3", "w4 w5", "w6"]
    alone = [pipe(text, top_k=2, method=method) for text in texts]
    scorer = pipe._scorer("linear", None)
    passes = []
    original = scorer.logits_and_gradients
    monkeypatch.setattr(scorer, "logits_and_gradients", lambda *a, **k: passes.append(1) or original(*a, **k))
    assert_close(pipe(texts, top_k=2, method=method, batch_size=2), alone, tol=1e-5)
    assert len(passes) == (3 if method == "linear" else 0)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        pipe("w1", batch_size=0)


@pytest.mark.parametrize(
    ("inputs", "error", "match"),
    [
        ("", ValueError, "Input 0 is an empty string"),
        (["w1", "   "], ValueError, "Input 1 is an empty string"),
        (42, TypeError, "takes a text or a list of texts, got int"),
        (None, TypeError, "got NoneType"),
        ({"text": "w1"}, TypeError, "got dict"),
        (["w1", 3.5], TypeError, "Input 1 is a float"),
        ([b"w1"], TypeError, "Input 0 is a bytes"),
    ],
)
def test_bad_inputs_are_named(trained, inputs, error, match):
    pipe, _, _ = trained
    with pytest.raises(error, match=match):
        pipe(inputs)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"top_k": 0}, "top_k must be a positive int"),
        ({"top_k": 2.5}, "top_k must be a positive int"),
        ({"restrict_to_label": "neutral"}, "restrict_to_label='neutral' is not True"),
        ({"restrict_to_label": 7}, "restrict_to_label=7 is not a label id"),
        ({"method": "fast"}, "method='fast' is unknown; use 'exact'"),
    ],
)
def test_bad_options_are_named(trained, options, match):
    pipe, _, _ = trained
    with pytest.raises(ValueError, match=match):
        pipe("w1", **options)
    with pytest.raises(TypeError, match="Unknown option"):
        pipe("w1", topk=3)


def test_long_text_is_truncated_and_says_so(trained, caplog):
    pipe, _, _ = trained
    long_text = " ".join(["w1 w2 w13"] * 40)  # 120 words > 32 positions
    with caplog.at_level(logging.WARNING):
        out = pipe(long_text, top_k=1)
    assert out["truncated"] is True and "truncated to 32" in caplog.text
    assert pipe(long_text, top_k=1, max_length=8)["truncated"] is True
    assert pipe("w1 w2", top_k=1, max_length=8)["truncated"] is False


def test_training_set_travels_and_a_changed_one_is_refused(trained, tmp_path):
    pipe, train, tmp = trained
    loaded = InfluencePipeline(
        model=TurnoverBertForSequenceClassification.from_pretrained(tmp / "model"), tokenizer=pipe.tokenizer
    )
    assert loaded("w1 w2", top_k=2, method="exact") == pipe("w1 w2", top_k=2, method="exact")
    flipped = train.map(
        lambda row, i: {"label": 1 - row["label"] if i == 3 else row["label"]}, with_indices=True
    )
    with pytest.raises(ValueError, match="Refusing train_dataset: its fingerprint"):
        InfluencePipeline(model=pipe.model, tokenizer=pipe.tokenizer, train_dataset=flipped)
    shutil.copytree(tmp / "model", tmp_path / "changed")
    flipped.to_parquet(str(tmp_path / "changed" / "training_set.parquet"))
    model = TurnoverBertForSequenceClassification.from_pretrained(tmp_path / "changed")
    with pytest.raises(ValueError, match="Refusing the training set of .*changed: its fingerprint"):
        InfluencePipeline(model=model, tokenizer=pipe.tokenizer)
    (tmp_path / "changed" / "training_set.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="training_set.parquet, which is missing"):
        InfluencePipeline(model=model, tokenizer=pipe.tokenizer)
    (tmp_path / "changed" / "training_set.json").unlink()
    with pytest.raises(FileNotFoundError, match="No training set travels with the model"):
        InfluencePipeline(model=model, tokenizer=pipe.tokenizer)
    assert InfluencePipeline(model=model, tokenizer=pipe.tokenizer, train_dataset=train)("w1", top_k=1)


def test_in_memory_model_needs_its_training_set(trained):
    pipe, _, _ = trained
    with pytest.raises(ValueError, match="pass the exact training set"):
        InfluencePipeline(model=make_model(), tokenizer=pipe.tokenizer)
    with pytest.raises(ValueError, match="carries no set-up for them"):
        TurnoverBertForSequenceClassification(pipe.model.config)


def test_registered_task_and_installed_pipeline_class(trained):
    pipe, _, tmp = trained
    register_with_transformers()
    explain = pipeline(TASK, model=str(tmp / "model"), pipeline_class=InfluencePipeline)
    assert explain("w1 w2", top_k=2, method="exact") == pipe("w1 w2", top_k=2, method="exact")
    with pytest.raises(
        ValueError, match="trust_remote_code=True"
    ):  # the saved pipeline code is never run silently
        pipeline(TASK, model=str(tmp / "model"))


def test_saved_pipeline_runs_in_a_fresh_process_without_hf_turnover(trained, tmp_path):
    pipe, _, _ = trained
    pipe.save_pretrained(tmp_path / "pipe")
    assert (tmp_path / "pipe" / "pipeline_turnover.py").is_file()
    fresh = run_fresh(FRESH_PIPELINE, tmp_path, fresh_env(tmp_path / "hf_home"), str(tmp_path / "pipe"))
    expected = [
        pipe("w1 w2 w3", top_k=3, method="exact"),
        pipe(["w12 w14", "w5 w6"], top_k=2, restrict_to_label=True, method="exact"),
        pipe("w1 w2 w3", top_k=3, method="pooled"),  # the default
    ]
    assert fresh[:2] == json.loads(json.dumps(expected[:2]))  # bit-identical floats survive JSON round trips
    # The pooled scores' backward reductions are split by thread count: equal to float rounding.
    assert_close(fresh[2], json.loads(json.dumps(expected[2])))


def test_pipeline_from_saved_training_set_dataset_type(trained):
    _, train, tmp = trained
    from hf_turnover.training_set import load_training_set

    loaded = load_training_set(tmp / "model", None)
    assert isinstance(loaded, datasets.Dataset)
    assert loaded.to_dict() == train.select_columns(loaded.column_names).to_dict()


@pytest.mark.skipif(
    not (DEFAULT_MODEL_DIR / "config.json").is_file(), reason="the embedded default is not built"
)
def test_default_pipeline_works_offline_on_the_installed_backbone():
    from safetensors import safe_open

    with safe_open(str(DEFAULT_MODEL_DIR / "model.safetensors"), "pt") as weights:
        names = list(weights.keys())
    assert names and all(
        ".adapters." in n or n.startswith(("classifier.", "turnover_classifiers.", "bert.pooler."))
        for n in names
    )
    assert (DEFAULT_MODEL_DIR / "model.safetensors").stat().st_size < 20_000_000  # no backbone copy (91 MB)
    register_with_transformers()
    explain = pipeline(TASK)  # no model: the embedded default, offline
    out = explain("A gorgeous, witty, seductive movie.", top_k=2, restrict_to_label=True)
    assert out["prediction"]["label"] in ("negative", "positive")
    assert {i["label"] for i in out["helpful"] + out["harmful"]} == {out["prediction"]["label"]}
    assert {i["train_id"] for i in out["helpful"]} <= set(explain.train_dataset["instance_id"])


def test_each_input_is_tokenized_once(trained, monkeypatch):
    pipe, _, _ = trained
    calls = []
    original = type(pipe.tokenizer).__call__
    monkeypatch.setattr(
        type(pipe.tokenizer), "__call__", lambda self, *a, **k: calls.append(a) or original(self, *a, **k)
    )
    long_text = " ".join(["w1 w2 w13"] * 40)
    outputs = pipe(["w1 w2 w3", long_text], top_k=1)
    assert len(calls) == 2 and [o["truncated"] for o in outputs] == [False, True]


@pytest.mark.parametrize("restrict", [None, True])
def test_linear_list_is_batched_and_equals_one_by_one(trained, restrict, monkeypatch):
    """A list with method="linear" shares one forward and backward pass per padded batch; the explanations
    equal those of the texts one by one (to float rounding: padding changes the summation order)."""
    pipe, _, _ = trained
    texts = ["w1 w2 w3", "w12 w14 w16 w2 w7 w7", "w5"]
    alone = [pipe(text, top_k=3, method="linear", restrict_to_label=restrict) for text in texts]
    scorer = pipe._scorer("linear", None)
    passes = []
    original = scorer.logits_and_gradients
    monkeypatch.setattr(scorer, "logits_and_gradients", lambda *a, **k: passes.append(1) or original(*a, **k))
    together = pipe(texts, top_k=3, method="linear", restrict_to_label=restrict)
    assert len(passes) == 1
    assert_close(together, alone, tol=1e-5)


def test_linear_scorer_and_its_mask_table_are_shared_across_batch_sizes(trained):
    pipe, _, _ = trained
    assert pipe._scorer("linear", 8) is pipe._scorer("linear", None)
    assert pipe._scorer("exact", 8) is not pipe._scorer("exact", None)


def test_centered_scores_are_the_engine_centered_scores(trained):
    pipe, train, _ = trained
    out = pipe("w1 w2 w3", top_k=100, method="centered")
    label = pipe.model.config.label2id[out["prediction"]["label"]]
    target = {**dict(pipe.tokenizer("w1 w2 w3")), "label": label}
    engine = estimate_influence(pipe.model, train, [target], method="centered",
                                reference=pipe.centered_reference(), progress=False)  # fmt: skip
    expected = dict(zip(engine["train_id"], engine["score"], strict=True))
    assert {item["train_id"]: item["score"] for item in out["helpful"]} == pytest.approx(
        {item["train_id"]: expected[item["train_id"]] for item in out["helpful"]}, rel=1e-5, abs=1e-7
    )
    linear = pipe("w1 w2 w3", top_k=100, method="linear")
    assert [i["score"] for i in out["helpful"]] != [i["score"] for i in linear["helpful"]]


def test_centered_reference_is_saved_and_read_back_not_recomputed(trained, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import hf_turnover.pipeline_turnover as module
    from hf_turnover.explain import REFERENCE_FILE

    pipe, _, _ = trained
    pipe.save_pretrained(tmp_path / "pipe")
    saved = load_file(tmp_path / "pipe" / REFERENCE_FILE)
    assert saved.keys() == pipe.centered_reference().keys()
    monkeypatch.setattr(module, "training_reference", lambda *a, **k: pytest.fail("recomputed"))
    loaded = InfluencePipeline(
        model=TurnoverBertForSequenceClassification.from_pretrained(tmp_path / "pipe"),
        tokenizer=pipe.tokenizer,
    )
    assert_close(loaded("w1 w2", top_k=3, method="centered"), pipe("w1 w2", top_k=3, method="centered"))


def test_centered_list_is_batched_and_equals_one_by_one(trained):
    pipe, _, _ = trained
    texts = ["w1 w2 w3", "w12 w14 w16 w2 w7 w7", "w5"]
    alone = [pipe(text, top_k=3, method="centered") for text in texts]
    assert_close(pipe(texts, top_k=3, method="centered"), alone, tol=1e-5)
