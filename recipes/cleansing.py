"""Data cleansing with turn-over influence (Kobayashi et al. 2020, section 4.3 and Table 2).

    python recipes/cleansing.py --output_dir runs/cleansing

1. Train a sentiment classifier with turn-over dropout on the movie sentences (bundled Rotten Tomatoes train,
   8,454 sentences): all-MiniLM-L6-v2 with ``seq_bn`` bottleneck adapters in its top 3 layers (1,536 units in the
   top one, 384 in the two below), turn-over masks on those adapters and on the classifier input.
2. Mean influence (linearized; centered: ``--centered``; pooled: ``--pooled``) of every training sentence on the
   200 Amazon electronics validation sentences; the peer scores (gradient dot product, last-layer influence function,
   training loss) on the same model.
3. Remove the 1% of training sentences with the most negative score (they raised the target loss) by each method.
4. Retrain WITHOUT turn-over (ordinary dropout) on the full set, on the set minus 1% random sentences and on each
   cleansed set, for 4 seeds; report accuracy and loss on the 3,410 electronics test sentences (mean +- standard
   error) and each condition minus random removal, paired by seed. With ``--paired_batches`` (default) every
   condition of a seed trains on the same minibatches with its removed sentences skipped in place, so that the
   conditions differ by the removed sentences only, not by a new shuffle.

Writes `table.md`, `results.json`, `cleansing.png`, `removed.md`, `mean_influence.parquet` and
`peer_scores.parquet` to --output_dir.

`--setup adapters` (default): the adapters of the top `--adapter_layers` layers and the classifier are fine-tuned;
the backbone is frozen. The layers below the adapters therefore compute the same output in every epoch: they run
once per sentence, in eval mode (no dropout there), and their output is cached in `--cache_dir` (default
`--output_dir/cache`); the models take it as ``inputs_embeds``. After the last attention only [CLS] is computed.
`--turnover_model default` (or a path to a `recipes/sst2.py` model trained on the same sentences) skips step 1 and
scores with that model, e.g. the embedded default with its two masked heads (pass `--adapter_layers 2`, its set-up,
so that the retrained models match it too).
`--setup frozen`: the sentence encoder (mean pooling) is frozen and cached whole, and an MLP on the sentence
embeddings is trained.
"""

from __future__ import annotations

import logging
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from cleansing_model import build_classifier, trained_turnover_model
from cleansing_parts import (
    CleansingArguments,
    PreparedData,
    encode_splits,
    load_splits,
    reference_batches,
    without_rows,
)
from cleansing_peers import peer_scores
from cleansing_report import format_table, most_harmful, plot, removal_stats, removed_report, summarize
from common import (
    AccuracyMetric,
    RecipeTrainingArguments,
    parse_arguments,
    push_outputs,
    train_model,
    write_json,
)
from paired_retraining import FixedBatchesTrainer, fixed_batches, skip_rows
from transformers import Trainer

from hf_turnover.atomic import atomic_write_text
from hf_turnover.config import TurnoverArguments
from hf_turnover.influence import mean_influence
from hf_turnover.linear import reference_gradient
from hf_turnover.model import get_turnover_config
from hf_turnover.pooled import PooledBasis, head_features, training_errors
from hf_turnover.results import save_scores, scores_dataset

logger = logging.getLogger(__name__)
TURNOVER = "turn-over mean influence"
CENTERED = "turn-over centered mean influence"
POOLED = "turn-over pooled mean influence"


@dataclass
class CleansingTurnoverArguments(TurnoverArguments):
    turnover_target_modules: str | None = field(
        default=None,
        metadata={
            "help": "Modules whose output units are masked (regex, full match). Default: the adapters of the top "
            "--turnover_top_layers layers (adapters setup); none for --setup frozen (the MLP's hidden units are "
            "masked at the classifier input)."
        },
    )


@dataclass
class CleansingTrainingArguments(RecipeTrainingArguments):
    output_dir: str = field(default="runs/cleansing", metadata={"help": "Where the results go."})
    learning_rate: float = field(
        default=3e-3, metadata={"help": "AdamW learning rate (adapters + classifier)."}
    )
    num_train_epochs: float = field(
        default=1.0, metadata={"help": "Epochs of every training run (chosen on the target validation set)."}
    )
    warmup_ratio: float = field(default=0.06, metadata={"help": "Linear warm-up, then linear decay."})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Training batch size."})
    per_device_eval_batch_size: int = field(default=256, metadata={"help": "Evaluation batch size."})
    group_by_length: bool = field(
        default=True, metadata={"help": "Batches of similar lengths (less padding)."}
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep the length column for group_by_length; the collator drops it."}
    )


def run_conditions(args, training_args, data: PreparedData, removals: dict[str, list[int]]) -> list[dict]:
    """Retrain without turn-over under each condition and seed; electronics test accuracy and loss. With
    ``--paired_batches`` every condition of a seed trains on the same minibatches, its removed rows skipped in
    place; otherwise each condition's set is shuffled anew (the earlier protocol)."""
    n_remove = len(next(iter(removals.values())))
    names = ["no removal", "random removal", *removals]
    rows = {name: {"condition": name, "accuracies": [], "losses": []} for name in names}
    seeds = [training_args.seed + offset for offset in range(args.num_seeds)]
    position = {int(i): row for row, i in enumerate(data.train["instance_id"])}
    for seed in seeds:
        removed = {
            "no removal": [],
            "random removal": random.Random(seed).sample(range(len(data.train)), n_remove),
        }
        removed.update({name: [position[i] for i in ids] for name, ids in removals.items()})
        batches = fixed_batches(data.train, training_args.per_device_train_batch_size, seed)
        for name, skipped in removed.items():
            training_args.seed = training_args.data_seed = seed
            build = partial(build_classifier, args, None, data)
            trainer_kwargs = {"data_collator": data.collator, "compute_metrics": AccuracyMetric()}
            if args.paired_batches:
                trainer = train_model(build, training_args, data.train, FixedBatchesTrainer,
                                      batches=skip_rows(batches, skipped), **trainer_kwargs)  # fmt: skip
            else:
                trainer = train_model(
                    build, training_args, without_rows(data.train, skipped), **trainer_kwargs
                )
            metrics = trainer.evaluate(data.test, metric_key_prefix="test")
            rows[name]["accuracies"].append(metrics["test_accuracy"])
            rows[name]["losses"].append(metrics["test_loss"])
            logger.info(f"seed {seed} {name}: accuracy {metrics['test_accuracy']:.4f}")
    return summarize(list(rows.values()), seeds)


def score_training_set(args, turnover_args, training_args, data: PreparedData, output: Path):
    """Steps 1-2: train with turn-over masks (or take ``--turnover_model``); mean influence (and centered) of every
    training sentence on the target validation set and the peer scores on the same model, saved; returns (trainer,
    rankings by id, mean influence, peer scores)."""
    training_args.data_seed = training_args.seed
    if args.turnover_model:  # already trained: only scored here
        trainer = Trainer(trained_turnover_model(args, data), training_args, data_collator=data.collator,
                          compute_metrics=AccuracyMetric())  # fmt: skip
    else:
        build = partial(build_classifier, args, turnover_args, data)
        trainer = train_model(
            build, training_args, data.train, data_collator=data.collator, compute_metrics=AccuracyMetric()
        )
    options = {"batch_size": args.influence_batch_size}
    scores = mean_influence(
        trainer.model, data.train, data.validation, method=args.influence_method, **options
    )
    save_scores(scores, output / "mean_influence.parquet")
    rankings = {TURNOVER: dict(zip(scores["train_id"], scores["score"], strict=True))}
    if args.centered:
        reference = reference_gradient(trainer.model, reference_batches(data.train, data.collator))
        centered = mean_influence(trainer.model, data.train, data.validation, method="centered",
                                  reference=reference, **options)  # fmt: skip
        save_scores(centered, output / "mean_influence_centered.parquet")
        rankings[CENTERED] = dict(zip(centered["train_id"], centered["score"], strict=True))
    if args.pooled:
        ids = np.asarray(data.train["instance_id"])
        features, logits = head_features(
            trainer.model,
            reference_batches(data.train, data.collator, rows=range(len(ids))),
            return_logits=True,
        )
        errors = training_errors(logits, data.train["label"])
        basis = PooledBasis.from_features(ids, data.train["label"], features, errors=errors)
        pooled = mean_influence(trainer.model, data.train, data.validation, method="pooled", basis=basis,
                                **options)  # fmt: skip
        save_scores(pooled, output / "mean_influence_pooled.parquet")
        rankings[POOLED] = dict(zip(pooled["train_id"], pooled["score"], strict=True))
    peers = peer_scores(trainer.model, data.train, data.validation, data.collator)
    ids = np.asarray(data.train["instance_id"])
    save_scores(
        scores_dataset({"train_id": ids, **peers}, {"kind": "peer_scores"}), output / "peer_scores.parquet"
    )
    rankings.update({name: dict(zip(ids.tolist(), peers[name], strict=True)) for name in args.peer_list})
    return trainer, rankings, scores, peers


def main(argv: list[str] | None = None) -> dict:
    """Run the recipe; ``argv`` as on the command line (``None``: ``sys.argv[1:]``). Returns results.json."""
    args, turnover_args, training_args = parse_arguments(
        (CleansingArguments, CleansingTurnoverArguments, CleansingTrainingArguments), argv
    )
    started, output, base_seed = time.time(), Path(training_args.output_dir), training_args.seed
    if args.setup == "frozen":  # one embedding per sentence: no lengths to group by, only model columns
        training_args.group_by_length, training_args.remove_unused_columns = False, True
    data = encode_splits(args, load_splits(args), output)
    trainer, rankings, scores, peers = score_training_set(args, turnover_args, training_args, data, output)
    validation_accuracy = trainer.evaluate(data.validation, metric_key_prefix="validation")

    # 3. Remove the most harmful fraction by each method; 4. retrain without turn-over under each condition.
    removals = {name: most_harmful(ranking, args.remove_fraction) for name, ranking in rankings.items()}
    atomic_write_text(
        output / "removed.md",
        removed_report(rankings[TURNOVER], data.train, args.text_column, removals[TURNOVER]),
    )
    rows = run_conditions(args, training_args, data, removals)
    table = format_table(rows, len(data.train), len(removals[TURNOVER]), args.num_seeds)
    print(table)
    atomic_write_text(output / "table.md", table)
    plot(scores, rankings[TURNOVER][removals[TURNOVER][-1]], rows, output / "cleansing.png")
    results = {
        "arguments": asdict(args), "turnover": get_turnover_config(trainer.model).to_dict(), "seed": base_seed,
        "num_train_epochs": training_args.num_train_epochs, "learning_rate": training_args.learning_rate,
        "per_device_train_batch_size": training_args.per_device_train_batch_size,
        "num_train": len(data.train), "num_targets": len(data.validation), "num_test": len(data.test),
        "turnover_model_validation_accuracy": validation_accuracy.get("validation_accuracy"),
        "removed_train_ids": removals, "removal_stats": removal_stats(removals, rankings, data.train, -peers["loss"]),
        "rows": rows, "runtime_s": round(time.time() - started, 1),
    }  # fmt: skip
    write_json(output / "results.json", results)
    push_outputs(output, training_args)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
