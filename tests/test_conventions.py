"""The conventions shared by the pipeline and the library: inputs, options, one output schema, one default
method, scores a user can compare, warnings on inputs the model cannot read, errors that name the fix."""

from __future__ import annotations

import inspect
import itertools
import json
import logging
import re
import subprocess
import sys

import pytest
from hub_fixtures import fresh_env, make_saved, run_fresh
from transformers.pipelines.pt_utils import KeyDataset
from transformers.utils import logging as hf_logging

from hf_turnover import (
    estimate_influence,
    explain_prediction,
    explain_predictions,
    mean_influence,
    self_influence,
)
from hf_turnover.default_model import DEFAULT_MODEL_DIR
from hf_turnover.linear import make_scorer
from hf_turnover.pipeline_turnover import InfluencePipeline
from hf_turnover.results import score_arguments
from hf_turnover.scorer import PROGRESS_CHUNKS, TurnoverScorer

TEXTS = ["w1 w2 w3", "w12 w14 w16 w2", "w5", "w7 w8", "w3 w9 w11"]
EMBEDDED = (DEFAULT_MODEL_DIR / "config.json").is_file()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("conventions")
    model, tokenizer, train = make_saved(tmp)
    return InfluencePipeline(model=model, tokenizer=tokenizer, train_dataset=train), train, tmp


def test_one_default_method_in_the_library_and_one_in_the_pipeline():
    """The library functions take "linear" (it needs nothing but the model); the pipeline, which carries its
    training set's pooled basis, takes "pooled"."""
    for function in (explain_prediction, explain_predictions, estimate_influence, make_scorer):
        assert inspect.signature(function).parameters["method"].default == "linear", function.__name__
    assert InfluencePipeline._forward.__defaults__[-1] == "pooled"


def test_mean_and_self_influence_default_to_linear(trained):
    pipe, train, _ = trained
    rows = train.map(lambda row: dict(pipe.tokenizer(row["sentence"]))).select(range(6))
    targets = [dict(pipe.tokenizer("w1 w2"), label=1)]
    for result in (self_influence(pipe.model, rows, progress=False, check_fingerprint=False),
                   mean_influence(pipe.model, rows, targets, progress=False, check_fingerprint=False)):  # fmt: skip
        assert score_arguments(result)["method"] == "linear"


def test_library_and_pipeline_share_one_schema(trained):
    pipe, train, _ = trained
    out = pipe("w1 w2 w3", top_k=4, method="linear")
    library = explain_prediction(pipe.model, train, dict(pipe.tokenizer("w1 w2 w3")), top_k=4)
    assert set(library) - {"true_label"} <= set(out)
    assert library["prediction"] == out["prediction"] and library["helpful"] == out["helpful"]
    assert library["harmful"] == out["harmful"] and library["restricted_to_label"] is None
    assert {type(item["label"]) for item in library["helpful"] + library["harmful"]} == {str}


@pytest.mark.parametrize("top_k", [None, 10**9])
def test_top_k_is_clipped_and_sign_consistent(trained, top_k):
    pipe, train, _ = trained
    for method in ("pooled", "linear", "exact"):
        out = pipe("w1 w2 w3", top_k=top_k, method=method)
        helpful, harmful = out["helpful"], out["harmful"]
        assert all(i["score"] > 0 for i in helpful) and all(i["score"] < 0 for i in harmful)
        assert not {i["train_id"] for i in helpful} & {i["train_id"] for i in harmful}
        assert helpful and harmful and len(helpful) + len(harmful) <= len(train)
    assert pipe("w1 w2 w3", top_k=3)["helpful"] == pipe("w1 w2 w3", top_k=None)["helpful"][:3]
    assert len(pipe("w1 w2 w3")["helpful"]) == 5  # not given: 5


def test_percentile_is_the_rank_among_all_scored_instances(trained):
    """Raw scores change scale from query to query; the percentile is comparable: 100 = highest, 0 = lowest."""
    pipe, train, _ = trained
    # linear: pooled scores may tie, and ties take their percentiles in order of position
    out = pipe("w12 w14 w16 w2", top_k=None, method="linear")
    target = dict(
        pipe.tokenizer("w12 w14 w16 w2"), label=pipe.model.config.label2id[out["prediction"]["label"]]
    )
    scores = sorted(estimate_influence(pipe.model, train, [target], progress=False)["score"], reverse=True)
    n = len(scores)
    for item in out["helpful"] + out["harmful"]:
        rank = min(range(n), key=lambda r: abs(scores[r] - item["score"]))
        assert item["percentile"] == pytest.approx(100 * (n - 1 - rank) / (n - 1))
    assert out["helpful"][0]["percentile"] == 100 and out["harmful"][0]["percentile"] == 0


def test_generators_key_datasets_and_datasets_are_streamed(trained):
    pipe, train, _ = trained
    expected = pipe(TEXTS, top_k=2, batch_size=2)
    read = []

    def texts():
        for text in TEXTS:
            read.append(text)
            yield text

    stream = pipe(texts(), top_k=2, batch_size=2)
    assert not isinstance(stream, list) and next(stream) == expected[0] and len(read) == 2  # one batch read
    assert [expected[0], *stream] == expected
    dataset = train.select(range(5))
    by_list = pipe(list(dataset["sentence"]), top_k=2)
    assert list(pipe(dataset["sentence"], top_k=2)) == by_list  # a lazy Column streams too
    assert list(pipe(KeyDataset(dataset, "sentence"), top_k=2)) == by_list
    assert list(pipe(dataset, top_k=2)) == by_list
    with pytest.raises(ValueError, match=r"no text column.*KeyDataset\(dataset, 'your_column'\)"):
        list(pipe(dataset.rename_column("sentence", "review"), top_k=2))
    with pytest.raises(TypeError, match="Input 1 is a int"):
        list(pipe(iter(["w1", 3]), top_k=1))


def test_truncation_is_accepted(trained):
    pipe, _, _ = trained
    long_text = " ".join(["w1 w2 w13"] * 40)
    assert pipe(long_text, top_k=1, truncation=True)["truncated"] is True
    assert pipe(long_text, top_k=1, truncation="longest_first")["truncated"] is True
    assert pipe("w1 w2", top_k=1, truncation=False)["truncated"] is False
    with pytest.raises(ValueError, match="longer than max_length=8 tokens and truncation=False"):
        pipe(long_text, top_k=1, truncation=False, max_length=8)
    with pytest.raises(ValueError, match="truncation='sometimes' is not a bool"):
        pipe("w1", truncation="sometimes")
    assert "Input longer than 32 tokens truncated to 32" in pipe(long_text, top_k=1)["warnings"][0]


def test_max_length_above_the_model_limit_names_both(trained):
    pipe, _, _ = trained
    with pytest.raises(ValueError, match=r"max_length=1000000 is more than this model reads \(32 tokens"):
        pipe("w1", max_length=10**6)


def test_mostly_unknown_or_unseen_tokens_are_flagged(trained, caplog):
    pipe, _, _ = trained
    plain = pipe("w1 w2 w3", top_k=1)
    assert plain["unknown_token_share"] == 0 and plain["unseen_token_share"] == 0 and plain["warnings"] == []
    with caplog.at_level(logging.WARNING):
        unknown = pipe("😀 🎬 🍿", top_k=1)  # every token is [UNK]
    assert unknown["unknown_token_share"] == 1 and "unknown to the tokenizer" in unknown["warnings"][0]
    assert "unknown to the tokenizer" in caplog.text
    unseen = pipe("w30 w31 w32 w1", top_k=1)  # training texts use w0..w19 only
    assert unseen["unknown_token_share"] == 0 and unseen["unseen_token_share"] == 0.75
    assert any("occur in no training text" in w for w in unseen["warnings"])


@pytest.mark.parametrize(
    ("train", "match"),
    [
        ([{"sentence": "w1", "label": 0, "instance_id": 1}], r"got a list: pass datasets.Dataset.from_list"),
        ({"sentence": ["w1"]}, r"got a dict: pass datasets.Dataset.from_dict"),
    ],
)
def test_a_training_set_that_is_no_dataset_is_named(trained, train, match):
    pipe, _, _ = trained
    target = dict(pipe.tokenizer("w1 w2"))
    with pytest.raises(TypeError, match=match):
        explain_prediction(pipe.model, train, target)
    with pytest.raises(TypeError, match=match):
        estimate_influence(pipe.model, train, [target], progress=False)
    with pytest.raises(TypeError, match=match):
        InfluencePipeline(model=pipe.model, tokenizer=pipe.tokenizer, train_dataset=train)


def test_a_text_as_target_is_named(trained):
    pipe, train, _ = trained
    with pytest.raises(TypeError, match=r"The target is a text \('a string'\).*dict\(tokenizer\(text\)\)"):
        explain_prediction(pipe.model, train, "a string")
    with pytest.raises(TypeError, match="for one target use explain_prediction"):
        explain_predictions(pipe.model, train, "a string")
    with pytest.raises(ValueError, match="none of the model's inputs"):
        explain_prediction(pipe.model, train, {"text": "w1"})


def test_batch_size_in_estimate_influence_is_the_deprecated_train_batch_size(trained):
    pipe, train, _ = trained
    target = [dict(pipe.tokenizer("w1 w2"), label=1)]
    expected = estimate_influence(
        pipe.model, train, target, method="exact", train_batch_size=5, progress=False
    )
    with pytest.warns(FutureWarning, match="now train_batch_size"):
        old = estimate_influence(pipe.model, train, target, method="exact", batch_size=5, progress=False)
    assert old["score"] == expected["score"]


def test_long_exact_runs_show_a_progress_bar(trained, capsys):
    pipe, train, _ = trained
    scorer = TurnoverScorer(pipe.model, batch_size=1)  # 24 chunks of one id
    target = dict(pipe.tokenizer("w1 w2"))
    explain_prediction(pipe.model, train, target, scorer=scorer)
    assert "Scoring training instances" in capsys.readouterr().err and len(train) >= PROGRESS_CHUNKS
    hf_logging.disable_progress_bar()
    try:
        explain_prediction(pipe.model, train, target, scorer=scorer)
        assert "Scoring training instances" not in capsys.readouterr().err
    finally:
        hf_logging.enable_progress_bar()
    explain_prediction(pipe.model, train, target, scorer=TurnoverScorer(pipe.model, batch_size=64))
    assert "Scoring training instances" not in capsys.readouterr().err  # one chunk: no bar


def _python_blocks(card: str) -> list[str]:
    section = card[card.index("## How to get influences") : card.index("## Sign convention")]
    return re.findall(r"```python\n(.*?)```", section, re.S)


@pytest.mark.skipif(not EMBEDDED, reason="the embedded default is not built")
def test_embedded_card_examples_run_and_the_default_load_prints_no_notice(tmp_path):
    """The card of the embedded default: its examples run as written, on the folder the card ships in, and
    loading the default prints no "No model was supplied, defaulted to ... (https://huggingface.co/...)"."""
    blocks = _python_blocks((DEFAULT_MODEL_DIR / "README.md").read_text(encoding="utf-8"))
    assert len(blocks) == 2
    script = "\n".join(blocks) + "\nimport json\nprint(json.dumps({'rows': len(scores)}))\n"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env=fresh_env(tmp_path / "hf_home"), cwd=tmp_path, stdin=subprocess.DEVNULL)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["rows"] == 20
    assert "No model was supplied" not in result.stderr and "huggingface.co" not in result.stderr


def test_the_notice_is_kept_for_other_default_models():
    from hf_turnover.hub import _EmbeddedDefaultNotice

    def record(model):
        message = (
            f"No model was supplied, defaulted to {model} and revision abc (https://huggingface.co/{model})."
        )
        return logging.LogRecord("transformers.pipelines", logging.WARNING, "", 0, message, None, None)

    assert not _EmbeddedDefaultNotice().filter(record(DEFAULT_MODEL_DIR))
    assert _EmbeddedDefaultNotice().filter(record("distilbert/distilbert-base-uncased"))


def test_template_card_examples_run_on_a_saved_model(trained, tmp_path):
    """The card every saved model gets: the remote-code example in a process without hf_turnover, the
    installed-code example with it, both on the folder the card was saved in."""
    _, _, tmp = trained
    folder = tmp / "model"
    remote, installed = (
        block.replace("path/to/this/model", str(folder))
        for block in _python_blocks((folder / "README.md").read_text(encoding="utf-8"))
    )
    report = "\nimport json\nprint(json.dumps({'top': explain('w1 w2')['helpful'][:1], 'n': N}))\n"
    fresh = run_fresh(remote + report.replace("N", "0"), tmp_path, fresh_env(tmp_path / "a"))
    local = run_fresh(installed + report.replace("N", "len(scores)"), tmp_path, fresh_env(tmp_path / "b"),
                      block=False)  # fmt: skip
    assert fresh["top"] and set(fresh["top"][0]) == {"train_id", "text", "label", "score", "percentile"}
    assert local["n"] == 20 and local["top"][0]["train_id"] == fresh["top"][0]["train_id"]


def test_batches_of_texts_equal_one_by_one_for_any_batch_size(trained):
    pipe, _, _ = trained
    alone = [pipe(text, top_k=2) for text in TEXTS]
    for size in (1, 3):
        together = pipe(TEXTS, top_k=2, batch_size=size)
        for a, b in itertools.zip_longest(together, alone):
            assert [i["train_id"] for i in a["helpful"]] == [i["train_id"] for i in b["helpful"]]
