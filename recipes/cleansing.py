"""Data cleansing with turn-over influence (Kobayashi et al. 2020, section 4.3 and Table 2).

    python recipes/cleansing.py --output_dir runs/cleansing

1. Train a sentiment classifier with turn-over dropout on the movie sentences (bundled Rotten Tomatoes train).
2. Mean influence of every training sentence on the 200 Amazon electronics validation sentences.
3. Remove the 1% of training sentences with the most negative mean influence (they raised the target loss).
4. Retrain WITHOUT turn-over on the cleansed set, on the full set and on the set minus 1% random sentences, for
   4 seeds; report accuracy and loss on the electronics test set (mean +- std).

Writes `table.md`, `results.json`, `cleansing.png`, `removed.md` and `mean_influence.parquet` to --output_dir.

`--setup frozen` (default, sized for a 2-core CPU): the sentence encoder (all-MiniLM-L6-v2, mean pooling) is
frozen and run once per sentence (cached); the classifier is an MLP whose hidden units feed the masked head.
`--setup adapters` (the paper's fine-tuning, sized for a GPU): the encoder with Houlsby adapters, turn-over on
the adapters of the top `--turnover_top_layers` layers and on the classifier input, e.g.

    python recipes/cleansing.py --setup adapters --model_name_or_path bert-base-cased \
        --learning_rate 1e-4 --num_train_epochs 3 --output_dir runs/cleansing_bert
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from common import (
    AccuracyMetric,
    RecipeTrainingArguments,
    SmallPreTrainedModel,
    default_backbone,
    markdown_table,
    mean_std,
    push_folder,
    save_figure,
    write_json,
)
from torch import nn
from tqdm.auto import tqdm
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    PretrainedConfig,
    Trainer,
    default_data_collator,
    set_seed,
)
from transformers.modeling_outputs import SequenceClassifierOutput

from hf_turnover.atomic import atomic_path, atomic_write_text
from hf_turnover.config import TurnoverConfig
from hf_turnover.data import load_text_classification
from hf_turnover.influence import mean_influence
from hf_turnover.model import add_turnover
from hf_turnover.results import save_scores
from hf_turnover.trainer import TurnoverTrainer

logger = logging.getLogger(__name__)
PAPER = {"no cleansing": (77.0, 0.9), "random removal": (76.8, 1.1), "cleansing": (78.3, 0.2)}


@dataclass
class CleansingArguments:
    setup: str = field(
        default="frozen", metadata={"help": "'frozen' (CPU-sized) or 'adapters' (the paper's)."}
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Encoder path or Hub id; default: the offline all-MiniLM-L6-v2."}
    )
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Training set: bundled name or Hub id (default bundled rotten_tomatoes)."},
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "Hub config, e.g. sst2 for glue."}
    )
    target_dataset_name: str = field(
        default="amazon_electronics",
        metadata={"help": "Target domain with validation (influence targets) and test splits."},
    )
    text_column: str = field(default="sentence", metadata={"help": "Text column of both datasets."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use the first N training rows."})
    max_validation_samples: int | None = field(default=None, metadata={"help": "Use the first N targets."})
    max_test_samples: int | None = field(default=None, metadata={"help": "Use the first N test rows."})
    max_seq_length: int = field(default=64, metadata={"help": "Tokens per sentence (longer are truncated)."})
    remove_fraction: float = field(default=0.01, metadata={"help": "Fraction of training rows to remove."})
    num_seeds: int = field(default=4, metadata={"help": "Retraining seeds per condition: seed, seed+1, ..."})
    hidden_size: int = field(default=256, metadata={"help": "MLP hidden units (frozen setup)."})
    hidden_dropout: float = field(default=0.1, metadata={"help": "Ordinary dropout of the retrained models."})
    turnover_p: float = field(default=0.5, metadata={"help": "Keep probability of the turn-over masks."})
    turnover_top_layers: int = field(default=1, metadata={"help": "Adapters setup: masked top layers."})
    adapter_config: str = field(default="double_seq_bn", metadata={"help": "Adapters setup: adapter type."})
    influence_batch_size: int | None = field(
        default=None, metadata={"help": "Training ids per scoring forward (default: sized to the input)."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Sentence-embedding cache (frozen setup)."})

    def __post_init__(self) -> None:
        if self.setup not in ("frozen", "adapters"):
            raise ValueError(f"--setup {self.setup!r} is unknown; use 'frozen' or 'adapters'.")
        if not 0.0 < self.remove_fraction < 1.0:
            raise ValueError(f"--remove_fraction must lie in (0, 1), got {self.remove_fraction}.")
        if self.num_seeds < 1:
            raise ValueError(f"--num_seeds must be >= 1, got {self.num_seeds}.")


@dataclass
class CleansingTrainingArguments(RecipeTrainingArguments):
    output_dir: str = field(default="runs/cleansing", metadata={"help": "Where the results go."})
    num_train_epochs: float = field(default=4.0, metadata={"help": "Epochs of every training run."})
    per_device_train_batch_size: int = field(default=128, metadata={"help": "Training batch size."})
    per_device_eval_batch_size: int = field(default=256, metadata={"help": "Evaluation batch size."})


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


def cached_encode(
    args: CleansingArguments, model_path: str, sentences: list[str], cache_dir: Path
) -> np.ndarray:
    key = hashlib.sha256(json.dumps([model_path, args.max_seq_length, sentences]).encode()).hexdigest()[:16]
    path = cache_dir / f"embeddings-{key}.npy"
    if path.is_file():
        return np.load(path)
    embeddings = encode(model_path, sentences, args.max_seq_length)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, embeddings)
    return embeddings


def encode_splits(
    args: CleansingArguments, splits: dict[str, datasets.Dataset], output: Path
) -> PreparedData:
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


def build_classifier(args: CleansingArguments, data: PreparedData, turnover: bool) -> nn.Module:
    """A fresh classifier for ``args.setup``, with turn-over masks when ``turnover``."""
    num_labels = int(max(data.train["label"])) + 1
    if args.setup == "frozen":
        dropout = 0.0 if turnover else args.hidden_dropout  # turn-over replaces dropout, as in the paper
        config = EmbeddingClassifierConfig(data.input_size, args.hidden_size, dropout, num_labels=num_labels)
        model, masked = EmbeddingClassifier(config), {"target_modules": None}
    else:
        import adapters

        model = AutoModelForSequenceClassification.from_pretrained(data.model_path, num_labels=num_labels)
        adapters.init(model)
        model.add_adapter("cleansing", config=args.adapter_config)
        model.train_adapter("cleansing")
        n = model.config.num_hidden_layers
        top = "|".join(str(i) for i in range(max(0, n - args.turnover_top_layers), n))
        masked = {"target_modules": rf".*\.layer\.(?:{top})\..*\.adapters\.cleansing\.adapter_down"}
    if turnover:
        add_turnover(model, TurnoverConfig(p=args.turnover_p, head_modules="classifier", **masked))
    return model


def load_splits(args: CleansingArguments) -> dict[str, datasets.Dataset]:
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


def train_model(cleansing_args, training_args, data, train, seed: int, turnover: bool):
    """Train one model (turn-over or plain) on ``train`` with ``seed``; returns the trainer."""
    set_seed(seed)  # the model's initial weights depend on the seed too
    training_args.seed = training_args.data_seed = seed
    model = build_classifier(cleansing_args, data, turnover)
    cls = TurnoverTrainer if turnover else Trainer
    trainer = cls(
        model,
        training_args,
        train_dataset=train,
        data_collator=data.collator,
        compute_metrics=AccuracyMetric(),
    )
    trainer.train()
    return trainer


def without(train: datasets.Dataset, ids: set[int]) -> datasets.Dataset:
    keep = [row for row, i in enumerate(train["instance_id"]) if i not in ids]
    return train.select(keep)


def run_conditions(cleansing_args, training_args, data, removed: list[int]) -> list[dict]:
    """Retrain without turn-over under each condition and seed; electronics test accuracy and loss."""
    n_remove = len(removed)
    rows = {name: {"condition": name, "accuracies": [], "losses": []} for name in PAPER}
    seeds = [
        training_args.seed + offset for offset in range(cleansing_args.num_seeds)
    ]  # train_model sets .seed
    for seed in seeds:
        random_ids = set(random.Random(seed).sample(range(len(data.train)), n_remove))
        subsets = {
            "no cleansing": data.train,
            "random removal": without(data.train, random_ids),
            "cleansing": without(data.train, set(removed)),
        }
        for name, train in subsets.items():
            trainer = train_model(cleansing_args, training_args, data, train, seed, turnover=False)
            metrics = trainer.evaluate(data.test, metric_key_prefix="test")
            rows[name]["accuracies"].append(metrics["test_accuracy"])
            rows[name]["losses"].append(metrics["test_loss"])
            logger.info(f"seed {seed} {name}: accuracy {metrics['test_accuracy']:.4f}")
    for row in rows.values():
        row["seeds"] = seeds
        row["accuracy_mean"], row["accuracy_std"] = mean_std(row["accuracies"])
        row["loss_mean"], row["loss_std"] = mean_std(row["losses"])
        row["paper_accuracy_mean"], row["paper_accuracy_std"] = PAPER[row["condition"]]
    return list(rows.values())


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
    lines = [
        f"| Condition ({n_train} training sentences, {n_removed} removed, {num_seeds} seeds) | "
        "Accuracy (%) | Loss | Paper, 1% removed (%) |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['condition']} | {100 * r['accuracy_mean']:.1f} +- {100 * r['accuracy_std']:.1f} | "
            f"{r['loss_mean']:.3f} +- {r['loss_std']:.3f} | "
            f"{r['paper_accuracy_mean']:.1f} +- {r['paper_accuracy_std']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot(scores: datasets.Dataset, cutoff: float, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
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


def main(argv: list[str] | None = None) -> dict:
    """Run the recipe; ``argv`` as on the command line (``None``: ``sys.argv[1:]``). Returns results.json."""
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.INFO)
    parser = HfArgumentParser((CleansingArguments, CleansingTrainingArguments))
    cleansing_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    started = time.time()
    output = Path(training_args.output_dir)
    data = encode_splits(cleansing_args, load_splits(cleansing_args), output)
    base_seed = training_args.seed
    trainer = train_model(cleansing_args, training_args, data, data.train, base_seed, turnover=True)
    scores = mean_influence(
        trainer.model, data.train, data.validation, batch_size=cleansing_args.influence_batch_size
    )
    save_scores(scores, output / "mean_influence.parquet")
    removed = most_harmful(scores, cleansing_args.remove_fraction)
    atomic_write_text(
        output / "removed.md", removed_report(scores, data.train, cleansing_args.text_column, removed)
    )
    rows = run_conditions(cleansing_args, training_args, data, removed)
    table = format_table(rows, len(data.train), len(removed), cleansing_args.num_seeds)
    print(table)
    atomic_write_text(output / "table.md", table)
    cutoff = dict(zip(scores["train_id"], scores["score"], strict=True))[removed[-1]]  # least harmful removed
    plot(scores, cutoff, rows, output / "cleansing.png")
    results = {
        "arguments": asdict(cleansing_args),
        "seed": base_seed,
        "num_train_epochs": training_args.num_train_epochs,
        "learning_rate": training_args.learning_rate,
        "num_train": len(data.train),
        "num_targets": len(data.validation),
        "num_test": len(data.test),
        "removed_train_ids": removed,
        "rows": rows,
        "runtime_s": round(time.time() - started, 1),
    }
    write_json(output / "results.json", results)
    if training_args.push_to_hub:
        print("Pushed to", push_folder(output, training_args.hub_model_id, training_args.hub_token))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
