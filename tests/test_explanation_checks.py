"""The identical-class and distinct-top-k checks of explanations, and how a model card reports them."""

from __future__ import annotations

import pytest

from hf_turnover.evaluation import explanation_checks


def explanation(predicted: str, helpful: list[tuple[int, str]], id_key: str = "id") -> dict:
    return {
        "prediction": {"label": predicted, "score": 0.9},
        "helpful": [
            {id_key: i, "label": label, "score": 1.0 / (rank + 1)} for rank, (i, label) in enumerate(helpful)
        ],
        "harmful": [],
    }


def test_checks_count_identical_classes_and_distinct_instances():
    explanations = [
        explanation("pos", [(1, "pos"), (2, "neg"), (3, "pos")]),
        explanation("neg", [(1, "pos"), (4, "neg"), (5, "neg")]),  # top-1 of the other class
        explanation(
            "neg", [(6, "neg"), (2, "neg"), (1, "pos")], id_key="train_id"
        ),  # explain_prediction's key
    ]
    checks = explanation_checks(explanations)
    assert checks == {
        "num_queries": 3,
        "top_k": 3,
        "identical_class_rate": pytest.approx(2 / 3),
        "distinct_top1": 2,
        "distinct_top_k": 6,
    }
    assert explanation_checks(explanations, top_k=1)["distinct_top_k"] == 2


def test_checks_refuse_what_they_cannot_judge():
    with pytest.raises(ValueError, match="at least one explanation"):
        explanation_checks([])
    with pytest.raises(ValueError, match="empty helpful list"):
        explanation_checks([explanation("pos", [])])
    restricted = {**explanation("pos", [(1, "pos")]), "restricted": 1}
    with pytest.raises(ValueError, match="restrict_to_label=None"):
        explanation_checks([restricted])


def test_card_reports_the_checks_and_lds_rows():
    from conftest import make_tiny_bert

    from hf_turnover.card import model_card

    model = make_tiny_bert()
    checks = {"num_queries": 100, "top_k": 5, "identical_class_rate": 0.93, "distinct_top1": 71,
              "distinct_top_k": 260, "method": "linear", "queries": "the first 100 validation sentences",
              "lds": [{"setting": "MiniLM, N = 2,000", "value": 0.126, "source": "benchmarks/x.md"}]}  # fmt: skip
    text = str(model_card(model, accuracy=0.81, faithfulness=checks))
    assert "## Faithfulness" in text and "`method='linear'`" in text
    assert "| 0.93 |" in text and "| 71 of 100 |" in text and "| 260 of 500 |" in text
    assert "| MiniLM, N = 2,000 | 0.126 | benchmarks/x.md |" in text
    assert "Not measured for this model." in str(model_card(model, accuracy=0.81))


def test_default_model_card_takes_lds_rows_of_its_own_set_up_only(tmp_path):
    import json

    import adapters
    from transformers import BertConfig, BertForSequenceClassification

    from hf_turnover import add_turnover, wide_adapter_config
    from hf_turnover.card import model_card
    from hf_turnover.default_model import add_lds_to_card, lds_rows

    model = BertForSequenceClassification(
        BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2)
    )
    adapters.init(model)
    model.add_adapter("task", config=wide_adapter_config(model.config, 70, 2, lower_width=9))
    add_turnover(model)  # masks on both adapters and the classifier input
    report = {
        "arguments": {"top_layers": 2, "width": 70, "lower_width": 9, "num_subsets": 32},
        "num_train": 2000,
        "num_targets": 100,
        "methods": [{"method": "turn-over exact", "lds": -0.05, "lds_se": 0.012}],
    }
    (tmp_path / "ok.json").write_text(json.dumps(report))
    rows = lds_rows(tmp_path / "ok.json", model)
    assert rows[0]["value"] == -0.05 and "N = 2,000" in rows[0]["setting"]
    for key, value in (("width", 1536), ("masked_layers", 1)):
        other = {**report, "arguments": {**report["arguments"], key: value}}
        (tmp_path / "other.json").write_text(json.dumps(other))
        with pytest.raises(ValueError, match="would describe another set-up"):
            lds_rows(tmp_path / "other.json", model)

    from conftest import make_tiny_bert

    card = tmp_path / "README.md"
    card.write_text(str(model_card(make_tiny_bert(), accuracy=0.8)))
    add_lds_to_card(card, rows)
    text = card.read_text()
    assert "| -0.050 ± 0.012 |" in text
    assert text.index("-0.050") < text.index("## How to get influences")


def test_default_model_card_takes_frontier_points_of_its_own_set_up_with_stability(tmp_path):
    import json

    import adapters
    from conftest import make_tiny_bert
    from transformers import BertConfig, BertForSequenceClassification

    from hf_turnover import add_turnover, wide_adapter_config
    from hf_turnover.card import model_card
    from hf_turnover.default_model import add_lds_to_card, lds_rows

    model = BertForSequenceClassification(
        BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2)
    )
    adapters.init(model)
    model.add_adapter("task", config=wide_adapter_config(model.config, 70, 2, lower_width=9))
    add_turnover(model)
    rows = [
        {"method": "turn-over pooled", "models": 1, "lds": 0.21, "lds_se": 0.028, "helpful_same_class": 1.0,
         "agreement": {"mean_influence_spearman": 0.909}},
        {"method": "turn-over pooled", "models": 2, "lds": 0.22, "lds_se": 0.027, "helpful_same_class": 1.0,
         "agreement": {"mean_influence_spearman": 0.969}},
        {"method": "label match", "models": 0, "lds": 0.207, "lds_se": 0.024, "helpful_same_class": None},
    ]  # fmt: skip
    report = {
        "arguments": {"first_target": 100},
        "num_train": 8454,
        "num_targets": 200,
        "points": [
            {"point": {"width": 70, "halves": 16, "heads": 2}, "rows": [{**rows[0], "lds": -1.0}]},
            {"point": {"width": 70, "halves": 16, "heads": 1}, "rows": rows},
        ],
    }
    (tmp_path / "frontier.json").write_text(json.dumps(report))
    got = lds_rows(tmp_path / "frontier.json", model)  # the one-head point only: the model has one head
    assert [row["value"] for row in got] == [0.21, 0.22, 0.207]
    assert "2 models averaged" in got[1]["setting"] and "test sentences 100-299" in got[0]["setting"]
    card = tmp_path / "README.md"
    card.write_text(str(model_card(make_tiny_bert(), accuracy=0.8)))
    add_lds_to_card(card, got)
    text = card.read_text()
    assert "| LDS | top-1 same class | seed agreement (mean influence) |" in text
    assert "| 0.210 ± 0.028 | 1.00 | 0.909 |" in text and "| 0.207 ± 0.024 | – | – |" in text
    report["points"] = report["points"][:1]
    (tmp_path / "two_heads.json").write_text(json.dumps(report))
    with pytest.raises(ValueError, match=r"\[\(70, 2\)\], but the model has \(70, 1\)"):
        lds_rows(tmp_path / "two_heads.json", model)
