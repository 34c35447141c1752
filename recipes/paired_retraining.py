"""Retraining under several conditions on the same minibatches: the differences between conditions are then the
removed instances, not a new shuffle (used by `cleansing.py`).

``fixed_batches`` draws one epoch's minibatches as ``Trainer`` would for a seed (length-grouped when the dataset
has a ``length`` column, as ``group_by_length``); ``skip_rows`` takes rows out of them in place, so every other
row meets the same batch-mates at the same step and the learning-rate schedule keeps its length;
``FixedBatchesTrainer`` trains on exactly those batches, every epoch.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import datasets
import torch
from torch.utils.data import DataLoader
from transformers import Trainer
from transformers.trainer_pt_utils import get_length_grouped_indices


def fixed_batches(train: datasets.Dataset, batch_size: int, seed: int) -> list[list[int]]:
    """One epoch's minibatches (row positions of ``train``) for ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    if "length" in train.column_names:
        lengths = train.with_format("numpy", columns=["length"])[:]["length"].tolist()
        order = get_length_grouped_indices(lengths, batch_size, generator=generator)
    else:
        order = torch.randperm(len(train), generator=generator).tolist()
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def skip_rows(batches: list[list[int]], rows: Iterable[int]) -> list[list[int]]:
    """``batches`` without ``rows``, each batch keeping its place (a batch left empty is dropped)."""
    rows = set(rows)
    kept = [[row for row in batch if row not in rows] for batch in batches]
    return [batch for batch in kept if batch]


class FixedBatchesTrainer(Trainer):
    """A ``Trainer`` whose every epoch runs exactly ``batches`` (row positions of the training set), in order."""

    def __init__(self, *args: Any, batches: list[list[int]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batches = batches

    def get_train_dataloader(self) -> DataLoader:
        dataset = self.train_dataset
        if self.args.remove_unused_columns and isinstance(dataset, datasets.Dataset):
            dataset = self._remove_unused_columns(dataset, description="training")
        loader = DataLoader(
            dataset, batch_sampler=self.batches, collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory,
        )  # fmt: skip
        return self.accelerator.prepare(loader)
