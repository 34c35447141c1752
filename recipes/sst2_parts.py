"""Pieces of `recipes/sst2.py`: data splits, the ordinary-dropout baseline, and the Markdown reports."""

from __future__ import annotations

import time
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer

from hf_turnover.config import TurnoverConfig
from hf_turnover.data import load_text_classification
from hf_turnover.explain import explain_prediction
from hf_turnover.model import find_modules
from hf_turnover.scorer import TurnoverScorer

ID_COLUMN = "instance_id"


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


def add_plain_dropout(model: nn.Module, config: TurnoverConfig) -> nn.Module:
    """Ordinary dropout (drop probability ``1 - p``) on exactly the units turn-over would mask: the baseline."""
    drop = 1.0 - config.p

    def on_output(module, args, output):
        return F.dropout(output, drop, module.training)

    def on_input(module, args):
        return (F.dropout(args[0], drop, module.training), *args[1:])

    for name in find_modules(model, config.target_modules, config.exclude_modules):
        model.get_submodule(name).register_forward_hook(on_output)
    for name in find_modules(model, config.head_modules, config.exclude_modules):
        model.get_submodule(name).register_forward_pre_hook(on_input)
    return model


def misclassified_report(
    model: nn.Module,
    train: datasets.Dataset,
    validation: datasets.Dataset,
    logits: np.ndarray,
    validation_tok: datasets.Dataset,
    text_column: str,
    num_explained: int,
    top_k: int,
) -> tuple[str, int]:
    """Markdown: the most confidently misclassified validation sentences, each with the training sentences
    carrying the (wrong) predicted label that pushed the model towards it most (the paper's Figures 3-4)."""
    probabilities = torch.from_numpy(logits).float().softmax(-1)
    predicted = probabilities.argmax(-1)
    gold = torch.tensor(validation["label"])
    wrong = torch.nonzero(predicted != gold).flatten()
    order = wrong[torch.argsort(probabilities[wrong, predicted[wrong]], descending=True)][:num_explained]
    names = model.config.id2label
    lines = [
        "# Misclassified validation sentences and the training sentences behind the errors\n",
        f"{len(wrong)} of {len(validation)} validation sentences are misclassified; the {len(order)} most confident "
        "errors follow. For each, the training sentences **with the error label** ranked by influence on the "
        "wrong prediction, `I(z_t, z_i) = L(flip mask of z_i, z_t) - L(own mask of z_i, z_t)` for the predicted "
        "label: **positive = training on z_i pushed the model towards the error.**\n",
    ]
    scorer = TurnoverScorer(model)  # one for all explanations: the model is probed once
    for rank, index in enumerate(order.tolist(), start=1):
        row = validation_tok[index]
        target = {k: row[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in row}
        why = explain_prediction(
            model, train, target, top_k=top_k, restrict_to_label=True, progress=False, scorer=scorer,
            check_fingerprint=rank == 1,  # the same training set every time: hash it once
        )  # fmt: skip
        label = names[why["prediction"]["label"]]
        lines.append(f"## {rank}. {validation[index][text_column]}\n")
        lines.append(
            f"Gold: **{names[int(gold[index])]}**, predicted: **{label}** (p = {why['prediction']['score']:.3f}).\n"
        )
        lines.append("| influence | label | training sentence (id) |\n|---:|---|---|")
        for item in why["helpful"]:
            lines.append(
                f"| {item['score']:+.4f} | {names[item['label']]} | {_cell(item['text'])} ({item['train_id']}) |"
            )
        lines.append("")
    return "\n".join(lines) + "\n", len(order)


def top_self_influence(scores: datasets.Dataset, train: datasets.Dataset, text_column: str, k: int) -> str:
    """Markdown: the training sentences with the highest self-influence (memorised, atypical or mislabelled)."""
    position = {int(i): row for row, i in enumerate(train[ID_COLUMN])}
    top = scores.sort("score", reverse=True).select(range(min(k * 2, len(scores))))
    lines = [
        "# Highest self-influence training sentences\n",
        "`I(z_i, z_i)`: how much training on a sentence lowered its own loss. The largest values flag sentences "
        "the model fits only by memorising them: atypical, ambiguous or mislabelled ones.\n",
        "| self-influence | label | training sentence (id) |",
        "|---:|---|---|",
    ]
    for item in top:
        row = train[position[int(item["train_id"])]]
        lines.append(
            f"| {item['score']:+.4f} | {row['label']} | {_cell(row[text_column])} ({item['train_id']}) |"
        )
    return "\n" + "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def train_and_evaluate(trainer: Trainer, eval_dataset: datasets.Dataset) -> tuple[float, np.ndarray, float]:
    """(accuracy, logits on ``eval_dataset``, seconds) after training."""
    start = time.time()
    trainer.train()
    # group_by_length also reorders evaluation batches (randomly): predict in dataset order instead.
    grouped, trainer.args.group_by_length = trainer.args.group_by_length, False
    try:
        prediction = trainer.predict(eval_dataset)
    finally:
        trainer.args.group_by_length = grouped
    if not np.array_equal(prediction.label_ids, np.asarray(eval_dataset["label"])):
        raise RuntimeError(
            "Predictions came back in another order than the evaluation set; cannot report them."
        )
    return float(prediction.metrics["test_accuracy"]), prediction.predictions, time.time() - start
