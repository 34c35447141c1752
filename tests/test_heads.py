"""K masked heads on one frozen body (``from_backbone(heads=K)``): the model is the mean of its heads, every head
has its own masks and trains as it would alone, and the scoring engine's fast paths score the averaged model
exactly."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import TINY_BERT, VOCAB, make_train_and_targets, tiny_training_args
from test_influence import _scores, reference_scores
from transformers import BertConfig, BertForSequenceClassification

from hf_turnover import (
    TurnoverBertForSequenceClassification,
    TurnoverConfig,
    TurnoverTrainer,
    estimate_influence,
    turnover_context,
    turnover_layers,
)
from hf_turnover.heads import HEADS_HEAD_MODULES, head_adapter_names
from hf_turnover.masks import keep_bits
from hf_turnover.modeling_turnover import TurnoverBertConfig, adapter_and_head_state


def backbone(directory: Path) -> Path:
    """A 3-layer BERT (no dropout, so that heads see the same batches bit for bit) saved as a backbone folder."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB, max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        **{**TINY_BERT, "num_hidden_layers": 3},
    )  # fmt: skip
    BertForSequenceClassification(config).bert.save_pretrained(directory)
    return directory


def heads_model(directory: Path, heads: int, seed: int = 0) -> TurnoverBertForSequenceClassification:
    torch.manual_seed(seed)
    model = TurnoverBertForSequenceClassification.from_backbone(directory, heads=heads)
    for name, param in model.named_parameters():
        if "adapter_up" in name:
            torch.nn.init.normal_(param, std=0.5)  # adapters start near the identity: let the masks show
    return model


def test_the_model_is_the_mean_of_its_heads(tmp_path):
    model = heads_model(backbone(tmp_path / "backbone"), heads=3).eval()
    assert model.config.turnover_heads == ["task", "task_head1", "task_head2"]
    assert len(turnover_layers(model)) == 3 * 2 + 3  # two adapters and a classifier per head
    inputs = {"input_ids": torch.randint(1, VOCAB, (4, 7), generator=torch.Generator().manual_seed(1))}
    labels = torch.tensor([0, 1, 1, 0])
    with turnover_context([5, 6, 7, 8], "flip"):
        averaged = model(**inputs, labels=labels)
        alone = []
        for k in range(3):
            with model.single_head(k):
                alone.append(model(**inputs, labels=labels))
    assert not torch.allclose(alone[0].logits, alone[1].logits)
    torch.testing.assert_close(averaged.logits, torch.stack([o.logits for o in alone]).mean(0))
    torch.testing.assert_close(averaged.loss, torch.stack([o.loss for o in alone]).mean())
    assert torch.equal(model(**inputs, return_dict=False)[0], model(**inputs).logits)


def test_each_head_masks_its_own_units():
    ids = torch.arange(100, 164)
    bits = {name: keep_bits(ids, 64, f"bert.encoder.layer.2.output.adapters.{name}.adapter_down", p=0.5, seed=0)
            for name in head_adapter_names("task", 2)}  # fmt: skip
    agreement = (bits["task"] == bits["task_head1"]).float().mean()
    assert 0.4 < agreement < 0.6  # independent draws, not one mask twice


def test_one_step_on_an_instance_leaves_every_heads_flipped_units_alone(tmp_path):
    model = heads_model(backbone(tmp_path / "backbone"), heads=2).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    instance = 4321
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    with turnover_context([instance], "own"):
        model(input_ids=torch.tensor([[3, 9, 27, 4]]), labels=torch.tensor([1])).loss.backward()
    optimizer.step()
    config = model.turnover_config
    for name, where in turnover_layers(model).items():
        weight = f"{name}.weight" if where == "input" else f"{name}.0.weight"
        width = before[weight].shape[1 if where == "input" else 0]
        kept = keep_bits(torch.tensor([instance]), width, name, p=config.p, seed=config.seed)[0]
        index = (slice(None), ~kept) if where == "input" else (~kept, slice(None))
        assert torch.equal(model.get_parameter(weight)[index], before[weight][index]), name
        assert not torch.equal(model.get_parameter(weight), before[weight]), name  # the own units moved


def test_each_head_trains_as_it_would_alone(tmp_path):
    """Trained together, head 0 ends where the same head trained alone (same init, batches and masks) ends: the
    heads share no trained parameter, and AdamW does not see the 1/K that the mean of the losses puts on each
    head's gradient (but for its eps, set below the tiny model's smallest gradients)."""
    directory = backbone(tmp_path / "backbone")
    both = heads_model(directory, heads=2)
    alone = TurnoverBertForSequenceClassification.from_backbone(directory)
    alone.load_state_dict({k: v for k, v in both.state_dict().items() if k in alone.state_dict()})
    train, _ = make_train_and_targets()
    for model, name in ((both, "both"), (alone, "alone")):
        args = tiny_training_args(tmp_path / name, max_grad_norm=0.0, learning_rate=3e-3, adam_epsilon=1e-12)
        TurnoverTrainer(model, args, train_dataset=train).train()
    head0 = {k: v for k, v in adapter_and_head_state(both).items() if k in alone.state_dict()}
    assert set(head0) == set(adapter_and_head_state(alone))
    for key, value in adapter_and_head_state(alone).items():
        torch.testing.assert_close(head0[key], value, atol=1e-4, rtol=1e-4, msg=key)
    assert not torch.allclose(both.classifier.weight, both.turnover_classifiers[0].weight)


def test_exact_scores_of_the_averaged_model_equal_the_row_by_row_reference(tmp_path):
    """The scoring engine's fast paths (broadcast, paired own/flip rows, [CLS]-only tail, prefix replay) on a
    model that runs its top layers once per head."""
    model = heads_model(backbone(tmp_path / "backbone"), heads=2)
    train, targets = make_train_and_targets()
    result = estimate_influence(model, train, targets, train_batch_size=5, progress=False, method="exact")
    for t in range(3):
        expected = reference_scores(model, targets[t], sorted(train["instance_id"]))
        torch.testing.assert_close(_scores(result, t), expected, atol=1e-5, rtol=1e-4)


def test_saved_heads_load_with_their_masks(tmp_path):
    model = heads_model(backbone(tmp_path / "backbone"), heads=2).eval()
    model.save_pretrained(tmp_path / "saved")
    loaded = TurnoverBertForSequenceClassification.from_pretrained(tmp_path / "saved").eval()
    assert turnover_layers(loaded) == turnover_layers(model)
    inputs = {"input_ids": torch.tensor([[5, 6, 7], [8, 9, 10]])}
    for mode in ("own", "flip"):
        with turnover_context([11, 12], mode):
            assert torch.equal(loaded(**inputs).logits, model(**inputs).logits), mode


def test_bad_head_set_ups_are_refused_by_name(tmp_path):
    directory = backbone(tmp_path / "backbone")
    with pytest.raises(ValueError, match="num_heads must be a positive int"):
        TurnoverBertForSequenceClassification.from_backbone(directory, heads=0)
    with pytest.raises(
        ValueError, match=r"head_modules masks head 0's classifier but not.*HEADS_HEAD_MODULES"
    ):
        TurnoverBertForSequenceClassification.from_backbone(directory, heads=2, turnover=TurnoverConfig())
    with pytest.raises(ValueError, match="two or more distinct adapters"):
        TurnoverBertConfig(turnover_heads=["task", "task"])
    model = TurnoverBertForSequenceClassification.from_backbone(
        directory, heads=2, turnover=TurnoverConfig(head_modules=HEADS_HEAD_MODULES, seed=4)
    )
    with pytest.raises(IndexError, match="has 2 heads"):
        with model.single_head(2):
            pass
    copy.deepcopy(model)  # a K-head model deep-copies (the Trainer's and accelerate's checkpoints do)
