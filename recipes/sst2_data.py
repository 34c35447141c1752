"""The data of `recipes/sst2.py`: its options, the splits with fixed instance ids, their tokens, and the cached
output of the frozen layers below the adapters."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import datasets
from frozen_layers import PadStates, bottom_layer_states, with_states
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from hf_turnover.data import load_text_classification

ID_COLUMN = "instance_id"


@dataclass
class DataArguments:
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub dataset id (glue) or a bundled name. Default: bundled rotten_tomatoes."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset config (sst2)."})
    text_column: str = field(default="sentence", metadata={"help": "Column holding the text."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Training instances (seeded shuffle; None: all)."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Validation sentences (None: all)."})
    max_length: int = field(
        default=128, metadata={"help": "Tokens per sentence (longer ones are truncated)."}
    )


def load_splits(data_args: Any, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, validation) with columns instance_id, text, label; train is a seeded random subset.

    The instance id is the row's index in the full training split (or its bundled ``instance_id``), fixed
    before shuffling, so the same sentence keeps its id (and its mask) whatever subset is drawn.
    """
    raw = load_text_classification(data_args.dataset_name, data_args.dataset_config_name)
    text = data_args.text_column
    for split in ("train", "validation"):
        missing = [c for c in (text, "label") if c not in raw[split].column_names]
        if missing:
            raise ValueError(
                f"The {split} split lacks the columns {missing} (it has {raw[split].column_names}); "
                "pass --text_column."
            )
    train = raw["train"]
    if ID_COLUMN not in train.column_names:
        train = train.add_column(ID_COLUMN, list(range(len(train))))
    train = train.shuffle(seed=seed)
    if data_args.max_train_samples is not None:
        train = train.select(range(min(data_args.max_train_samples, len(train))))
    train = train.select_columns([ID_COLUMN, text, "label"]).flatten_indices()
    validation = raw["validation"].select_columns([text, "label"])
    if data_args.max_eval_samples is not None:
        validation = validation.select(range(min(data_args.max_eval_samples, len(validation))))
    return train, validation


def tokenize(
    dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, data_args: Any
) -> datasets.Dataset:
    """``dataset`` with the token columns of its ``--text_column``, truncated to ``--max_length``."""
    return dataset.map(
        lambda rows: tokenizer(rows[data_args.text_column], truncation=True, max_length=data_args.max_length),
        batched=True,
    )


def states_for(
    split: datasets.Dataset, text_column: str, backbone: str, max_length: int, below: int
) -> datasets.Dataset:
    """``split`` with the output of the embeddings and the bottom ``below`` layers as ``inputs_embeds``."""
    sentences = split.with_format(None, columns=[text_column])[:][text_column]
    return with_states(split, *bottom_layer_states(backbone, sentences, max_length, below))


def prepare_data(
    data_args: DataArguments, seed: int, below: int, backbone: str, tokenizer, timings: dict
) -> SimpleNamespace:
    """The splits (text, tokens, and the model's inputs: the tokens, or the cached frozen layers' output)."""
    data = SimpleNamespace(below=below)
    data.train, data.validation = load_splits(data_args, seed)
    data.train_tok, data.validation_tok = (
        tokenize(s, tokenizer, data_args) for s in (data.train, data.validation)
    )
    data.train_in, data.validation_in = data.train_tok, data.validation_tok
    data.collator = DataCollatorWithPadding(tokenizer)
    if (
        below
    ):  # the layers below the adapters give every sentence the same output in every step: run them once
        start = time.time()
        data.train_in, data.validation_in = (
            states_for(split, data_args.text_column, backbone, data_args.max_length, below)
            for split in (data.train, data.validation)
        )
        timings["frozen_layers_s"], data.collator = time.time() - start, PadStates()
    return data
