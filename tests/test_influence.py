"""The scoring engine equals a slow row-by-row reference, in every fast path."""

import os

import datasets
import pytest
import torch
from conftest import make_tiny_bert, make_train_and_targets
from torch import nn

from hf_turnover import (
    TurnoverConfig,
    combine_scores,
    estimate_influence,
    load_scores,
    mean_influence,
    save_scores,
    score_arguments,
    self_influence,
    turnover_context,
)
from hf_turnover.inputs import per_row_loss
from hf_turnover.reuse import tail_entry

TOP_ONLY = TurnoverConfig(
    target_modules=r"bert\.encoder\.layer\.1\..*adapter_down", head_modules="classifier"
)


def reference_scores(model, target, ids, variant="own"):
    """Two explicit batch-1 forwards per training id."""
    model.eval()
    x = {k: torch.tensor([target[k]]) for k in ("input_ids", "attention_mask")}
    y = torch.tensor([target["labels"]])
    out = []
    with torch.no_grad():
        for i in ids:
            with turnover_context([i], "flip"):
                flip = per_row_loss(model(**x).logits, y)
            with turnover_context([i], "own" if variant == "own" else "full"):
                other = per_row_loss(model(**x).logits, y)
            out.append((flip - other).item())
    return torch.tensor(out)


def _scores(result, target_id):
    rows = result.filter(lambda r: r["target_id"] == target_id).sort("train_id")
    return torch.tensor(rows["score"])


@pytest.fixture(scope="module")
def setup():
    return make_train_and_targets()


@pytest.mark.parametrize("config", [TurnoverConfig(), TOP_ONLY], ids=["all_adapters", "top_layer"])
@pytest.mark.parametrize("variant", ["own", "full"])
def test_equals_row_by_row_reference(setup, config, variant):
    train, targets = setup
    model = make_tiny_bert(turnover=config)
    result = estimate_influence(
        model, train, targets, variant=variant, train_batch_size=5, progress=False, method="exact"
    )
    assert result.column_names == ["target_id", "train_id", "score"] and len(result) == 3 * 24
    for t in range(3):
        expected = reference_scores(model, targets[t], sorted(train["instance_id"]), variant)
        torch.testing.assert_close(_scores(result, t), expected, atol=1e-5, rtol=1e-4)


def test_batch_size_does_not_change_scores(setup):
    train, targets = setup
    model = make_tiny_bert()
    a = estimate_influence(model, train, targets, train_batch_size=1, progress=False, method="exact")
    b = estimate_influence(model, train, targets, train_batch_size=64, progress=False, method="exact")
    torch.testing.assert_close(_scores(a, 1), _scores(b, 1), atol=1e-6, rtol=1e-5)
    auto = estimate_influence(
        model, train, targets, progress=False, method="exact"
    )  # batch_size=None: sized to the input
    torch.testing.assert_close(_scores(auto, 1), _scores(b, 1), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "config, computed_positions", [(TurnoverConfig(), 8), (TOP_ONLY, 1)], ids=["all_adapters", "top_layer"]
)
def test_default_chunk_fits_the_row_position_budget(setup, config, computed_positions):
    """Masks below the last attention compute every position; masks above it only the [CLS] position."""
    from hf_turnover.scorer import ROW_POSITIONS_PER_FORWARD, TurnoverScorer

    _, targets = setup
    scorer = TurnoverScorer(make_tiny_bert(turnover=config))
    inputs = {k: torch.tensor([targets[1][k]]) for k in ("input_ids", "attention_mask")}
    assert inputs["input_ids"].shape[1] == 8
    expected = ROW_POSITIONS_PER_FORWARD["cpu"] // (2 * computed_positions)
    assert scorer.ids_per_forward(inputs) == expected
    assert TurnoverScorer(make_tiny_bert(turnover=config), batch_size=3).ids_per_forward(inputs) == 3


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 16)
        self.out = nn.Linear(16, 2)

    def forward(self, pixel_values):
        return self.out(torch.relu(self.fc(torch.relu(self.conv(pixel_values)).flatten(1))))


@pytest.mark.parametrize("targets, positions", [("conv|fc", 36), ("fc", 1)], ids=["conv", "dense"])
def test_default_chunk_counts_pixels_not_features(targets, positions):
    """Features and channels are units, not positions: only pixels (and tokens) multiply the rows."""
    from hf_turnover import add_turnover
    from hf_turnover.scorer import ROW_POSITIONS_PER_FORWARD, TurnoverScorer

    net = add_turnover(_ConvNet(), TurnoverConfig(target_modules=targets, head_modules="out"))
    scorer = TurnoverScorer(net, forward_fn=lambda m, x: m(**x))
    inputs = {"pixel_values": torch.randn(1, 1, 6, 6)}
    assert scorer.ids_per_forward(inputs) == ROW_POSITIONS_PER_FORWARD["cpu"] // (2 * positions)


@pytest.mark.parametrize("config", [TOP_ONLY, TurnoverConfig()], ids=["top_layer", "all_adapters"])
def test_position_slicing_is_used_and_equals_plain_path(setup, config):
    """After the last attention only [CLS] is computed, whether the masks start there or below it."""
    train, targets = setup
    model = make_tiny_bert(turnover=config).eval()
    x = {"input_ids": torch.tensor([targets[0]["input_ids"]])}
    assert tail_entry(model, x) == "bert.encoder.layer.1.attention.output"
    sliced = estimate_influence(model, train, targets, progress=False, method="exact")
    plain = estimate_influence(model, train, targets, positions=None, progress=False, method="exact")
    torch.testing.assert_close(_scores(sliced, 0), _scores(plain, 0), atol=1e-5, rtol=1e-4)


def test_top_k_equals_top_k_of_full_matrix(setup):
    train, targets = setup
    model = make_tiny_bert()
    full = estimate_influence(model, train, targets, progress=False, method="exact")
    top = estimate_influence(model, train, targets, top_k=3, progress=False, method="exact")
    for t in range(3):
        scores = full.filter(lambda r, t=t: r["target_id"] == t)
        order = sorted(zip(scores["score"], scores["train_id"], strict=True), reverse=True)
        expected = [i for _, i in order[:3]] + [i for _, i in order[-3:]]
        assert top.filter(lambda r, t=t: r["target_id"] == t)["train_id"] == expected
    assert score_arguments(top)["top_k"] == 3


def test_train_id_subset(setup):
    train, targets = setup
    model = make_tiny_bert()
    subset = estimate_influence(
        model, train, targets.select([0]), train_ids=[105, 101], progress=False, method="exact"
    )
    torch.testing.assert_close(
        _scores(subset, 0), reference_scores(model, targets[0], [101, 105]), atol=1e-5, rtol=1e-4
    )


def test_self_influence_equals_estimate_on_itself(setup):
    train, _ = setup
    model = make_tiny_bert()
    own = self_influence(model, train, batch_size=7, progress=False, method="exact")
    assert own["train_id"] == train["instance_id"]
    for row in (0, 9, 23):
        single = estimate_influence(
            model,
            train,
            train.select([row]),
            train_ids=[train[row]["instance_id"]],
            progress=False,
            method="exact",
        )
        assert single["score"][0] == pytest.approx(own["score"][row], abs=1e-5)


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_formatted_datasets_score_like_plain_ones(setup, kind):
    """A torch- or numpy-formatted training set returns its ids as tensors/arrays; scores must not change."""
    train, targets = setup
    model = make_tiny_bert()
    formatted = train.with_format(kind)
    plain = estimate_influence(model, train, targets, progress=False, method="exact")
    assert (
        estimate_influence(model, formatted, targets.with_format(kind), progress=False, method="exact")[
            "score"
        ]
        == (plain["score"])
    )
    assert (
        self_influence(model, formatted, progress=False, method="exact")["score"]
        == self_influence(model, train, progress=False, method="exact")["score"]
    )
    assert formatted.format["type"] == kind  # the caller's dataset keeps its format


def test_self_influence_pads_rows_of_different_lengths():
    model = make_tiny_bert()
    train = datasets.Dataset.from_dict(
        {"input_ids": [[5, 6, 7], [8, 9, 10, 11, 12]], "labels": [0, 1], "instance_id": [0, 1]}
    )
    padded = self_influence(model, train, batch_size=2, progress=False, method="exact")["score"]
    alone = [
        self_influence(model, train.select([i]), batch_size=1, progress=False, method="exact")["score"][0]
        for i in (0, 1)
    ]
    assert padded == pytest.approx(alone, abs=1e-5)


def test_mean_influence_is_mean_over_targets(setup):
    train, targets = setup
    model = make_tiny_bert()
    full = estimate_influence(model, train, targets, progress=False, method="exact")
    mean = mean_influence(model, train, targets, progress=False, method="exact")
    expected = torch.stack([_scores(full, t) for t in range(3)]).mean(0)
    torch.testing.assert_close(torch.tensor(mean["score"]), expected, atol=1e-6, rtol=1e-5)
    assert score_arguments(mean)["num_targets"] == 3


def test_unlabelled_targets_explain_the_predicted_label(setup, caplog):
    train, targets = setup
    model = make_tiny_bert().eval()
    with torch.no_grad():
        predicted = model(input_ids=torch.tensor([targets[1]["input_ids"]])).logits.argmax(-1).item()
    unlabelled = estimate_influence(
        model, train, targets.select([1]).remove_columns("labels"), progress=False, method="exact"
    )
    labelled = estimate_influence(
        model, train, targets.select([1]).map(lambda r: {"labels": predicted}), progress=False, method="exact"
    )
    assert unlabelled["score"] == labelled["score"]


def test_save_load_and_combine(tmp_path, setup):
    train, targets = setup
    model = make_tiny_bert()
    a = estimate_influence(model, train, targets.select([0]), progress=False, method="exact")
    b = estimate_influence(model, train, targets.select([1]), progress=False, method="exact")
    path = save_scores(a, tmp_path / "a.parquet")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as a plain open() would, not the temp file's 0600
    loaded = load_scores(path)
    assert loaded["score"] == a["score"] and score_arguments(loaded) == score_arguments(a)
    assert len(combine_scores([loaded, b])) == len(a) + len(b)
    other = estimate_influence(
        model, train, targets.select([1]), variant="full", progress=False, method="exact"
    )
    with pytest.raises(ValueError, match=r"different arguments.*\['variant'\]"):
        combine_scores([a, other])


def test_saving_a_filtered_or_sorted_result_keeps_only_its_rows(tmp_path, setup):
    from hf_turnover.evaluation import score_matrix

    train, targets = setup
    both = estimate_influence(make_tiny_bert(), train, targets.select([0, 1]), progress=False, method="exact")
    kept = both.filter(lambda r: r["target_id"] == 1).sort("score")
    loaded = load_scores(save_scores(kept, tmp_path / "kept.parquet"))
    assert loaded["score"] == kept["score"] and set(loaded["target_id"]) == {1}
    matrix, rows, _ = score_matrix(kept)
    assert rows.tolist() == [1] and matrix.shape == (1, len(train))


def test_bfloat16_autocast_scores_close_to_float32(setup):
    train, targets = setup
    model = make_tiny_bert()
    f32 = estimate_influence(model, train, targets.select([0]), progress=False, method="exact")
    bf16 = estimate_influence(
        model, train, targets.select([0]), dtype=torch.bfloat16, progress=False, method="exact"
    )
    assert torch.corrcoef(torch.tensor([f32["score"], bf16["score"]]))[0, 1] > 0.95


def test_errors(setup):
    train, targets = setup
    model = make_tiny_bert()
    with pytest.raises(ValueError, match="training set is empty"):
        estimate_influence(model, train.select([]), targets, progress=False, method="exact")
    with pytest.raises(ValueError, match="has no turn-over layers"):
        estimate_influence(make_tiny_bert(turnover=False), train, targets, progress=False, method="exact")
    with pytest.raises(ValueError, match="variant='both' is unknown"):
        estimate_influence(model, train, targets, variant="both", progress=False, method="exact")
    with pytest.raises(ValueError, match="train_dataset has no 'instance_id' column"):
        estimate_influence(
            model, train.remove_columns("instance_id"), targets, progress=False, method="exact"
        )


def test_trainer_records_fingerprint_and_scoring_refuses_another_set(tmp_path, setup):
    from conftest import tiny_training_args

    from hf_turnover import TurnoverTrainer

    train, targets = setup
    model = make_tiny_bert()
    TurnoverTrainer(model, tiny_training_args(tmp_path), train_dataset=train).train()
    assert model.config.turnover_training["num_instances"] == 24
    estimate_influence(
        model, train.shuffle(seed=0), targets.select([0]), progress=False, method="exact"
    )  # order does not matter
    changed = train.map(lambda r: {"labels": 1 - r["labels"]} if r["instance_id"] == 103 else {})
    with pytest.raises(ValueError, match="is not the one the model was trained on"):
        estimate_influence(model, changed, targets, progress=False, method="exact")
    with pytest.raises(ValueError, match="is not the one the model was trained on"):
        self_influence(model, train.select(range(23)), progress=False, method="exact")


def test_adapters_attention_copies_are_skipped_only_while_scoring(setup):
    import adapters.models.bert.modeling_bert as adapters_bert
    from adapters.composition import match_attn_matrices_for_parallel as original

    from hf_turnover.reuse import without_identity_repeats

    q, k, v = torch.randn(2, 4, 3, 8), torch.randn(2, 4, 3, 8), torch.randn(1, 4, 3, 8)
    with without_identity_repeats(make_tiny_bert()):
        assert adapters_bert.match_attn_matrices_for_parallel is not original
        same = adapters_bert.match_attn_matrices_for_parallel(q, k, v[:1].expand(2, -1, -1, -1))
        assert same[0] is q and same[1] is k  # no copy when the batch sizes match
        repeated = adapters_bert.match_attn_matrices_for_parallel(q, k, v)  # a Parallel split: as before
        assert all(torch.equal(a, b) for a, b in zip(repeated, original(q, k, v), strict=True))
    assert adapters_bert.match_attn_matrices_for_parallel is original
    train, targets = setup
    estimate_influence(make_tiny_bert(), train, targets.select([0]), progress=False, method="exact")
    assert adapters_bert.match_attn_matrices_for_parallel is original


def test_self_influence_runs_the_unmasked_prefix_once_per_batch(setup):
    """The own forward records the layers below the first masked one; the flipped forward replays them
    (the first batch also recomputes once, to check the replay)."""
    train, _ = setup
    model = make_tiny_bert(turnover=TOP_ONLY)
    calls = []  # layer 0 is below the masks; a module inside it is not replayed itself when it has a hook
    model.bert.encoder.layer[0].intermediate.dense.register_forward_hook(lambda *a: calls.append(1))
    scores = self_influence(model, train, batch_size=8, progress=False, method="exact")
    assert len(calls) == 1 + 3 + 1  # the probe of the model's order, three batches of 8 rows, one check
    calls.clear()
    self_influence(model, train, batch_size=8, progress=False, reuse_prefix=False, method="exact")
    assert len(calls) == 1 + 3 * 2
    for row in (0, 13):
        single = estimate_influence(
            model,
            train,
            train.select([row]),
            train_ids=[train[row]["instance_id"]],
            progress=False,
            method="exact",
        )
        assert single["score"][0] == pytest.approx(scores["score"][row], abs=1e-5)


def test_prefix_with_side_effects_is_recomputed_and_says_so(setup, caplog):
    class Drifting(nn.Module):  # a different output on every call: replaying it would change the scores
        def __init__(self, inner):
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, *args, **kwargs):
            self.calls += 1
            out = self.inner(*args, **kwargs)
            return out + torch.sin(out * self.calls)

    train, _ = setup
    model = make_tiny_bert()
    model.bert.embeddings = Drifting(model.bert.embeddings)
    with caplog.at_level("WARNING"):
        self_influence(model, train, batch_size=8, progress=False, method="exact")
    assert "replaying the layers below the first masked one changed the scores" in caplog.text
    # the probe, the first batch's own forward and its check, then two full forwards for each later batch
    assert model.bert.embeddings.calls == 1 + 2 + 2 * 2


def test_all_zero_scores_warn_that_the_masks_were_not_reached(setup, caplog, monkeypatch):
    """E.g. a remote-code copy of the layers that reads another state: scoring must not stay silent."""
    import hf_turnover.layer

    train, targets = setup
    model = make_tiny_bert()
    monkeypatch.setattr(hf_turnover.layer, "current_state", lambda: None)  # the hooks see no ids
    with caplog.at_level("WARNING"):
        scores = estimate_influence(model, train, targets.select([0]), progress=False, method="exact")
    assert not any(scores["score"])
    assert "Every influence score is exactly 0" in caplog.text


def test_custom_forward_fn_is_used_for_the_probes_too(setup):
    """The probes run the model the way scoring does: through forward_fn."""
    from hf_turnover.scorer import TurnoverScorer

    train, targets = setup
    model = make_tiny_bert()
    x = torch.tensor([targets[1]["input_ids"]])
    labels, ids = torch.tensor([targets[1]["labels"]]), torch.tensor(train["instance_id"])
    plain = TurnoverScorer(model).score({"input_ids": x}, labels, ids)
    custom = TurnoverScorer(model, forward_fn=lambda m, inputs: m(input_ids=inputs["tokens"]))
    torch.testing.assert_close(custom.score({"tokens": x}, labels, ids), plain)
