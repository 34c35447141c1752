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

import logging
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

from cleansing_parts import (
    PreparedData,
    build_classifier,
    encode_splits,
    format_table,
    load_splits,
    most_harmful,
    plot,
    removed_report,
    without,
)
from common import (
    AccuracyMetric,
    RecipeTrainingArguments,
    mean_std,
    parse_arguments,
    push_outputs,
    train_model,
    write_json,
)

from hf_turnover.atomic import atomic_write_text
from hf_turnover.config import TurnoverArguments
from hf_turnover.influence import mean_influence
from hf_turnover.model import get_turnover_config
from hf_turnover.results import save_scores

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
    hidden_size: int = field(
        default=1536,
        metadata={
            "help": "MLP hidden units, the masked units (frozen setup; wide: see benchmarks/RESULTS.md)."
        },
    )
    hidden_dropout: float = field(default=0.1, metadata={"help": "Ordinary dropout of the retrained models."})
    turnover_top_layers: int = field(
        default=1, metadata={"help": "Adapters setup: mask the adapters of the top N layers (see below)."}
    )
    adapter_config: str = field(default="double_seq_bn", metadata={"help": "Adapters setup: adapter type."})
    influence_method: str = field(
        default="linear",
        metadata={"help": "Mean influence: 'linear' (first order in the masks) or 'exact' (the paper)."},
    )
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
class CleansingTurnoverArguments(TurnoverArguments):
    turnover_target_modules: str | None = field(
        default=None,
        metadata={
            "help": "Modules whose output units are masked (regex, full match). Default: none for --setup frozen "
            "(the MLP's hidden units are masked at the classifier input), the adapters of the top "
            "--turnover_top_layers layers for --setup adapters."
        },
    )


@dataclass
class CleansingTrainingArguments(RecipeTrainingArguments):
    output_dir: str = field(default="runs/cleansing", metadata={"help": "Where the results go."})
    num_train_epochs: float = field(default=4.0, metadata={"help": "Epochs of every training run."})
    per_device_train_batch_size: int = field(default=128, metadata={"help": "Training batch size."})
    per_device_eval_batch_size: int = field(default=256, metadata={"help": "Evaluation batch size."})


def run_conditions(cleansing_args, training_args, data: PreparedData, removed: list[int]) -> list[dict]:
    """Retrain without turn-over under each condition and seed; electronics test accuracy and loss."""
    n_remove = len(removed)
    rows = {name: {"condition": name, "accuracies": [], "losses": []} for name in PAPER}
    seeds = [training_args.seed + offset for offset in range(cleansing_args.num_seeds)]
    for seed in seeds:
        random_ids = set(random.Random(seed).sample(range(len(data.train)), n_remove))
        subsets = {
            "no cleansing": data.train,
            "random removal": without(data.train, random_ids),
            "cleansing": without(data.train, set(removed)),
        }
        for name, train in subsets.items():
            training_args.seed = training_args.data_seed = seed
            build = partial(build_classifier, cleansing_args, None, data)
            trainer = train_model(
                build, training_args, train, data_collator=data.collator, compute_metrics=AccuracyMetric()
            )
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


def main(argv: list[str] | None = None) -> dict:
    """Run the recipe; ``argv`` as on the command line (``None``: ``sys.argv[1:]``). Returns results.json."""
    cleansing_args, turnover_args, training_args = parse_arguments(
        (CleansingArguments, CleansingTurnoverArguments, CleansingTrainingArguments), argv
    )
    started, output, base_seed = time.time(), Path(training_args.output_dir), training_args.seed
    data = encode_splits(cleansing_args, load_splits(cleansing_args), output)

    # 1-2. Train with turn-over masks; mean influence of every training sentence on the target validation set.
    training_args.data_seed = base_seed
    build = partial(build_classifier, cleansing_args, turnover_args, data)
    trainer = train_model(
        build, training_args, data.train, data_collator=data.collator, compute_metrics=AccuracyMetric()
    )
    scores = mean_influence(
        trainer.model, data.train, data.validation, method=cleansing_args.influence_method,
        batch_size=cleansing_args.influence_batch_size,
    )  # fmt: skip
    save_scores(scores, output / "mean_influence.parquet")

    # 3. Remove the most harmful fraction; 4. retrain without turn-over under each condition.
    removed = most_harmful(scores, cleansing_args.remove_fraction)
    text = removed_report(scores, data.train, cleansing_args.text_column, removed)
    atomic_write_text(output / "removed.md", text)
    rows = run_conditions(cleansing_args, training_args, data, removed)
    table = format_table(rows, len(data.train), len(removed), cleansing_args.num_seeds)
    print(table)
    atomic_write_text(output / "table.md", table)
    cutoff = dict(zip(scores["train_id"], scores["score"], strict=True))[removed[-1]]  # least harmful removed
    plot(scores, cutoff, rows, output / "cleansing.png")
    results = {
        "arguments": asdict(cleansing_args),
        "turnover": get_turnover_config(trainer.model).to_dict(),
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
    push_outputs(output, training_args)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
