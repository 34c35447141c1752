"""Tiny models and datasets built in the tests: nothing is downloaded."""

from __future__ import annotations

import os

# Bit-identity across processes (a command against the library, one rank against two) holds with MKL's strict
# reproducibility mode and one thread per process, as the README says; the tests pin both for every process they
# start (PINNED) and MKL's mode for their own process (read when MKL loads, hence before torch is imported).
PINNED = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MKL_CBWR": "AUTO,STRICT"}
os.environ.setdefault("MKL_CBWR", PINNED["MKL_CBWR"])

import adapters  # noqa: E402
import datasets  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification  # noqa: E402

from hf_turnover import TurnoverConfig, TurnoverTrainingArguments, add_turnover  # noqa: E402

VOCAB = 64


@pytest.fixture
def one_thread():
    """This process on one intra-op thread for the test (a comparison whose two sides batch differently, or one
    against a pinned child process), restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The tiny BERT every test builds (with its own vocabulary and labels).
TINY_BERT = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=2
)


def add_task_adapter(model: nn.Module, adapter_config: str = "double_seq_bn") -> nn.Module:
    """A trainable bottleneck adapter "task" whose up-projections are random, so that masks show in the outputs
    (adapters start near the identity)."""
    model.add_adapter("task", config=adapter_config)
    model.train_adapter("task")
    for name, param in model.named_parameters():
        if "adapter_up" in name:
            nn.init.normal_(param, std=0.5)
    return model


def make_tiny_bert(
    adapter_config: str | None = "double_seq_bn", turnover: TurnoverConfig | None = None, seed=0
):
    """A 2-layer BERT with bottleneck adapters and turn-over on adapters and classifier."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB, max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        **TINY_BERT,
    )  # fmt: skip
    model = BertForSequenceClassification(config)
    if adapter_config is not None:
        adapters.init(model)
        add_task_adapter(model, adapter_config)
    if turnover is not False:
        add_turnover(model, turnover or TurnoverConfig())
    return model


def tiny_training_args(output_dir, **kwargs) -> TurnoverTrainingArguments:
    """Quick CPU training arguments: batches of 4, one epoch, lr 1e-2, no checkpoints, logs or trackers."""
    defaults = dict(
        output_dir=str(output_dir), per_device_train_batch_size=4, per_device_eval_batch_size=4,
        num_train_epochs=1, learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no",
        logging_strategy="no", seed=0, dataloader_num_workers=0,
    )  # fmt: skip
    return TurnoverTrainingArguments(**{**defaults, **kwargs})


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


THREADS = torch.get_num_threads()  # before any test: module fixtures may run benchmark drivers first


def make_train_and_targets() -> tuple[datasets.Dataset, datasets.Dataset]:
    """24 training rows and 3 targets with ids; target 0 is padded, so the attention mask must broadcast too."""
    train = make_token_dataset(24, seed=1)
    targets = make_token_dataset(3, seed=2).map(lambda r, i: {"instance_id": i}, with_indices=True)
    targets = targets.map(
        lambda r, i: {"attention_mask": [1] * 6 + [0] * 2} if i == 0 else {}, with_indices=True
    )
    return train, targets


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """The benchmark drivers set torch's thread count; a later test comparing in-process scores with a fresh
    process would then see other float rounding."""
    yield
    torch.set_num_threads(THREADS)


@pytest.fixture
def tiny_bert():
    return make_tiny_bert()


@pytest.fixture
def token_dataset():
    return make_token_dataset()
