"""The scoring and reports of `recipes/sst2.py`: self-influence, the explanation checks, the misclassified sentences
explained, the highest self-influence."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from common import markdown_table
from frozen_layers import restore_bottom
from sst2_data import ID_COLUMN
from torch import nn

from hf_turnover.atomic import atomic_write_text
from hf_turnover.evaluation import explanation_checks
from hf_turnover.explain import (
    dataset_pooled_basis,
    explain_prediction,
    explain_predictions,
    training_reference,
)
from hf_turnover.influence import self_influence
from hf_turnover.linear import make_scorer
from hf_turnover.plots import plot_self_influence
from hf_turnover.results import save_scores

logger = logging.getLogger("sst2")


def misclassified_report(
    model: nn.Module,
    train: datasets.Dataset,
    validation: datasets.Dataset,
    logits: np.ndarray,
    validation_tok: datasets.Dataset,
    text_column: str,
    num_explained: int,
    top_k: int,
    method: str = "linear",
    scorer: Any = None,
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
    scorer = scorer or make_scorer(model, method)  # one for all explanations: the model is probed once
    tops = []
    for rank, index in enumerate(order.tolist(), start=1):
        row = validation_tok[index]
        target = {k: row[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in row}
        why = explain_prediction(
            model, train, target, top_k=top_k, restrict_to_label=True, progress=False, scorer=scorer,
            check_fingerprint=rank == 1,  # the same training set every time: hash it once
        )  # fmt: skip
        label = why["prediction"]["label"]  # a label name, as in the pipeline
        lines.append(f"## {rank}. {validation[index][text_column]}\n")
        lines.append(
            f"Gold: **{names[int(gold[index])]}**, predicted: **{label}** (p = {why['prediction']['score']:.3f}).\n"
        )
        rows = [[f"{h['score']:+.4f}", h["label"], f"{h['text']} ({h['train_id']})"] for h in why["helpful"]]
        lines.append(markdown_table(["influence", "label", "training sentence (id)"], rows, right=(0,)))
        tops.append(why["helpful"][0]["train_id"] if why["helpful"] else None)
    lines.insert(
        2,
        f"Scores: `method={method!r}`. {len(set(tops))} distinct training sentences top the {len(tops)} lists "
        "below (the same sentence on top of unrelated errors would point at mask luck, not at a cause).\n",
    )
    return "\n".join(lines) + "\n", len(order)


def check_explanations(
    model: nn.Module,
    train: datasets.Dataset,
    validation_tok: datasets.Dataset,
    recipe: Any,
    scorer: Any = None,
) -> dict[str, Any]:
    """The identical-class rate and the distinct top-k training sentences over the first ``--num_checked``
    validation sentences (never trained on), each explained against the whole training set."""
    queries = validation_tok.select(range(min(recipe.num_checked, len(validation_tok))))
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in queries.column_names]
    targets = queries.select_columns(names).to_list()
    explanations = explain_predictions(
        model, train, targets, top_k=recipe.top_k, method=recipe.method, scorer=scorer
    )
    checks = explanation_checks(explanations, recipe.top_k)
    return {**checks, "method": recipe.method, "queries": f"the first {len(targets)} validation sentences"}


def write_influence_outputs(
    model: nn.Module, train: datasets.Dataset, scores: datasets.Dataset, validation: datasets.Dataset,
    validation_tok: datasets.Dataset, logits: np.ndarray, data_args: Any, recipe: Any, output: Path,
    timings: dict[str, float], scorer: Any = None,
) -> int:  # fmt: skip
    """Self-influence (``scores``) parquet + histogram, and the Markdown report; returns how many errors were
    explained."""
    save_scores(scores, output / "self_influence.parquet")
    plot_self_influence(scores, output / "self_influence.png")
    start, text = time.time(), data_args.text_column
    report, explained = misclassified_report(
        model, train, validation, logits, validation_tok, text, recipe.num_explained, recipe.top_k,
        recipe.method, scorer,
    )  # fmt: skip
    report += top_self_influence(scores, train, text, recipe.top_k)
    timings["explain_s"] = time.time() - start
    atomic_write_text(output / "misclassified.md", report)
    return explained


def top_self_influence(scores: datasets.Dataset, train: datasets.Dataset, text_column: str, k: int) -> str:
    """Markdown: the training sentences with the highest self-influence (memorised, atypical or mislabelled)."""
    position = {int(i): row for row, i in enumerate(train[ID_COLUMN])}
    rows = []
    for item in scores.sort("score", reverse=True).select(range(min(k * 2, len(scores)))):
        row = train[position[int(item["train_id"])]]
        rows.append([f"{item['score']:+.4f}", row["label"], f"{row[text_column]} ({item['train_id']})"])
    intro = (
        "# Highest self-influence training sentences\n\n"
        "`I(z_i, z_i)`: how much training on a sentence lowered its own loss. The largest values flag sentences "
        "the model fits only by memorising them: atypical, ambiguous or mislabelled ones.\n\n"
    )
    return (
        "\n" + intro + markdown_table(["self-influence", "label", "training sentence (id)"], rows, right=(0,))
    )


def score(model, data, recipe, training_args, tokenizer, max_length: int, timings: dict):
    """Self-influence of every training sentence (Figure 7) on the training inputs, with gold labels (so
    ``linear`` for ``centered``: nothing to center), then the model back on token inputs, the centered reference
    (``--method centered``), the pooled basis (always: it travels with the model) and the explanation checks;
    returns (self-influence, reference, basis, scorer, checks)."""
    start = time.time()
    self_method = "linear" if recipe.method in ("centered", "pooled") else recipe.method
    batch_size = training_args.per_device_eval_batch_size
    self_scores = self_influence(model, data.train_in, batch_size=batch_size, method=self_method)
    timings["self_influence_s"] = time.time() - start
    start = time.time()  # the pooled method's groups, saved with the model: one pass on the cached inputs
    basis = dataset_pooled_basis(model, data.train_in, batch_size=batch_size)
    timings["pooled_basis_s"] = time.time() - start
    if data.below:
        restore_bottom(model)  # token inputs again: explanations, saving and pushing
    reference, start = None, time.time()
    if recipe.method == "centered":
        reference = training_reference(model, tokenizer, data.train, max_length=max_length)
        timings["centered_reference_s"] = time.time() - start
    pooled = basis if recipe.method == "pooled" else None
    scorer = make_scorer(model, recipe.method, reference, basis=pooled)  # one for the checks and the report
    checks, start = None, time.time()
    if recipe.num_checked:
        checks = check_explanations(model, data.train, data.validation_tok, recipe, scorer)
        timings["explanation_checks_s"] = time.time() - start
        logger.info(f"Explanation checks: {checks}")
    return self_scores, reference, basis, scorer, checks
