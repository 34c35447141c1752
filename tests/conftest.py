"""Tiny models and datasets built in the tests: nothing is downloaded."""

from __future__ import annotations

import adapters
import datasets
import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from hf_turnover import TurnoverConfig, add_turnover

VOCAB = 64


def make_tiny_bert(
    adapter_config: str | None = "double_seq_bn", turnover: TurnoverConfig | None = None, seed=0
):
    """A 2-layer BERT with bottleneck adapters and turn-over on adapters and classifier."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = BertForSequenceClassification(config)
    if adapter_config is not None:
        adapters.init(model)
        model.add_adapter("task", config=adapter_config)
        model.train_adapter("task")
        # Adapters start near the identity; random up-projections make masks visible in the outputs.
        for name, param in model.named_parameters():
            if "adapter_up" in name:
                nn.init.normal_(param, std=0.5)
    if turnover is not False:
        add_turnover(model, turnover or TurnoverConfig())
    return model


def make_token_dataset(
    n: int = 16, length: int = 8, seed: int = 0, with_ids: bool = True
) -> datasets.Dataset:
    g = torch.Generator().manual_seed(seed)
    rows = {
        "input_ids": torch.randint(1, VOCAB, (n, length), generator=g).tolist(),
        "attention_mask": [[1] * length] * n,
        "labels": torch.randint(0, 2, (n,), generator=g).tolist(),
    }
    if with_ids:
        rows["instance_id"] = list(range(100, 100 + n))
    return datasets.Dataset.from_dict(rows)


@pytest.fixture
def tiny_bert():
    return make_tiny_bert()


@pytest.fixture
def token_dataset():
    return make_token_dataset()
