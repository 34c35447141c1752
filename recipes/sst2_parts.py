"""Pieces of `recipes/sst2.py`: data splits, the model, the ordinary-dropout baseline, and the Markdown reports."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from adapters import AdapterConfig, LoRAConfig
from common import markdown_table
from frozen_layers import bottom_layer_states, with_states
from torch import nn
from transformers import AutoConfig, PreTrainedTokenizerBase

from hf_turnover.atomic import atomic_write_text
from hf_turnover.config import TurnoverConfig
from hf_turnover.data import load_text_classification
from hf_turnover.evaluation import explanation_checks
from hf_turnover.explain import explain_prediction, explain_predictions
from hf_turnover.linear import make_scorer
from hf_turnover.lora import LoRARankHook, make_hook
from hf_turnover.model import find_modules
from hf_turnover.modeling_turnover import TurnoverBertForSequenceClassification
from hf_turnover.plots import plot_self_influence
from hf_turnover.results import save_scores
from hf_turnover.wide import wide_adapter_config

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


def tokenize(
    dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, data_args: Any
) -> datasets.Dataset:
    """``dataset`` with the token columns of its ``--text_column``, truncated to ``--max_seq_length``."""
    return dataset.map(
        lambda rows: tokenizer(
            rows[data_args.text_column], truncation=True, max_length=data_args.max_seq_length
        ),
        batched=True,
    )


def frozen_below(model_args: Any, backbone: str, recipe: Any) -> int:
    """How many bottom encoder layers carry nothing that trains (their output can be cached): those below the
    adapters, unless --cache_frozen_layers false or adapters sit in every layer (then 0)."""
    if not recipe.cache_frozen_layers or not model_args.adapter_top_layers:
        return 0
    return max(0, AutoConfig.from_pretrained(backbone).num_hidden_layers - model_args.adapter_top_layers)


def states_for(
    split: datasets.Dataset, text_column: str, backbone: str, max_length: int, below: int
) -> datasets.Dataset:
    """``split`` with the output of the embeddings and the bottom ``below`` layers as ``inputs_embeds``."""
    sentences = split.with_format(None, columns=[text_column])[:][text_column]
    return with_states(split, *bottom_layer_states(backbone, sentences, max_length, below))


def build_model(
    model_args: Any, config: TurnoverConfig, backbone: str
) -> TurnoverBertForSequenceClassification:
    """Backbone + bottleneck adapters (top ``adapter_top_layers`` layers, ``adapter_width`` units each) or LoRA
    (rank ``lora_r`` on query and value of those layers) + classifier, with turn-over masks."""
    backbone_config = AutoConfig.from_pretrained(backbone)
    layers = model_args.adapter_top_layers or backbone_config.num_hidden_layers
    leave_out = list(range(backbone_config.num_hidden_layers - layers))
    if model_args.adapter_config == "lora":
        adapter = LoRAConfig(r=model_args.lora_r, alpha=model_args.lora_alpha, leave_out=leave_out)
    elif model_args.adapter_width:
        adapter = wide_adapter_config(
            backbone_config, model_args.adapter_width, layers, model_args.adapter_config,
            lower_width=model_args.adapter_lower_width or None,
        )  # fmt: skip
    else:
        adapter = AdapterConfig.load(model_args.adapter_config)
        adapter = adapter.replace(leave_out=leave_out)
    model = TurnoverBertForSequenceClassification.from_backbone(
        backbone, num_labels=2, adapter_name="sst2", adapter_config=adapter, turnover=config,
        id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1},
    )  # fmt: skip
    model.bert.pooler.requires_grad_(model_args.train_pooler)
    return model


def add_plain_dropout(model: nn.Module, config: TurnoverConfig) -> nn.Module:
    """Ordinary dropout (drop probability ``1 - p``) on exactly the units turn-over would mask: the baseline.

    LoRA rank units have no module boundary, so they get it through the turn-over hook's recomputation, one draw
    per row and rank unit (as the turn-over masks are drawn)."""
    drop = 1.0 - config.p

    def on_output(module, args, output):
        return F.dropout(output, drop, module.training)

    def on_input(module, args):
        return (F.dropout(args[0], drop, module.training), *args[1:])

    def rank_dropout(module, rows, width, device, dtype):
        if not module.training:
            return None
        return F.dropout(torch.ones(rows, width, device=device, dtype=dtype), drop)  # (B, r)

    for name in find_modules(model, config.target_modules, config.exclude_modules):
        hook = make_hook(model, name, "output", config)
        if isinstance(hook, LoRARankHook):
            hook.register(model.get_submodule(name), rank_dropout)
        else:
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
