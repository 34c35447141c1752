"""The bundled offline data and metric: shapes, labels, ids and the review-level Amazon split."""

import json

import numpy as np
import pytest

from hf_turnover.data import BUNDLED_DATASETS, load_bundled_dataset, load_metric, load_text_classification

COLUMNS = ["instance_id", "sentence", "label", "score", "source_id"]
SPLITS = {"rotten_tomatoes": ["train", "validation", "test"], "amazon_electronics": ["validation", "test"]}


@pytest.fixture(scope="module", params=BUNDLED_DATASETS)
def bundled(request):
    return request.param, load_bundled_dataset(request.param)


def test_splits_and_columns(bundled):
    name, data = bundled
    assert list(data) == SPLITS[name]
    extra = ["review_id"] if name == "amazon_electronics" else []
    for split in data.values():
        assert split.column_names == COLUMNS + extra
        assert split.num_rows > 0
        assert split.features["label"].names == ["negative", "positive"]


def test_labels_agree_with_scores_and_ids_are_row_indices(bundled):
    _, data = bundled
    for split in data.values():
        table = split.to_pandas()
        assert set(table["label"]) == {0, 1}
        assert ((table["score"] > 0) == (table["label"] == 1)).all() and (table["score"] != 0).all()
        assert table["instance_id"].tolist() == list(range(len(table)))
        assert table["source_id"].is_unique


def test_splits_are_disjoint(bundled):
    _, data = bundled
    source_ids = [set(split["source_id"]) for split in data.values()]
    assert sum(map(len, source_ids)) == len(set().union(*source_ids))


def test_amazon_is_split_by_review():
    data = load_bundled_dataset("amazon_electronics")
    assert data["validation"].num_rows == 200
    validation, test = set(data["validation"]["review_id"]), set(data["test"]["review_id"])
    assert validation and test and not validation & test
    for split in data.values():
        assert all(s.split("_")[0] == r for s, r in zip(split["source_id"], split["review_id"], strict=True))


def test_load_text_classification_defaults_to_bundled():
    assert (
        load_text_classification(None)["train"].num_rows
        == load_bundled_dataset("rotten_tomatoes")["train"].num_rows
    )


def test_unknown_bundled_name_lists_valid_names():
    with pytest.raises(ValueError, match="rotten_tomatoes"):
        load_bundled_dataset("sst2")
    with pytest.raises(ValueError, match="accuracy"):
        load_metric("f1")


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({}, 0.5),
        ({"normalize": False}, 3.0),
        ({"sample_weight": [1, 1, 1, 1, 1, 3]}, 0.375),
    ],
)
def test_accuracy_metric(kwargs, expected):
    # A local module: `evaluate.load` reads it from disk, with no Hub request.
    metric = load_metric("accuracy")
    result = metric.compute(references=[0, 1, 2, 0, 1, 2], predictions=[0, 1, 1, 2, 1, 0], **kwargs)
    assert result == {"accuracy": pytest.approx(expected)}


def test_first_rows_are_a_fair_sample():
    """The splits are shuffled when built: the first rows hold both labels in about the split's proportion."""
    for name, split in (("rotten_tomatoes", "train"), ("amazon_electronics", "test")):
        labels = np.asarray(load_bundled_dataset(name)[split].with_format("numpy")["label"])
        head = labels[:1000].mean()
        assert abs(head - labels.mean()) < 0.05, (name, split, head, labels.mean())


def test_model_referencing_rebuilt_bundled_rows_gets_a_clear_error():
    """The default model exported before the splits were shuffled references rows that now hold other
    sentences: loading its training set names the changed package file and the ways out."""
    from pathlib import Path

    from hf_turnover.training_set import load_training_set

    old = Path(__file__).parent / "fixtures" / "default_model_before_shuffle"
    recorded = json.loads((old / "training_set.json").read_text())["fingerprint"]
    with pytest.raises(ValueError, match="changed since the model was made") as error:
        load_training_set(old, recorded)
    assert "resources/data/rotten_tomatoes/train.parquet" in str(error.value)
    assert "train_dataset=" in str(error.value)
