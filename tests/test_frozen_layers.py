"""recipes/frozen_layers.py: the model on cached bottom-layer states is the model on tokens (eval mode), scoring
reads per-token vector columns, and restoring the bottom layers gives back the model that takes tokens."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
import torch
from test_recipe_sst2 import make_backbone

from hf_turnover import TurnoverConfig, self_influence
from hf_turnover.data import load_bundled_dataset
from hf_turnover.inputs import padded_batches
from hf_turnover.modeling_turnover import TurnoverBertForSequenceClassification
from hf_turnover.wide import wide_adapter_config

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 2-layer backbone with a wide adapter in its top layer, 12 training sentences with ids, and the modules."""
    backbone = make_backbone(tmp_path_factory.mktemp("frozen") / "backbone")
    import sys

    sys.path.insert(0, str(RECIPES))
    try:
        frozen = importlib.import_module("frozen_layers")
    finally:
        sys.path.remove(str(RECIPES))
    train = (
        load_bundled_dataset("rotten_tomatoes")["train"]
        .select(range(12))
        .select_columns(["sentence", "label"])
    )
    train = train.add_column("instance_id", list(range(500, 512)))
    torch.manual_seed(0)
    config = wide_adapter_config(TurnoverBertForSequenceClassification.config_class.from_pretrained(backbone),
                                 16, 1)  # fmt: skip
    model = TurnoverBertForSequenceClassification.from_backbone(
        str(backbone),
        num_labels=2,
        adapter_name="task",
        adapter_config=config,
        turnover=TurnoverConfig(seed=1),
    ).eval()
    for name, param in model.named_parameters():
        if "adapter_up" in name:
            torch.nn.init.normal_(param, std=0.5)  # so that masks show in the outputs
    return backbone, frozen, train, model


def test_cut_model_on_states_is_the_model_on_tokens_and_restores(setup):
    backbone, frozen, train, model = setup
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(backbone)
    sentences = train["sentence"][:]
    tokens = tokenizer(sentences, truncation=True, max_length=24, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**tokens).logits
    embeddings, layer0 = model.bert.embeddings, model.bert.encoder.layer[0]
    states = frozen.with_states(train, *frozen.bottom_layer_states(str(backbone), sentences, 24, 1))
    frozen.cut_bottom(model, 1)
    try:
        names = [n for n, _ in model.named_parameters()]
        assert not any(n.startswith(("bert.embeddings.", "bert.encoder.layer.0.")) for n in names)
        batch = frozen.PadStates()(list(states))
        with torch.no_grad():
            got = model(inputs_embeds=batch["inputs_embeds"], attention_mask=batch["attention_mask"]).logits
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    finally:
        frozen.restore_bottom(model)
    assert model.bert.embeddings is embeddings and model.bert.encoder.layer[0] is layer0
    with torch.no_grad():
        torch.testing.assert_close(model(**tokens).logits, expected)


def test_self_influence_on_states_equals_self_influence_on_tokens(setup):
    backbone, frozen, train, model = setup
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(backbone)
    tokenized = train.map(lambda r: tokenizer(r["sentence"], truncation=True, max_length=24), batched=True)
    states = frozen.with_states(
        train, *frozen.bottom_layer_states(str(backbone), train["sentence"][:], 24, 1)
    )
    kwargs = {"method": "linear", "batch_size": 5, "check_fingerprint": False, "progress": False}
    on_tokens = self_influence(model, tokenized, **kwargs)
    frozen.cut_bottom(model, 1)
    try:
        on_states = self_influence(model, states, **kwargs)
    finally:
        frozen.restore_bottom(model)
    assert on_states["train_id"][:] == on_tokens["train_id"][:] == list(range(500, 512))
    np.testing.assert_allclose(on_states["score"][:], on_tokens["score"][:], rtol=1e-3, atol=1e-6)


def test_padded_batches_pad_vector_columns_with_zeros_and_add_the_mask(setup):
    backbone, frozen, train, model = setup
    states = frozen.with_states(
        train, *frozen.bottom_layer_states(str(backbone), train["sentence"][:], 24, 1)
    )
    lengths = states["length"][:]
    frozen.cut_bottom(model, 1)
    try:
        (rows, inputs, labels), *_ = padded_batches(states, model, 4, torch.device("cpu"))
    finally:
        frozen.restore_bottom(model)
    embeds, mask = inputs["inputs_embeds"], inputs["attention_mask"]
    assert embeds.shape == (4, max(lengths[:4]), model.config.hidden_size)
    assert mask.sum(1).tolist() == lengths[:4] and labels.tolist() == train["label"][:4]
    for row, length in enumerate(lengths[:4]):
        assert torch.equal(embeds[row, :length], torch.as_tensor(states[row]["inputs_embeds"]))
        assert not embeds[row, length:].any()


def test_cut_bottom_refuses_layers_that_train(setup):
    _, frozen, _, model = setup
    with pytest.raises(ValueError, match="cannot be cached"):
        frozen.cut_bottom(model, 2)  # the top layer carries the trainable adapter
