"""Pieces of `recipes/cleansing.py`: the data, the classifiers, and the reports."""

from __future__ import annotations

import dataclasses
import textwrap
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import adapters
import datasets
import numpy as np
import torch
import torch.nn.functional as F
from common import SmallPreTrainedModel, default_backbone, markdown_table, mean_std, pyplot, save_figure
from frozen_layers import (
    PadStates,
    bottom_layer_states,
    cached,
    cut_bottom,
    length_sorted_batches,
    with_states,
)
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    default_data_collator,
)
from transformers.modeling_outputs import SequenceClassifierOutput

from hf_turnover.config import TurnoverArguments
from hf_turnover.data import load_text_classification
from hf_turnover.explain import reference_rows
from hf_turnover.model import add_turnover
from hf_turnover.reuse import tail_entry
from hf_turnover.wide import wide_adapter_config


class EmbeddingClassifierConfig(PretrainedConfig):
    model_type = "turnover_embedding_classifier"

    def __init__(
        self, input_size: int = 384, hidden_size: int = 256, hidden_dropout_prob: float = 0.1, **kwargs
    ):
        super().__init__(**kwargs)
        self.input_size, self.hidden_size, self.hidden_dropout_prob = (
            input_size,
            hidden_size,
            hidden_dropout_prob,
        )


class EmbeddingClassifier(SmallPreTrainedModel):
    """An MLP on frozen sentence embeddings; turn-over masks its hidden units at the classifier's input."""

    config_class = EmbeddingClassifierConfig

    def __init__(self, config: EmbeddingClassifierConfig) -> None:
        super().__init__(config)
        self.dense = nn.Linear(config.input_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, sentence_embedding: torch.Tensor, labels: torch.Tensor | None = None):
        hidden = self.dropout(torch.relu(self.dense(sentence_embedding)))  # (B, H)
        logits = self.classifier(hidden)  # (B, C)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


@dataclass
class PreparedData:
    train: datasets.Dataset
    validation: datasets.Dataset
    test: datasets.Dataset
    collator: object
    model_path: str
    input_size: int = 0
    cached_layers: int = 0  # adapters setup: the bottom layers whose output the splits hold


@torch.inference_mode()
def encode(model_path: str, sentences: list[str], max_length: int, batch_size: int = 64) -> np.ndarray:
    """Mean-pooled, L2-normalised sentence embeddings ``(N, D)``, as all-MiniLM-L6-v2 was trained to give."""
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    encoder = AutoModel.from_pretrained(model_path).eval()
    out = np.empty((len(sentences), encoder.config.hidden_size), dtype=np.float32)
    for rows, batch in length_sorted_batches(
        tokenizer, sentences, max_length, batch_size, "Encoding sentences"
    ):
        hidden = encoder(**batch).last_hidden_state  # (B, T, D)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        out[rows] = F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1).numpy()
    return out


def encode_splits(args: Any, splits: dict[str, datasets.Dataset], output: Path) -> PreparedData:
    """Model inputs for every split: sentence embeddings (frozen setup) or the cached output of the layers below
    the adapters (adapters setup)."""
    path = args.model_name_or_path or default_backbone()
    cache_dir = Path(args.cache_dir) if args.cache_dir else output / "cache"
    if args.setup == "frozen":
        feature = datasets.List(datasets.Value("float32"))
        for name, split in splits.items():
            sentences = list(split[args.text_column])
            compute = lambda sentences=sentences: (encode(path, sentences, args.max_seq_length),)  # noqa: E731
            (embeddings,) = cached(compute, cache_dir, "embeddings", path, args.max_seq_length, sentences)
            splits[name] = split.add_column("sentence_embedding", list(embeddings), feature=feature)
        return PreparedData(
            **splits, collator=default_data_collator, model_path=path, input_size=embeddings.shape[1]
        )
    below = AutoConfig.from_pretrained(path).num_hidden_layers - args.adapter_layers
    for name, split in splits.items():
        sentences = list(split[args.text_column])
        compute = partial(bottom_layer_states, path, sentences, args.max_seq_length, below)
        states, offsets = cached(compute, cache_dir, "states", path, args.max_seq_length, below, sentences)
        splits[name] = with_states(split, states, offsets)
    return PreparedData(**splits, collator=PadStates(), model_path=path, cached_layers=below)


def load_splits(args: Any) -> dict[str, datasets.Dataset]:
    """Training sentences and the target domain's validation/test sentences, truncated by the max_* flags."""
    train = load_text_classification(args.dataset_name, args.dataset_config_name)["train"]
    target = load_text_classification(args.target_dataset_name)
    splits = {"train": train, "validation": target["validation"], "test": target["test"]}
    limits = {"train": args.max_train_samples, "validation": args.max_validation_samples}
    limits["test"] = args.max_test_samples
    for name, limit in limits.items():
        if limit is not None:
            splits[name] = splits[name].select(range(min(limit, len(splits[name]))))
    # Ids are the row positions of the training set as used here (after --max_train_samples).
    train = splits["train"]
    if "instance_id" in train.column_names:
        train = train.remove_columns("instance_id")
    splits["train"] = train.add_column("instance_id", list(range(len(train))))
    return splits


def build_classifier(args: Any, turnover_args: TurnoverArguments | None, data: PreparedData) -> nn.Module:
    """A fresh classifier for ``args.setup``, with turn-over masks unless ``turnover_args`` is ``None``."""
    num_labels = int(max(data.train["label"])) + 1
    if args.setup == "frozen":
        dropout = 0.0 if turnover_args else args.hidden_dropout  # turn-over replaces dropout, as in the paper
        config = EmbeddingClassifierConfig(data.input_size, args.hidden_size, dropout, num_labels=num_labels)
        model, targets = EmbeddingClassifier(config), ""
    else:
        model = adapter_classifier(args, data.model_path, num_labels, data.cached_layers)
        n = model.config.num_hidden_layers
        top = "|".join(str(i) for i in range(n - (args.turnover_top_layers or args.adapter_layers), n))
        targets = rf"bert\.encoder\.layer\.(?:{top})\.output\.adapters\.cleansing\.adapter_down"
    if turnover_args:
        if turnover_args.turnover_target_modules is None:  # the set-up's default
            turnover_args = dataclasses.replace(turnover_args, turnover_target_modules=targets)
        add_turnover(model, turnover_args.to_config())
    return model


def adapter_classifier(args: Any, path: str, num_labels: int, cached_layers: int) -> nn.Module:
    """The backbone with ``seq_bn`` adapters in its top ``args.adapter_layers`` layers (``args.adapter_width``
    units in the top one, ``args.lower_adapter_width`` below it) and a classifier; only the adapters and the
    classifier train. The embeddings and the bottom ``cached_layers`` layers are replaced by pass-throughs: the
    inputs are their cached output. After the last attention only [CLS] is computed (all the classifier reads)."""
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    n, hidden = model.config.num_hidden_layers, model.config.hidden_size
    adapter = wide_adapter_config(model.config, args.lower_adapter_width, args.adapter_layers)
    factors = {
        **adapter.reduction_factor,
        str(n - 1): hidden / (args.adapter_width + 0.5),
    }  # as wide.py rounds
    adapters.init(model)
    model.add_adapter("cleansing", config=adapter.replace(reduction_factor=factors))
    model.train_adapter("cleansing")
    cut_bottom(model, cached_layers)
    probe = {"inputs_embeds": torch.zeros(1, 2, hidden), "attention_mask": torch.ones(1, 2, dtype=torch.long)}
    entry = tail_entry(model, probe)
    if entry is not None:
        model.get_submodule(entry).register_forward_pre_hook(_first_position, with_kwargs=True)
    return model


def _first_position(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    def cut(x: Any) -> Any:
        return x[:, :1] if isinstance(x, torch.Tensor) and x.dim() >= 2 else x  # (B, T, ...) -> (B, 1, ...)

    return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}


def reference_batches(train: datasets.Dataset, collator: Any, batch_size: int = 64):
    """Model inputs (no labels) of the training rows the library averages into the centered method's reference
    (:func:`hf_turnover.explain.reference_rows`)."""
    rows = reference_rows(len(train))
    columns = [c for c in ("inputs_embeds", "sentence_embedding", "label") if c in train.column_names]
    train = train.select_columns(columns)
    for start in range(0, len(rows), batch_size):
        batch = collator([train[int(row)] for row in rows[start : start + batch_size]])
        yield {k: v for k, v in batch.items() if k not in ("labels", "label")}


def without_rows(train: datasets.Dataset, rows: list[int]) -> datasets.Dataset:
    """``train`` without the rows at positions ``rows``."""
    skipped = set(rows)
    return train.select([row for row in range(len(train)) if row not in skipped])


def removed_report(
    by_id: dict[int, float], train: datasets.Dataset, text_column: str, removed: list[int]
) -> str:
    rows = [
        [i, f"{by_id[i]:+.4g}", train[i]["label"], train[i][text_column]]
        for i in removed  # ids == row positions
    ]
    title = f"# The {len(removed)} removed training sentences (most negative mean influence first)\n\n"
    return title + markdown_table(["train id", "mean influence", "label", "sentence"], rows)


PAPER = {"no removal": [77.0, 0.9], "random removal": [76.8, 1.1], "turn-over mean influence": [78.3, 0.2]}


def mean_se(values) -> tuple[float, float]:
    """Mean and standard error (sample std / sqrt(n); 0.0 for one value)."""
    mean, std = mean_std(values)
    return mean, float(std / np.sqrt(len(values)))


def summarize(rows: list[dict], seeds: list[int]) -> list[dict]:
    """Means and standard errors per condition, and each condition minus random / no removal paired by seed."""
    by_name = {r["condition"]: r for r in rows}
    for row in rows:
        row["seeds"] = seeds
        row["accuracy_mean"], row["accuracy_se"] = mean_se(row["accuracies"])
        row["loss_mean"], row["loss_se"] = mean_se(row["losses"])
        for other, key in (("random removal", "vs_random"), ("no removal", "vs_none")):
            diffs = np.subtract(row["accuracies"], by_name[other]["accuracies"])
            row[f"accuracy_{key}"] = diffs.tolist()
            row[f"accuracy_{key}_mean"], row[f"accuracy_{key}_se"] = mean_se(diffs)
        row["paper_accuracy"] = PAPER.get(row["condition"])
    return rows


def removal_stats(
    removals: dict[str, list[int]], rankings: dict[str, dict[int, float]], train, train_loss
) -> dict:
    """Per method: share of positive labels and of sentences the turn-over model gets wrong among the removed
    (training loss > ln 2, i.e. the given label has probability < 0.5: mislabelled or ambiguous candidates), the
    overlap with the other removal sets, and the Spearman correlation of the full rankings."""
    labels = np.asarray(train["label"])
    wrong = np.asarray(train_loss) > np.log(2.0)
    names = list(removals)
    order = {n: np.argsort(np.argsort([rankings[n][i] for i in range(len(labels))])) for n in names}
    out = {"base_positive": float(labels.mean()), "base_misclassified": float(wrong.mean())}
    for name, ids in removals.items():
        out[name] = {
            "positive": float(labels[ids].mean()),
            "misclassified": float(wrong[ids].mean()),
            "overlap": {other: len(set(ids) & set(removals[other])) for other in names if other != name},
            "spearman": {
                other: float(np.corrcoef(order[name], order[other])[0, 1]) for other in names if other != name
            },
        }
    out["random_overlap_expected"] = len(next(iter(removals.values()))) ** 2 / len(labels)
    return out


def _cell(mean: float, se: float, scale: float = 100.0, signed: bool = False) -> str:
    return f"{scale * mean:{'+' if signed else ''}.2f} +- {scale * se:.2f}"


def format_table(rows: list[dict], n_train: int, n_removed: int, num_seeds: int) -> str:
    headers = [
        f"Condition ({n_train} training sentences, {n_removed} removed, {num_seeds} seeds)",
        "Test accuracy (%)",
        "minus random removal (points, paired)",
        "minus no removal (points, paired)",
        "Test loss",
        "Paper, 1% removed (%)",
    ]
    cells = [
        [
            r["condition"],
            _cell(r["accuracy_mean"], r["accuracy_se"]),
            _cell(r["accuracy_vs_random_mean"], r["accuracy_vs_random_se"], signed=True),
            _cell(r["accuracy_vs_none_mean"], r["accuracy_vs_none_se"], signed=True),
            _cell(r["loss_mean"], r["loss_se"], scale=1.0),
            "{:.1f} +- {:.1f}".format(*r["paper_accuracy"]) if r["paper_accuracy"] else "",
        ]
        for r in rows
    ]
    return (
        markdown_table(headers, cells)
        + "\nMean +- standard error over seeds (std / sqrt(n)); the paper's column is mean +- std.\n"
    )


def plot(scores: datasets.Dataset, cutoff: float, rows: list[dict], path: Path) -> None:
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(12, 3.8), gridspec_kw={"width_ratios": [1, 1.5]})
    left.hist(scores["score"], bins=60, color="tab:blue")
    left.axvline(cutoff, color="tab:red", linestyle="--", label="removal cut-off")
    left.set(
        xlabel="turn-over mean influence on the target validation set",
        ylabel="training sentences",
        yscale="log",
    )
    left.legend()
    for x, r in enumerate(rows):
        right.scatter([x] * len(r["accuracies"]), 100 * np.array(r["accuracies"]), color="gray", s=12)
        right.errorbar(x + 0.15, 100 * r["accuracy_mean"], yerr=100 * r["accuracy_se"], fmt="o", capsize=4)
    names = [textwrap.fill(r["condition"].replace("_", " "), 9) for r in rows]
    right.set_xticks(range(len(rows)), names, fontsize=8)
    right.set(
        ylabel="target test accuracy (%)", title="retrained without turn-over (mean +- SE, seeds in gray)"
    )
    save_figure(fig, path)


def most_harmful(by_id: dict[int, float], fraction: float) -> list[int]:
    """The ids of the ``fraction`` of training instances with the most negative score, most harmful first."""
    n_remove = max(1, round(fraction * len(by_id)))
    ids = list(by_id)
    order = np.argsort(np.asarray([by_id[i] for i in ids]), kind="stable")
    return [int(ids[i]) for i in order[:n_remove]]
