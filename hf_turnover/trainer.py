"""`TurnoverTrainer`: a `transformers.Trainer` that trains every instance on its own sub-network."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import datasets
import torch
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.utils import logging

from .config import TurnoverConfig
from .context import as_instance_ids, turnover_context
from .fingerprint import FINGERPRINT_KEY, training_fingerprint
from .masks import MASK_MODES
from .model import add_turnover, get_turnover_config, turnover_layers
from .reuse import keep_positions, read_positions, tail_entry

logger = logging.get_logger(__name__)


@dataclass
class TurnoverTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the turn-over fields."""

    turnover_eval_mode: str = field(
        default="full",
        metadata={
            "help": "Network used by evaluate() and predict(): 'full' (no mask), or 'own'/'flip' masks of each "
            "row's instance id (eval rows then need ids)."
        },
    )
    turnover_add_row_ids: bool = field(
        default=True,
        metadata={
            "help": "Add the row index as the id column to a datasets.Dataset that has none, before shuffling."
        },
    )

    turnover_read_positions_only: bool = field(
        default=True,
        metadata={
            "help": "In training, run the layers after the last attention only at the positions the loss reads "
            "([CLS] for BERT-style sequence classifiers): the same loss and gradients, and a wide adapter in the "
            "top layer costs one position instead of every token."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.turnover_eval_mode not in MASK_MODES:
            raise ValueError(
                f"turnover_eval_mode={self.turnover_eval_mode!r} is unknown; use one of {MASK_MODES}."
            )


def _as_int(value: Any, column: str) -> int:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if hasattr(value, "item") and not isinstance(value, (int, float)):
        value = value.item()  # numpy scalars
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"Column {column!r} must hold integers, got {value!r} ({type(value).__name__}). Cast it, e.g. "
            f"dataset.cast_column({column!r}, datasets.Value('int64'))."
        )
    return value


class TurnoverCollator:
    """Wraps a data collator: takes the id column out of each feature, collates the rest, adds the ids back."""

    def __init__(self, collator: Callable, id_column: str) -> None:
        self.collator = collator
        self.id_column = id_column

    def __call__(self, features: list[Mapping[str, Any]]) -> dict[str, Any]:
        if not all(isinstance(f, Mapping) for f in features):
            raise TypeError(
                "TurnoverTrainer needs dataset rows as dicts so the instance id can travel with them."
            )
        has_id = [self.id_column in f for f in features]
        if not any(has_id):
            return self.collator(features)
        if not all(has_id):
            raise KeyError(
                f"Some rows of the batch have no {self.id_column!r} column; every row needs an id."
            )
        ids = as_instance_ids([_as_int(f[self.id_column], self.id_column) for f in features], self.id_column)
        batch = self.collator([{k: v for k, v in f.items() if k != self.id_column} for f in features])
        batch[self.id_column] = ids
        return batch


class TurnoverTrainer(Trainer):
    """Trains with each row's own mask; evaluates with ``args.turnover_eval_mode`` (``full`` by default).

    The model must carry turn-over layers (:func:`hf_turnover.add_turnover`), or pass ``turnover_config`` to
    add them here. Every training row needs an integer id in the config's ``id_column``; a
    ``datasets.Dataset`` without one gets its row index before any shuffling.
    """

    def __init__(self, model: nn.Module | None = None, args: TrainingArguments | None = None, *pos, **kwargs):
        turnover_config: TurnoverConfig | None = kwargs.pop("turnover_config", None)
        if model is not None and not turnover_layers(model):
            if turnover_config is None:
                raise ValueError(
                    f"{type(model).__name__} has no turn-over layers. Call hf_turnover.add_turnover(model, "
                    "TurnoverConfig(...)) first, or pass turnover_config= to TurnoverTrainer."
                )
            add_turnover(model, turnover_config)
        args = args if args is not None else TurnoverTrainingArguments(output_dir="turnover_output")
        super().__init__(model, args, *pos, **kwargs)
        self.turnover_config = get_turnover_config(self.model)
        self.id_column = self.turnover_config.id_column
        self.eval_mode = getattr(self.args, "turnover_eval_mode", "full")
        self.train_dataset = self._with_ids(self.train_dataset, "train_dataset")
        if isinstance(self.train_dataset, datasets.Dataset):
            # Recorded before column pruning, so influence scoring can check it gets the same instances.
            fingerprint = training_fingerprint(self.train_dataset, self.id_column)
            setattr(self.model.config, FINGERPRINT_KEY, fingerprint)
        self.data_collator = TurnoverCollator(self.data_collator, self.id_column)

    def _with_ids(self, dataset: Any, name: str) -> Any:
        if isinstance(dataset, datasets.Dataset) and self.id_column not in dataset.column_names:
            if not getattr(self.args, "turnover_add_row_ids", True):
                raise ValueError(self._missing_ids_message(name))
            logger.warning(
                f"{name} has no {self.id_column!r} column: using the row index as the instance id. Score "
                "influences later against this same dataset, in this order."
            )
            return dataset.add_column(self.id_column, list(range(len(dataset))))
        if isinstance(dataset, torch.utils.data.Dataset) and not isinstance(dataset, datasets.Dataset):
            first = dataset[0] if hasattr(dataset, "__getitem__") and len(dataset) else None
            if isinstance(first, Mapping) and self.id_column not in first:
                raise ValueError(self._missing_ids_message(name))
        return dataset

    def _missing_ids_message(self, name: str) -> str:
        return (
            f"{name} has no {self.id_column!r} column, but turn-over training needs an integer id per instance. "
            f"Add one before shuffling: dataset = dataset.map(lambda row, i: {{{self.id_column!r}: i}}, "
            "with_indices=True), or return it from your torch Dataset's __getitem__."
        )

    def _set_signature_columns_if_needed(self) -> None:
        # Keep the id column through both pruning paths (datasets columns and RemoveColumnsCollator).
        super()._set_signature_columns_if_needed()
        if self.id_column not in self._signature_columns:
            self._signature_columns.append(self.id_column)

    def _pop_ids(self, inputs: dict[str, Any], required: bool) -> torch.Tensor | None:
        ids = inputs.pop(self.id_column, None)
        if ids is None and required:
            raise ValueError(self._missing_ids_message("this batch"))
        if ids is not None and len(ids) != _batch_size(inputs):
            raise ValueError(f"{len(ids)} instance ids for a batch of {_batch_size(inputs)} rows.")
        if isinstance(ids, torch.Tensor):  # once per batch, not once per masked layer
            ids = ids.to(self.args.device)
        return ids

    def training_step(self, model: nn.Module, inputs: dict[str, Any], *args, **kwargs) -> torch.Tensor:
        # The contexts span forward and backward, so gradient checkpointing recomputes with the same masks.
        ids = self._pop_ids(inputs, required=True)
        slicing = self._read_positions_only(inputs)  # probes the model once, outside any turn-over context
        with turnover_context(ids, "own"), slicing:
            return super().training_step(model, inputs, *args, **kwargs)

    def _read_positions_only(self, inputs: dict[str, Any]):
        """Slice the inputs of the first module after the last attention to the positions the loss reads."""
        positions = read_positions(self.model)
        tokens = inputs.get("input_ids", inputs.get("inputs_embeds"))  # (B, T) or (B, T, D)
        if (
            not getattr(self.args, "turnover_read_positions_only", True)
            or positions is None
            or tokens is None
        ):
            return nullcontext()
        if not hasattr(self, "_tail_entry"):  # the same for every batch: probe once, on one row
            probe = {k: v[:1] for k, v in inputs.items() if isinstance(v, torch.Tensor) and k != "labels"}
            self._tail_entry = tail_entry(self.model, probe)
        if self._tail_entry is None:
            return nullcontext()
        return keep_positions(self.model, self._tail_entry, positions, tokens.shape[1])

    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], *args, **kwargs):
        ids = self._pop_ids(inputs, required=self.eval_mode != "full")
        if self.eval_mode == "full":
            return super().prediction_step(model, inputs, *args, **kwargs)
        with turnover_context(ids, self.eval_mode):
            return super().prediction_step(model, inputs, *args, **kwargs)


def _batch_size(inputs: dict[str, Any]) -> int:
    return next(len(v) for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
