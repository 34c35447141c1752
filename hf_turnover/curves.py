"""Learning curves under own and flipped masks (the paper's Figure 2), logged during training."""

from __future__ import annotations

from typing import Any

import datasets
import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .inputs import padded_batches
from .model import get_turnover_config
from .scorer import TurnoverScorer


class LearningCurveCallback(TrainerCallback):
    """Logs the mean loss of ``train_subset`` under its own masks and under its flipped masks.

    ``turnover_own_loss`` falls as the model fits the instances; ``turnover_flip_loss`` is the loss of
    sub-networks that never saw them, i.e. a held-out loss for the same instances: the gap between the two is
    what turn-over influence reads. With ``eval_dataset`` the full network's loss on it is logged as
    ``turnover_eval_loss``. Logged every ``every_n_steps`` steps (and at the end) into ``state.log_history``.
    """

    def __init__(
        self,
        train_subset: datasets.Dataset,
        eval_dataset: datasets.Dataset | None = None,
        every_n_steps: int = 50,
        batch_size: int = 32,
    ) -> None:
        self.train_subset = train_subset
        self.eval_dataset = eval_dataset
        self.every_n_steps = every_n_steps
        self.batch_size = batch_size

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if state.global_step % self.every_n_steps == 0 or state.global_step == state.max_steps:
            self._log(state, kwargs["model"])

    def _log(self, state: TrainerState, model: torch.nn.Module) -> None:
        was_training = model.training
        scorer = TurnoverScorer(model)
        id_column = get_turnover_config(model).id_column
        entry: dict[str, Any] = {"step": state.global_step, "epoch": state.epoch}
        entry["turnover_own_loss"] = _mean_loss(scorer, self.train_subset, id_column, "own", self.batch_size)
        entry["turnover_flip_loss"] = _mean_loss(
            scorer, self.train_subset, id_column, "flip", self.batch_size
        )
        if self.eval_dataset is not None:
            entry["turnover_eval_loss"] = _mean_loss(scorer, self.eval_dataset, None, "full", self.batch_size)
        state.log_history.append(entry)
        model.train(was_training)


@torch.inference_mode()
def _mean_loss(scorer: TurnoverScorer, data: datasets.Dataset, id_column: str | None, mode: str, size: int):
    scorer.model.eval()
    total = 0.0
    for rows, inputs, y in padded_batches(data, scorer.model, size, scorer.device):
        ids = (
            torch.as_tensor([r[id_column] for r in rows])
            if id_column
            else torch.zeros(len(rows), dtype=torch.long)
        )
        total += scorer.losses(inputs, y, ids, mode, broadcast=False).sum().item()
    return total / len(data)
