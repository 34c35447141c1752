"""Linearized scoring is the first-order form of the exact estimate; the mask table is the masks' dot product."""

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_bert, make_token_dataset

from hf_turnover import (
    TurnoverConfig,
    estimate_influence,
    explain_prediction,
    mean_influence,
    self_influence,
    turnover_context,
)
from hf_turnover.evaluation import score_matrix
from hf_turnover.linear import LinearScorer, MaskTable, layer_bits, make_scorer, reference_gradient
from hf_turnover.masks import mask_values
from hf_turnover.model import turnover_hooks

IDS = [100, 101, 102, 103, 104, 105]


def loss64(logits, labels):
    """Cross-entropy in the logits' dtype (the default loss computes in float32)."""
    return F.cross_entropy(logits, labels.expand(len(logits)), reduction="none")


@pytest.fixture(scope="module")
def model64():
    """Every adapter and the classifier masked, in float64 so that finite differences are exact enough."""
    return make_tiny_bert(turnover=TurnoverConfig(p=0.4, seed=3)).double().eval()


@pytest.fixture(scope="module")
def target():
    row = make_token_dataset(1, seed=5)[0]
    return {"input_ids": row["input_ids"], "attention_mask": row["attention_mask"], "labels": row["labels"]}


def interpolated_loss(model, target, train_id: int, mode: str, eps: float) -> float:
    """The target's loss with every mask value moved from 1 towards ``mode``'s mask: ``1 + eps * (m - 1)``."""
    handles = []
    for name, hook in turnover_hooks(model).items():

        def scale(x, name=name, hook=hook):
            bits = layer_bits(model, name, torch.tensor([train_id]), x.shape[hook.unit_dim])
            mask = mask_values(bits, mode, hook.config.p, x.dtype)[0]  # (d,)
            shape = [1] * x.dim()
            shape[hook.unit_dim] = -1
            return x * (1 + eps * (mask - 1)).view(shape)

        module = model.get_submodule(name)
        if hook.where == "output":
            handles.append(module.register_forward_hook(lambda m, a, out, f=scale: f(out)))
        else:
            handles.append(module.register_forward_pre_hook(lambda m, a, f=scale: (f(a[0]), *a[1:])))
    try:
        with torch.no_grad(), turnover_context([train_id], "full"):
            inputs = {k: torch.tensor([target[k]]) for k in ("input_ids", "attention_mask")}
            return float(loss64(model(**inputs).logits, torch.tensor([target["labels"]])))
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("variant, other", [("own", "own"), ("full", None)])
def test_linear_score_is_the_derivative_of_the_exact_score(model64, target, variant, other):
    """d/de [L(1 + e(m~ - 1)) - L(1 + e(m - 1))] at e = 0 is the linearized score (central differences)."""
    eps = 1e-5
    expected = []
    for i in IDS:

        def exact(e, i=i):
            base = (
                interpolated_loss(model64, target, i, other, e)
                if other
                else interpolated_loss(model64, target, i, "own", 0.0)
            )
            return interpolated_loss(model64, target, i, "flip", e) - base

        expected.append((exact(eps) - exact(-eps)) / (2 * eps))
    result = estimate_influence(model64, None, [target], train_ids=IDS, method="linear", variant=variant,
                                loss_fn=loss64, check_fingerprint=False, progress=False)  # fmt: skip
    linear = score_matrix(result, [0], IDS)[0][0]
    np.testing.assert_allclose(linear, expected, rtol=1e-4, atol=1e-9)
    assert np.abs(linear).min() > 0


def test_linear_approximates_the_exact_score(target):
    """On float32 tiny BERT the first-order scores track the exact ones (small masked nets are nearly linear)."""
    model = make_tiny_bert()
    train_ids = list(range(100, 164))
    kwargs = {"train_ids": train_ids, "check_fingerprint": False, "progress": False}
    exact = score_matrix(estimate_influence(model, None, [target], method="exact", **kwargs))[0][0]
    linear = score_matrix(estimate_influence(model, None, [target], method="linear", **kwargs))[0][0]
    assert np.corrcoef(exact, linear)[0, 1] > 0.95


@pytest.mark.parametrize("width", [1, 8, 13, 70])
def test_mask_table_dot_equals_dense_product(width):
    model = make_tiny_bert()
    name = next(iter(turnover_hooks(model)))
    ids = torch.arange(5, 5 + 37)
    table = MaskTable(model, ids, {name: width}, rows=10)  # several row blocks
    grads = torch.randn(3, width, dtype=torch.float64)
    dense = layer_bits(model, name, ids, width).double() @ grads.T
    torch.testing.assert_close(table.dot(name, grads), dense.float(), rtol=1e-5, atol=1e-5)


def test_linear_self_influence_is_the_pairwise_score_of_the_row_itself():
    model = make_tiny_bert()
    train = make_token_dataset(6, seed=1)
    scores = self_influence(model, train, method="linear", check_fingerprint=False, progress=False)
    for row in train.select([0, 4]):
        pair = estimate_influence(model, None, [row], train_ids=[row["instance_id"]], method="linear",
                                  check_fingerprint=False, progress=False)  # fmt: skip
        own = scores.filter(lambda r, i=row["instance_id"]: r["train_id"] == i)["score"][0]
        assert own == pytest.approx(pair["score"][0], rel=1e-4, abs=1e-7)


def test_linear_mean_influence_is_the_mean_of_linear_scores():
    model = make_tiny_bert()
    train, targets = make_token_dataset(12, seed=1), make_token_dataset(4, seed=2)
    kwargs = {"method": "linear", "check_fingerprint": False, "progress": False}
    pairwise = score_matrix(estimate_influence(model, train, targets, **kwargs))[0]
    mean = mean_influence(model, train, targets, **kwargs)
    np.testing.assert_allclose(mean["score"], pairwise.mean(0), rtol=1e-4, atol=1e-7)


def test_linear_batch_of_targets_equals_one_at_a_time():
    model = make_tiny_bert()
    train, targets = make_token_dataset(10, seed=1), make_token_dataset(3, seed=2)
    kwargs = {"method": "linear", "check_fingerprint": False, "progress": False}
    together = score_matrix(estimate_influence(model, train, targets, **kwargs))[0]
    for t in range(3):
        alone = score_matrix(estimate_influence(model, train, targets.select([t]), **kwargs))[0][0]
        np.testing.assert_allclose(together[t], alone, rtol=1e-5, atol=1e-8)


def test_linear_top_k_and_arguments_recorded():
    model = make_tiny_bert()
    train, targets = make_token_dataset(10, seed=1), make_token_dataset(2, seed=2)
    result = estimate_influence(model, train, targets, method="linear", top_k=2, check_fingerprint=False,
                                progress=False)  # fmt: skip
    assert len(result) == 2 * 2 * 2
    from hf_turnover import score_arguments

    assert score_arguments(result)["method"] == "linear"


def test_explain_prediction_linear_keeps_one_mask_table():
    model = make_tiny_bert()
    train = make_token_dataset(16, seed=1)
    scorer = make_scorer(model, "linear")
    assert isinstance(scorer, LinearScorer)
    targets = make_token_dataset(2, seed=2)
    for row in targets:
        out = explain_prediction(model, train, row, top_k=3, restrict_to_label=True, scorer=scorer,
                                 check_fingerprint=False)  # fmt: skip
        assert all(item["label"] == out["prediction"]["label"] for item in out["helpful"] + out["harmful"])
        scores = [item["score"] for item in out["helpful"]]
        assert scores == sorted(scores, reverse=True)
    table = scorer._table
    assert table is not None and len(table.ids) == 16  # built once for the whole training set
    explain_prediction(model, train, targets[0], scorer=scorer, check_fingerprint=False)
    assert scorer._table is table


def test_unknown_method_names_the_choices():
    model = make_tiny_bert()
    with pytest.raises(ValueError, match="method='fast'.*'exact'.*'linear'.*'centered'"):
        estimate_influence(model, None, [make_token_dataset(1)[0]], train_ids=[1], method="fast",
                           check_fingerprint=False)  # fmt: skip


def test_explanations_read_the_training_columns_once_per_dataset(monkeypatch):
    import hf_turnover.explain as explain

    model = make_tiny_bert()
    train = make_token_dataset(16, seed=1)
    scorer = make_scorer(model, "linear")
    reads = []
    original = explain.training_ids
    monkeypatch.setattr(explain, "training_ids", lambda *a, **k: reads.append(1) or original(*a, **k))
    target = make_token_dataset(1, seed=2)[0]
    first = explain_prediction(model, train, target, scorer=scorer, check_fingerprint=False)
    assert explain_prediction(model, train, target, scorer=scorer, check_fingerprint=False) == first
    assert len(reads) == 1
    changed = train.map(lambda r: {"labels": 1 - r["labels"]})  # a new dataset: read again
    explain_prediction(model, changed, target, scorer=scorer, restrict_to_label=True, check_fingerprint=False)
    assert len(reads) == 2


@pytest.mark.parametrize("method", ["exact", "linear"])
def test_explain_predictions_equals_one_at_a_time(method):
    from hf_turnover import explain_predictions

    model = make_tiny_bert()
    train = make_token_dataset(12, seed=1)
    targets = [dict(row) for row in make_token_dataset(3, seed=2, length=6)]
    targets[1] = {
        k: (v[:4] if isinstance(v, list) else v) for k, v in targets[1].items()
    }  # padding in a batch
    together = explain_predictions(model, train, targets, method=method, batch_size=2, top_k=3)
    for target, out in zip(targets, together, strict=True):
        alone = explain_prediction(model, train, target, method=method, top_k=3)
        assert [h["train_id"] for h in out["helpful"]] == [h["train_id"] for h in alone["helpful"]]
        np.testing.assert_allclose(
            [h["score"] for h in out["helpful"] + out["harmful"]],
            [h["score"] for h in alone["helpful"] + alone["harmful"]],
            rtol=1e-4,
            atol=1e-6,
        )


def varied_length_dataset(n: int = 10, seed: int = 1):
    """Token rows of lengths 3..8 in a shuffled order (so a length sort reorders them), with ids and labels."""
    g = torch.Generator().manual_seed(seed)
    lengths = (torch.randperm(n, generator=g) % 6 + 3).tolist()
    return datasets.Dataset.from_dict({
        "input_ids": [torch.randint(1, 64, (k,), generator=g).tolist() for k in lengths],
        "labels": torch.randint(0, 2, (n,), generator=g).tolist(),
        "instance_id": list(range(200, 200 + n)),
    })  # fmt: skip


def test_centered_scores_are_linear_scores_minus_the_mean_over_the_reference_rows():
    """``centered(t, i) = linear(t, i) - mean_r linear(r, i)``, r the reference rows under predicted labels."""
    model = make_tiny_bert()
    train, targets = make_token_dataset(12, seed=1), make_token_dataset(3, seed=2)
    reference_rows = make_token_dataset(5, seed=4).remove_columns("labels")  # no label: the prediction
    batch = {"input_ids": torch.tensor(reference_rows["input_ids"]),
             "attention_mask": torch.tensor(reference_rows["attention_mask"])}  # fmt: skip
    reference = reference_gradient(model, [batch])
    kwargs = {"check_fingerprint": False, "progress": False}
    centered = score_matrix(estimate_influence(model, train, targets, method="centered", reference=reference,
                                               **kwargs))[0]  # fmt: skip
    linear = score_matrix(estimate_influence(model, train, targets, method="linear", **kwargs))[0]
    on_reference = score_matrix(estimate_influence(model, train, reference_rows, method="linear", **kwargs))[
        0
    ]
    np.testing.assert_allclose(centered, linear - on_reference.mean(0), rtol=1e-4, atol=1e-6)
    scorer = make_scorer(model, "centered", reference)
    assert scorer.method == "centered" and make_scorer(model, "linear").method == "linear"


def test_centered_needs_the_reference_of_this_model():
    model = make_tiny_bert()
    with pytest.raises(ValueError, match="needs reference="):
        make_scorer(model, "centered")
    with pytest.raises(ValueError, match="masked layers are"):
        make_scorer(model, "centered", {"classifier": torch.zeros(2)})
    scorer = make_scorer(model, "centered", {n: torch.zeros(3) for n in turnover_hooks(model)})
    with pytest.raises(ValueError, match="has 3 units for"):
        row = make_token_dataset(1)[0]
        inputs = {k: torch.tensor([row[k]]) for k in ("input_ids", "attention_mask")}
        scorer.score(inputs, torch.tensor([row["labels"]]), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="for method='centered'"):
        make_scorer(model, "linear", {"classifier": torch.zeros(2)})


@pytest.mark.parametrize("method", ["exact", "linear"])
def test_self_influence_in_length_order_returns_the_dataset_order(method):
    """Self-influence batches rows of similar length; each score still belongs to its own row."""
    model = make_tiny_bert()
    train = varied_length_dataset()
    kwargs = {"method": method, "check_fingerprint": False, "progress": False}
    batched = self_influence(model, train, batch_size=4, **kwargs)
    alone = self_influence(model, train, batch_size=1, **kwargs)
    assert batched["train_id"][:] == train["instance_id"][:]
    np.testing.assert_allclose(batched["score"][:], alone["score"][:], rtol=1e-4, atol=1e-6)
