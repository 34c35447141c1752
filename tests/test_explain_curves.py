"""Explanations, learning curves and figures."""

import pytest
import torch
from conftest import make_tiny_bert, make_token_dataset, tiny_training_args

from hf_turnover import (
    LearningCurveCallback,
    TurnoverTrainer,
    estimate_influence,
    explain_prediction,
    plot_learning_curves,
    plot_self_influence,
    self_influence,
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    train = make_token_dataset(20, seed=3).map(lambda r, i: {"sentence": f"sentence {i}"}, with_indices=True)
    model = make_tiny_bert()
    callback = LearningCurveCallback(
        train.select(range(8)), eval_dataset=make_token_dataset(6), every_n_steps=2
    )
    args = tiny_training_args(tmp_path_factory.mktemp("run"), num_train_epochs=2)
    trainer = TurnoverTrainer(model, args, train_dataset=train, callbacks=[callback])
    trainer.train()
    return model, train, trainer


def test_explanation_ranks_by_influence_on_the_predicted_label(trained):
    model, train, _ = trained
    names = model.config.id2label
    target = {k: v for k, v in make_token_dataset(1, seed=9)[0].items() if k != "instance_id"}
    out = explain_prediction(model, train, target, top_k=3, method="exact")
    with torch.no_grad():
        predicted = model(input_ids=torch.tensor([target["input_ids"]])).logits.argmax(-1).item()
    assert out["prediction"]["label"] == names[predicted]  # label names, as the pipeline gives them
    assert 0.5 <= out["prediction"]["score"] <= 1 and out["true_label"] == names[target["labels"]]
    # The same ranking estimate_influence gives for the predicted label: positives helped, negatives hurt.
    full = estimate_influence(model, train, [{**target, "labels": predicted}], method="exact", progress=False)
    ranked = list(zip(full["train_id"], full["score"], strict=True))
    assert [h["train_id"] for h in out["helpful"]] == [i for i, s in ranked if s > 0][:3]
    assert [h["train_id"] for h in out["harmful"]] == [i for i, s in ranked[::-1] if s < 0][:3]
    by_id = {row["instance_id"]: row for row in train}
    for item in out["helpful"] + out["harmful"]:
        assert set(item) == {"train_id", "text", "label", "score", "percentile"}
        row = by_id[item["train_id"]]
        assert item["text"] == row["sentence"] and item["label"] == names[row["labels"]]
    assert out["helpful"][0]["percentile"] == 100.0 and out["harmful"][0]["percentile"] == 0.0
    assert out["helpful"][0]["score"] >= out["helpful"][-1]["score"] > 0 > out["harmful"][-1]["score"]


def test_explanation_restricted_to_the_error_label(trained):
    model, train, _ = trained
    target = {k: v for k, v in make_token_dataset(1, seed=9)[0].items() if k != "instance_id"}
    out = explain_prediction(model, train, target, top_k=None, restrict_to_label=True)
    labels = {h["label"] for h in out["helpful"] + out["harmful"]}
    assert labels == {out["prediction"]["label"]} == {out["restricted_to_label"]}
    carrying = sum(model.config.id2label[y] == out["prediction"]["label"] for y in train["labels"])
    assert len(out["helpful"]) + len(out["harmful"]) == carrying  # top_k=None: every nonzero score
    with pytest.raises(ValueError, match="No training instance carries label 7"):
        explain_prediction(model, train, target, restrict_to_label=7)


def test_one_scorer_serves_many_explanations(trained):
    from hf_turnover.scorer import TurnoverScorer

    model, train, _ = trained
    scorer = TurnoverScorer(model, batch_size=4)  # several chunks: the prefix replay is checked once
    for seed in (9, 10, 11):
        target = {k: v for k, v in make_token_dataset(1, seed=seed)[0].items() if k != "instance_id"}
        shared = explain_prediction(model, train, target, top_k=3, scorer=scorer)
        assert shared == explain_prediction(model, train, target, top_k=3, method="exact", train_batch_size=4)
    with pytest.raises(ValueError, match="either scorer="):
        explain_prediction(model, train, target, scorer=scorer, train_batch_size=8)
    with pytest.raises(TypeError, match="train_batch_size="):  # batch_size counts inputs, never training ids
        explain_prediction(model, train, target, method="exact", batch_size=8)


def test_learning_curves_are_logged_and_plotted(trained, tmp_path):
    _, _, trainer = trained
    entries = [e for e in trainer.state.log_history if "turnover_own_loss" in e]
    assert [e["step"] for e in entries] == [2, 4, 6, 8, 10]
    for e in entries:
        assert e["turnover_own_loss"] > 0 and e["turnover_flip_loss"] > 0 and e["turnover_eval_loss"] > 0
    # Training lowers the own-mask loss of the instances it trained on more than their flipped-mask loss.
    first, last = entries[0], entries[-1]
    assert (
        last["turnover_own_loss"] - first["turnover_own_loss"]
        < last["turnover_flip_loss"] - first["turnover_flip_loss"]
    )
    png = plot_learning_curves(trainer.state.log_history, tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_self_influence_histogram(trained, tmp_path):
    model, train, _ = trained
    scores = self_influence(model, train, method="exact", progress=False)
    png = plot_self_influence(scores, tmp_path / "hist.png")
    assert png.stat().st_size > 1000 and png.read_bytes().startswith(b"\x89PNG")
    svg = plot_self_influence(scores, tmp_path / "hist.svg")  # the format follows the file name
    assert b"<svg" in svg.read_bytes()[:1000]
    # Trained instances are fitted better by their own sub-network: positive mean self-influence.
    assert sum(scores["score"]) / len(scores) > 0


def test_learning_curve_losses_read_torch_formatted_rows_of_uneven_length():
    from hf_turnover.curves import _mean_loss
    from hf_turnover.scorer import TurnoverScorer

    model = make_tiny_bert().eval()
    rows = make_token_dataset(6, seed=4).map(
        lambda r, i: {"input_ids": r["input_ids"][: 3 + i], "attention_mask": r["attention_mask"][: 3 + i]},
        with_indices=True,
    )
    scorer = TurnoverScorer(model)
    plain = _mean_loss(scorer, rows, "instance_id", "own", 4)
    assert _mean_loss(scorer, rows.with_format("torch"), "instance_id", "own", 4) == pytest.approx(plain)
