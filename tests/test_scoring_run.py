"""A resumable scoring run (hf_turnover.scoring_run) equals the single-process functions, resumes, refuses mixing."""

import json

import numpy as np
import pytest
from conftest import make_tiny_bert, make_token_dataset, make_train_and_targets

from hf_turnover import estimate_influence, mean_influence, self_influence, training_fingerprint
from hf_turnover.scoring_run import ScoringRun, load_run


@pytest.fixture(scope="module")
def setup():
    return make_tiny_bert(), *make_train_and_targets()


def _columns(scores, sort=False):
    table = scores.to_pandas()
    if sort:
        table = table.sort_values(["target_id", "train_id"], kind="stable").reset_index(drop=True)
    return {c: table[c].to_numpy() for c in table.columns}


def _assert_identical(a, b, sort=False):
    a, b = _columns(a, sort), _columns(b, sort)
    assert a.keys() == b.keys()
    for column in a:
        np.testing.assert_array_equal(a[column], b[column], err_msg=column)


# shard_size=7 cuts the ids inside the exact engine's chunks of 5 ids.
CASES = [
    ("influence", {"method": "exact", "train_batch_size": 5}, None),
    ("influence", {"method": "exact", "train_batch_size": 5}, 3),
    ("influence", {"method": "linear"}, None),
    ("influence", {"method": "linear"}, 3),
    ("self_influence", {"method": "exact"}, None),
    ("self_influence", {"method": "linear"}, None),
    ("mean_influence", {"method": "exact", "train_batch_size": 5}, None),
    ("mean_influence", {"method": "linear"}, None),
]


@pytest.mark.parametrize("kind,options,top_k", CASES)
def test_run_equals_one_process(setup, tmp_path, kind, options, top_k):
    model, train, targets = setup
    if kind == "self_influence":
        expected = self_influence(model, train, batch_size=5, progress=False, **options)
        run = ScoringRun(tmp_path, model, train, kind=kind, shard_size=7, self_batch_size=5, **options)
    else:
        function = estimate_influence if kind == "influence" else mean_influence
        expected = function(
            model, train, targets, progress=False, **options, **({"top_k": top_k} if top_k else {})
        )
        run = ScoringRun(tmp_path, model, train, targets, kind=kind, top_k=top_k, shard_size=7, **options)
    assert run.run(progress=False)
    _assert_identical(load_run(tmp_path), expected, sort=kind == "influence" and top_k is None)


def test_interrupted_run_resumes_and_a_finished_run_does_no_work(setup, tmp_path, monkeypatch):
    model, train, targets = setup
    options = {"top_k": 2, "shard_size": 5, "method": "exact", "train_batch_size": 5}
    make = lambda: ScoringRun(tmp_path, model, train, targets, **options)  # noqa: E731
    assert not make().run(progress=False, stop_after=2)  # "killed" after two of five shards
    assert len(list((tmp_path / "shards").glob("shard-*.parquet"))) == 2
    scored = []
    original = ScoringRun.score_shard
    monkeypatch.setattr(ScoringRun, "score_shard", lambda self, i: scored.append(i) or original(self, i))
    assert make().run(progress=False)
    assert scored == [2, 3, 4]
    complete = ScoringRun(
        tmp_path / "again", model, train, targets, top_k=2, shard_size=5, method="exact", train_batch_size=5
    )
    complete.run(progress=False)
    _assert_identical(load_run(tmp_path), load_run(tmp_path / "again"))
    scored.clear()
    assert make().run(progress=False) and scored == []
    assert json.loads((tmp_path / "arguments.json").read_text())["complete"]


def test_shards_of_another_model_or_training_set_are_refused(setup, tmp_path):
    _, train, targets = setup
    first = make_tiny_bert(seed=0)
    first.config.turnover_training = training_fingerprint(train)
    ScoringRun(tmp_path, first, train, targets, shard_size=8).run(progress=False, stop_after=1)
    with pytest.raises(ValueError, match="another model or training set.*model_sha256"):
        ScoringRun(tmp_path, make_tiny_bert(seed=1), train, targets, shard_size=8).run(progress=False)
    other = make_token_dataset(24, seed=3)
    same_weights = make_tiny_bert(seed=0)
    same_weights.config.turnover_training = training_fingerprint(other)
    with pytest.raises(ValueError, match="another model or training set.*training_fingerprint"):
        ScoringRun(tmp_path, same_weights, other, targets, shard_size=8).run(progress=False)
    (tmp_path / "arguments.json").unlink()  # a stray shard alone is refused too
    with pytest.raises(ValueError, match=r"shard-00000-of-00003.parquet.*another model or training set"):
        ScoringRun(tmp_path, same_weights, other, targets, shard_size=8).run(progress=False)
    with pytest.raises(ValueError, match="other arguments.*shard_size"):
        ScoringRun(tmp_path, first, train, targets, shard_size=6).run(progress=False)
