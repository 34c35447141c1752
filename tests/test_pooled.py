"""method="pooled": the group fit and shrinkage of hf_turnover.pooled, checked against a dense re-derivation from the
mask bits; its basis, its errors, the signal share, and the pipeline's saved basis."""

import numpy as np
import pytest
import torch
from conftest import make_tiny_bert, make_token_dataset
from hub_fixtures import make_saved

from hf_turnover import TurnoverConfig, estimate_influence
from hf_turnover.evaluation import score_matrix, seed_agreement
from hf_turnover.linear import LinearScorer, PooledScorer, layer_bits, make_scorer
from hf_turnover.model import turnover_hooks
from hf_turnover.pipeline_turnover import InfluencePipeline
from hf_turnover.pooled import NOISE_IDS, PooledBasis, head_features, signal_share, training_errors

N = 48


@pytest.fixture(scope="module")
def setup():
    """A tiny masked BERT (p = 0.5 and p = 0.4 layers alike), 48 training ids, a basis of random features."""
    model = make_tiny_bert(turnover=TurnoverConfig(p=0.4, seed=3)).eval()
    train = make_token_dataset(N, seed=1)
    features = torch.randn(N, 12, generator=torch.Generator().manual_seed(0))
    basis = PooledBasis.from_features(train["instance_id"], train["labels"], features, num_components=4)
    targets = make_token_dataset(5, seed=2)
    inputs = {k: torch.tensor(targets[k]) for k in ("input_ids", "attention_mask")}
    return model, train, basis, inputs, torch.tensor(targets["labels"])


def dense_bits(model, ids, widths):
    """``X`` (len(ids), W): every masked layer's centred keep-bits times the own-variant coefficient."""
    blocks = []
    for name, width in widths.items():
        p = turnover_hooks(model)[name].config.p
        bits = layer_bits(model, name, ids, width).double()
        blocks.append(-(bits - p) / (p * (1 - p)))
    return torch.cat(blocks, 1)


def test_pooled_scores_equal_the_dense_derivation(setup):
    model, _, basis, inputs, labels = setup
    scorer = PooledScorer(model, basis=basis)
    grads = scorer.mask_gradients(inputs, labels)
    scores = scorer.scores_from_gradients(grads, basis.ids).double()
    widths = {n: g.shape[1] for n, g in grads.items()}
    g = torch.cat([grads[n].double() for n in widths], 1)  # (T, W)
    x = dense_bits(model, basis.ids, widths)
    x_noise = dense_bits(model, basis.ids.max() + 1 + torch.arange(NOISE_IDS), widths)
    design = basis.design(2)
    n = x.T @ design
    for t, k in enumerate(scorer.last_diagnostics["components"].tolist()):
        cols = 2 * (1 + k)
        psi = torch.linalg.lstsq(n[:, :cols], g[t][:, None]).solution[:, 0]
        group = (x**2).sum(1) * (design[:, :cols] @ psi)
        residual = x @ g[t] - x @ (n[:, :cols] @ psi)
        noise = x_noise @ g[t] - x_noise @ (n[:, :cols] @ psi)
        lam = (1 - noise.var() / residual.var()).clamp(0, 1)
        assert float(scorer.last_diagnostics["lambda"][t]) == pytest.approx(float(lam), abs=1e-5)
        torch.testing.assert_close(scores[t], group + lam * residual, rtol=1e-4, atol=1e-6)
    # the linear part it starts from is the library's linear score
    linear = LinearScorer(model).scores_from_gradients(grads, basis.ids).double()
    torch.testing.assert_close(linear, (x @ g.T).T, rtol=1e-4, atol=1e-6)


def test_a_gradient_made_of_group_traces_is_fitted_exactly(setup):
    """If every instance of a group left the same trace, g = n psi: the residual is 0 and the score of an
    instance is its group's trace times |x_i|^2, whatever k the cross-validation picks above the true one."""
    model, _, basis, inputs, labels = setup
    scorer = PooledScorer(model, basis=basis)
    grads = scorer.mask_gradients(inputs, labels)
    widths = {n: g.shape[1] for n, g in grads.items()}
    x = dense_bits(model, basis.ids, widths)
    design = basis.design(2)[:, :2]  # labels only: k = 0
    trace = torch.tensor([0.3, -0.2], dtype=torch.float64)
    g = (x.T @ design @ trace).float()
    split, start = {}, 0
    for name, width in widths.items():
        split[name] = g[start : start + width][None]
        start += width
    scores = scorer.scores_from_gradients(split, basis.ids).double()[0]
    expected = (x**2).sum(1) * (design @ trace)
    torch.testing.assert_close(scores, expected, rtol=1e-3, atol=1e-6)
    assert float(scorer.last_diagnostics["lambda"][0]) == 0.0  # nothing of the instances' own is left


def test_a_subset_of_ids_gets_the_columns_of_the_full_scores(setup):
    model, _, basis, inputs, labels = setup
    scorer = PooledScorer(model, basis=basis)
    grads = scorer.mask_gradients(inputs, labels)
    full = scorer.scores_from_gradients(grads, basis.ids)
    pick = torch.tensor([7, 3, 40])
    torch.testing.assert_close(scorer.scores_from_gradients(grads, basis.ids[pick]), full[:, pick])
    with pytest.raises(ValueError, match="not in the pooled basis"):
        scorer.scores_from_gradients(grads, torch.tensor([5]))


def test_estimate_influence_with_the_pooled_method(setup):
    model, train, basis, inputs, labels = setup
    rows = [{"input_ids": inputs["input_ids"][i].tolist(), "attention_mask": inputs["attention_mask"][i].tolist(),
             "labels": int(labels[i])} for i in range(len(labels))]  # fmt: skip
    result = estimate_influence(model, train, rows, method="pooled", basis=basis, check_fingerprint=False,
                                progress=False)  # fmt: skip
    matrix = score_matrix(result, range(5), basis.ids.numpy())[0]
    scorer = PooledScorer(model, basis=basis)
    direct = scorer.scores_from_gradients(scorer.mask_gradients(inputs, labels), basis.ids)
    np.testing.assert_allclose(matrix, direct.numpy(), rtol=1e-5, atol=1e-7)


def test_errors_name_the_fix(setup):
    model, _, basis, inputs, labels = setup
    with pytest.raises(ValueError, match="needs basis="):
        make_scorer(model, "pooled")
    with pytest.raises(ValueError, match="basis= is for method='pooled'"):
        make_scorer(model, "linear", basis=basis)
    with pytest.raises(ValueError, match="variant='own'"):
        make_scorer(model, "pooled", basis=basis, variant="full")
    with pytest.raises(ValueError, match="method='linear'"):
        PooledScorer(model, basis=basis).self_scores(inputs, labels, basis.ids[:5])
    with pytest.raises(ValueError, match="one label and one row"):
        PooledBasis(torch.arange(3), torch.tensor([0, 1]), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="label ids >= 0"):
        PooledBasis(torch.arange(2), torch.tensor([0, -1]), torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        PooledBasis.from_features([0], [0], torch.zeros(1, 3))


def test_basis_components_are_standardised_and_round_trip(setup):
    _, _, basis, _, _ = setup
    assert basis.components.shape == (N, 4)
    torch.testing.assert_close(basis.components.std(0), torch.ones(4), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(basis.components.mean(0), torch.zeros(4), rtol=0, atol=1e-5)
    again = PooledBasis.from_state_dict(basis.state_dict())
    assert torch.equal(again.ids, basis.ids) and torch.equal(again.components, basis.components)
    design = basis.design(2)
    assert design.shape == (N, 10) and torch.equal(design[:, :2].sum(1), torch.ones(N, dtype=torch.float64))


def test_head_features_are_the_classifier_inputs_in_order(setup):
    model, train, _, _, _ = setup
    inputs = {k: torch.tensor(train[k]) for k in ("input_ids", "attention_mask")}
    seen = []
    handle = model.classifier.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    batches = ({k: v[i : i + 10] for k, v in inputs.items()} for i in range(0, N, 10))
    torch.testing.assert_close(head_features(model, batches), seen[0])


def test_the_model_error_is_the_first_component():
    """``errors=``: component 0 is the standardised error, then the principal components that the same features
    give without errors, ``num_components`` in all."""
    g = torch.Generator().manual_seed(5)
    features, logits = torch.randn(N, 12, generator=g), torch.randn(N, 3, generator=g)
    labels = torch.randint(0, 3, (N,), generator=g)
    errors = training_errors(logits, labels)
    torch.testing.assert_close(errors, 1 - torch.softmax(logits.double(), -1)[torch.arange(N), labels])
    basis = PooledBasis.from_features(torch.arange(N), labels, features, 4, errors=errors)
    plain = PooledBasis.from_features(torch.arange(N), labels, features, 3)
    assert basis.components.shape == (N, 4)
    standardised = ((errors - errors.mean()) / errors.std()).float()
    torch.testing.assert_close(basis.components[:, 0], standardised)
    torch.testing.assert_close(basis.components[:, 1:], plain.components)
    with pytest.raises(ValueError, match="errors has 5 values for 48 rows"):
        PooledBasis.from_features(torch.arange(N), labels, features, 4, errors=errors[:5])
    with pytest.raises(ValueError, match=r"logits \(48, 3\) and 5 labels"):
        training_errors(logits, labels[:5])


def test_text_basis_puts_the_model_error_on_each_text_first(tmp_path):
    """training_pooled_basis: component 0 is the model's error on each training text, computed one text at a
    time here; the batched pass sorts texts by length and puts them back."""
    from hf_turnover.explain import training_pooled_basis

    model, tokenizer, train = make_saved(tmp_path)
    basis = training_pooled_basis(model, tokenizer, train, batch_size=3, num_components=3, progress=False)
    with torch.no_grad():
        logits = torch.cat([model(**tokenizer(t, return_tensors="pt")).logits for t in train["sentence"]])
    errors = training_errors(logits, train["label"])
    torch.testing.assert_close(basis.components[:, 0], ((errors - errors.mean()) / errors.std()).float(),
                               rtol=1e-4, atol=1e-4)  # fmt: skip


def test_signal_share_of_scores_and_of_noise():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(3, 4000, generator=g)
    assert signal_share(torch.randn(3, 4000, generator=g), noise).max() < 0.1  # noise like noise: ~0
    assert signal_share(torch.randn(3, 4000, generator=g) * 2, noise).min() > 0.7  # 1 - 1/4
    assert signal_share(noise * 0.5, noise).eq(0).all()  # clipped at 0


def test_seed_agreement_within_label_ignores_a_label_offset():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 50)
    a = rng.normal(size=(4, 100))
    b = a + 10.0 * labels  # the same order inside each label, a large offset between labels
    agreement = seed_agreement(a, b, labels=labels)
    assert agreement["mean_influence_spearman_within_label"] == pytest.approx(1.0)
    assert agreement["mean_influence_spearman"] < 0.9
    with pytest.raises(ValueError, match="one label per training instance"):
        seed_agreement(a, b, labels=labels[:10])


def test_pipeline_pooled_basis_is_built_saved_and_read_back(tmp_path, monkeypatch):
    import hf_turnover.pipeline_turnover as module
    from hf_turnover.explain import POOLING_FILE
    from hf_turnover.modeling_turnover import TurnoverBertForSequenceClassification

    model, tokenizer, train = make_saved(tmp_path)
    pipe = InfluencePipeline(model=model, tokenizer=tokenizer, train_dataset=train)
    out = pipe("w1 w2 w3", top_k=None, method="pooled")
    assert all(i["score"] > 0 for i in out["helpful"]) and all(i["score"] < 0 for i in out["harmful"])
    assert pipe.pooled_basis().ids.tolist() == train["instance_id"]
    pipe.save_pretrained(tmp_path / "pipe")
    assert (tmp_path / "pipe" / POOLING_FILE).is_file()
    monkeypatch.setattr(module, "training_pooled_basis", lambda *a, **k: pytest.fail("rebuilt"))
    loaded = InfluencePipeline(
        model=TurnoverBertForSequenceClassification.from_pretrained(tmp_path / "pipe"), tokenizer=tokenizer
    )
    again = loaded("w1 w2 w3", top_k=None, method="pooled")
    assert [i["train_id"] for i in again["helpful"]] == [i["train_id"] for i in out["helpful"]]
    np.testing.assert_allclose([i["score"] for i in again["helpful"]], [i["score"] for i in out["helpful"]],
                               rtol=1e-4)  # fmt: skip


FRESH = """
import json, sys
from transformers import pipeline
explain = pipeline(model=sys.argv[1], trust_remote_code=True)
print(json.dumps(explain("w1 w2 w3", top_k=3, method="pooled")))
"""


def test_saved_basis_scores_in_a_fresh_process_without_hf_turnover(tmp_path):
    from hub_fixtures import fresh_env, run_fresh

    model, tokenizer, train = make_saved(tmp_path)
    pipe = InfluencePipeline(model=model, tokenizer=tokenizer, train_dataset=train)
    expected = pipe("w1 w2 w3", top_k=3, method="pooled")
    pipe.save_pretrained(tmp_path / "pipe")
    assert (tmp_path / "pipe" / "pooled.py").is_file()
    fresh = run_fresh(FRESH, tmp_path, fresh_env(tmp_path / "hf_home"), str(tmp_path / "pipe"))
    assert [i["train_id"] for i in fresh["helpful"]] == [i["train_id"] for i in expected["helpful"]]
    np.testing.assert_allclose([i["score"] for i in fresh["helpful"]], [i["score"] for i in expected["helpful"]],
                               rtol=1e-4)  # fmt: skip


def test_embedded_default_ships_its_basis(monkeypatch):
    """The embedded default reads its saved groups (built once from its 8,454 training sentences, a 2-minute pass
    on a CPU) instead of rebuilding them; its pooled explanations of a confident prediction carry its label."""
    from transformers import pipeline

    import hf_turnover.pipeline_turnover as module
    from hf_turnover.default_model import DEFAULT_MODEL_DIR
    from hf_turnover.explain import POOLING_FILE
    from hf_turnover.hub import register_with_transformers

    if not (DEFAULT_MODEL_DIR / POOLING_FILE).is_file():
        pytest.skip("the embedded default is not built")
    register_with_transformers()
    monkeypatch.setattr(module, "training_pooled_basis", lambda *a, **k: pytest.fail("rebuilt"))
    explain = pipeline("turnover-influence")
    basis = explain.pooled_basis()
    assert sorted(basis.ids.tolist()) == sorted(explain.train_dataset["instance_id"])
    out = explain("A gorgeous, witty, seductive movie.", top_k=3, method="pooled")
    assert {item["label"] for item in out["helpful"]} == {out["prediction"]["label"]}


def test_components_are_chosen_by_held_out_units_and_need_enough_units():
    from hf_turnover.pooled import choose_components

    g_ = torch.Generator().manual_seed(0)
    n = torch.randn(400, 2 * 17, generator=g_, dtype=torch.float64)
    psi = torch.zeros(2 * 17, 2, dtype=torch.float64)
    psi[:2, 0] = 1.0  # target 0: labels only
    psi[:10, 1] = 1.0  # target 1: labels and 4 components
    g = (n @ psi).T + 0.1 * torch.randn(2, 400, generator=g_, dtype=torch.float64)
    assert choose_components(n, g, 2).tolist() == [0, 4]
    assert choose_components(n[:8], g[:, :8], 2).tolist() == [0, 0]  # 8 units: no room to compare fits


def test_noise_ids_are_never_training_ids():
    from hf_turnover.linear import _unused_ids

    assert _unused_ids(torch.tensor([5, 9, 7]), 3).tolist() == [10, 11, 12]
    top = torch.tensor([2**62 - 1, 100])
    assert _unused_ids(top, 3).tolist() == [97, 98, 99]  # no room above: below the smallest
    with pytest.raises(ValueError, match="outside the training ids"):
        _unused_ids(torch.tensor([2, 2**62 - 1]), 3)


def test_dataset_basis_reads_rows_in_length_order_and_returns_them_in_place(setup):
    """Rows of different lengths, batched in length order (little padding): the basis equals the one built from
    each row's features computed alone."""
    import datasets

    from hf_turnover.explain import dataset_pooled_basis

    model = setup[0]
    g_ = torch.Generator().manual_seed(4)
    lengths = torch.randint(3, 9, (20,), generator=g_).tolist()
    rows = {"input_ids": [torch.randint(1, 50, (n,), generator=g_).tolist() for n in lengths],
            "attention_mask": [[1] * n for n in lengths], "labels": [i % 2 for i in range(20)],
            "instance_id": list(range(500, 520))}  # fmt: skip
    train = datasets.Dataset.from_dict(rows)
    basis = dataset_pooled_basis(model, train, batch_size=6, num_components=3)
    alone, logits = head_features(
        model, ({"input_ids": torch.tensor([r]), "attention_mask": torch.ones(1, len(r), dtype=torch.long)}
                for r in rows["input_ids"]), return_logits=True
    )  # fmt: skip
    errors = training_errors(logits, rows["labels"])
    expected = PooledBasis.from_features(rows["instance_id"], rows["labels"], alone, 3, errors=errors)
    assert basis.ids.tolist() == rows["instance_id"] and basis.labels.tolist() == rows["labels"]
    torch.testing.assert_close(basis.components.abs(), expected.components.abs(), rtol=1e-3, atol=1e-3)
