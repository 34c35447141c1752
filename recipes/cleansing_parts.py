"""Pieces of `recipes/cleansing.py`: the data, the classifiers, and the reports."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from common import SmallPreTrainedModel, default_backbone, markdown_table, pyplot, save_figure
from torch import nn
from tqdm.auto import tqdm
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    PretrainedConfig,
    default_data_collator,
)
from transformers.modeling_outputs import SequenceClassifierOutput

from hf_turnover.atomic import atomic_path
from hf_turnover.config import TurnoverArguments
from hf_turnover.data import load_text_classification
from hf_turnover.model import add_turnover


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


@torch.inference_mode()
def encode(model_path: str, sentences: list[str], max_length: int, batch_size: int = 64) -> np.ndarray:
    """Mean-pooled, L2-normalised sentence embeddings ``(N, D)``, as all-MiniLM-L6-v2 was trained to give."""
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    encoder = AutoModel.from_pretrained(model_path).eval()
    order = np.argsort([len(s) for s in sentences], kind="stable")  # similar lengths per batch: less padding
    out = np.empty((len(sentences), encoder.config.hidden_size), dtype=np.float32)
    for start in tqdm(range(0, len(order), batch_size), desc="Encoding sentences"):
        rows = order[start : start + batch_size]
        batch = tokenizer(
            [sentences[i] for i in rows],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        hidden = encoder(**batch).last_hidden_state  # (B, T, D)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        out[rows] = F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1).numpy()
    return out


def cached_encode(args: Any, model_path: str, sentences: list[str], cache_dir: Path) -> np.ndarray:
    key = hashlib.sha256(json.dumps([model_path, args.max_seq_length, sentences]).encode()).hexdigest()[:16]
    path = cache_dir / f"embeddings-{key}.npy"
    if path.is_file():
        return np.load(path)
    embeddings = encode(model_path, sentences, args.max_seq_length)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, embeddings)
    return embeddings


def encode_splits(args: Any, splits: dict[str, datasets.Dataset], output: Path) -> PreparedData:
    """Model inputs for every split: sentence embeddings (frozen setup) or token ids (adapters setup)."""
    path = args.model_name_or_path or default_backbone()
    if args.setup == "frozen":
        cache_dir = Path(args.cache_dir) if args.cache_dir else output / "cache"
        feature = datasets.List(datasets.Value("float32"))
        for name, split in splits.items():
            embeddings = cached_encode(args, path, list(split[args.text_column]), cache_dir)
            splits[name] = split.add_column("sentence_embedding", list(embeddings), feature=feature)
        return PreparedData(
            **splits, collator=default_data_collator, model_path=path, input_size=embeddings.shape[1]
        )
    tokenizer = AutoTokenizer.from_pretrained(path)
    for name, split in splits.items():
        splits[name] = split.map(
            lambda batch: tokenizer(batch[args.text_column], truncation=True, max_length=args.max_seq_length),
            batched=True,
        )
    return PreparedData(**splits, collator=DataCollatorWithPadding(tokenizer), model_path=path)


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
        import adapters

        model = AutoModelForSequenceClassification.from_pretrained(data.model_path, num_labels=num_labels)
        adapters.init(model)
        model.add_adapter("cleansing", config=args.adapter_config)
        model.train_adapter("cleansing")
        n = model.config.num_hidden_layers
        top = "|".join(str(i) for i in range(max(0, n - args.turnover_top_layers), n))
        targets = rf".*\.layer\.(?:{top})\..*\.adapters\.cleansing\.adapter_down"
    if turnover_args:
        if turnover_args.turnover_target_modules is None:  # the set-up's default
            turnover_args = dataclasses.replace(turnover_args, turnover_target_modules=targets)
        add_turnover(model, turnover_args.to_config())
    return model


def without(train: datasets.Dataset, ids: set[int]) -> datasets.Dataset:
    keep = [row for row, i in enumerate(train["instance_id"]) if i not in ids]
    return train.select(keep)


def removed_report(
    scores: datasets.Dataset, train: datasets.Dataset, text_column: str, removed: list[int]
) -> str:
    by_id = dict(zip(scores["train_id"], scores["score"], strict=True))
    rows = [
        [i, f"{by_id[i]:+.4g}", train[i]["label"], train[i][text_column]]
        for i in removed  # ids == row positions
    ]
    title = f"# The {len(removed)} removed training sentences (most negative mean influence first)\n\n"
    return title + markdown_table(["train id", "mean influence", "label", "sentence"], rows)


def format_table(rows: list[dict], n_train: int, n_removed: int, num_seeds: int) -> str:
    headers = [
        f"Condition ({n_train} training sentences, {n_removed} removed, {num_seeds} seeds)",
        "Accuracy (%)",
    ]
    cells = [
        [
            r["condition"],
            f"{100 * r['accuracy_mean']:.1f} +- {100 * r['accuracy_std']:.1f}",
            f"{r['loss_mean']:.3f} +- {r['loss_std']:.3f}",
            f"{r['paper_accuracy_mean']:.1f} +- {r['paper_accuracy_std']:.1f}",
        ]
        for r in rows
    ]
    return markdown_table([*headers, "Loss", "Paper, 1% removed (%)"], cells)


def plot(scores: datasets.Dataset, cutoff: float, rows: list[dict], path: Path) -> None:
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(10, 3.6))
    left.hist(scores["score"], bins=60, color="tab:blue")
    left.axvline(cutoff, color="tab:red", linestyle="--", label="removal cut-off")
    left.set(xlabel="mean influence on the target validation set", ylabel="training sentences", yscale="log")
    left.legend()
    for x, r in enumerate(rows):
        right.scatter([x] * len(r["accuracies"]), 100 * np.array(r["accuracies"]), color="gray", s=12)
        right.errorbar(x + 0.15, 100 * r["accuracy_mean"], yerr=100 * r["accuracy_std"], fmt="o", capsize=4)
    right.set_xticks(range(len(rows)), [r["condition"] for r in rows])
    right.set(ylabel="target test accuracy (%)", title="retrained without turn-over")
    save_figure(fig, path)


def most_harmful(scores: datasets.Dataset, fraction: float) -> list[int]:
    """The ids of the ``fraction`` of training instances with the most negative mean influence, most harmful first."""
    n_remove = max(1, round(fraction * len(scores)))
    order = np.argsort(np.asarray(scores["score"]), kind="stable")
    return [int(scores["train_id"][i]) for i in order[:n_remove]]
