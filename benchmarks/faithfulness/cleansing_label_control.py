"""Is a cleansing gain the removed sentences, or only their labels? For each seed of a finished
`recipes/cleansing.py` run, retrains without turn-over on the training set minus **random sentences drawn with the
same label counts** as one method's removal set, on that seed's own minibatches (paired as the run's conditions), and
compares with the run's rows.

    python benchmarks/faithfulness/cleansing_label_control.py \
        --run benchmarks/faithfulness/results_cleansing_default/remove_0.10 \
        --method "turn-over pooled mean influence" --cache_dir runs/cleansing_default/cache

Retrains the method's own condition for the first seed too and prints how far it lands from the run's number (the
pairing holds only if retraining reproduces). Writes ``label_control.json`` to ``--run``: per seed the control's
accuracy, and the method minus the control and the control minus random removal (mean ± SE, paired by seed).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "recipes"))
from cleansing import CleansingArguments, CleansingTrainingArguments  # noqa: E402
from cleansing_model import build_classifier  # noqa: E402
from cleansing_parts import encode_splits, load_splits  # noqa: E402
from cleansing_report import mean_se  # noqa: E402
from common import AccuracyMetric, train_model  # noqa: E402
from paired_retraining import FixedBatchesTrainer, fixed_batches, skip_rows  # noqa: E402

from hf_turnover.atomic import atomic_write_text  # noqa: E402


def label_matched(labels: np.ndarray, removed: list[int], seed: int) -> list[int]:
    """Random positions with, label by label, as many rows as ``removed`` has (ids are row positions)."""
    rng = random.Random(seed)
    out = []
    for label in sorted(set(labels[removed].tolist())):
        count = int((labels[removed] == label).sum())
        out += rng.sample(np.flatnonzero(labels == label).tolist(), count)
    return out


def retrained_accuracy(args, training_args, data, skipped: list[int], seed: int) -> float:
    """Test accuracy of the model retrained on seed ``seed``'s minibatches with ``skipped`` left out."""
    training_args.seed = training_args.data_seed = seed
    batches = fixed_batches(data.train, training_args.per_device_train_batch_size, seed)
    trainer = train_model(partial(build_classifier, args, None, data), training_args, data.train,
                          FixedBatchesTrainer, batches=skip_rows(batches, skipped), data_collator=data.collator,
                          compute_metrics=AccuracyMetric())  # fmt: skip
    return trainer.evaluate(data.test, metric_key_prefix="test")["test_accuracy"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", type=Path, required=True, help="Folder with a finished run's results.json.")
    parser.add_argument(
        "--method", default="turn-over pooled mean influence", help="Condition to match labels of."
    )
    parser.add_argument("--cache_dir", default=None, help="The run's frozen-layer cache (rebuilt if absent).")
    options = parser.parse_args(argv)
    run = json.loads((options.run / "results.json").read_text())
    rows = {r["condition"]: r for r in run["rows"]}
    if options.method not in rows:
        raise SystemExit(
            f"--method {options.method!r} is not a condition of {options.run}; choose from {list(rows)}."
        )
    fields = {k: v for k, v in run["arguments"].items() if k in CleansingArguments.__dataclass_fields__}
    args = CleansingArguments(**{**fields, "cache_dir": options.cache_dir})
    scratch = tempfile.mkdtemp(prefix="label_control_")
    training_args = CleansingTrainingArguments(
        output_dir=scratch, learning_rate=run["learning_rate"], num_train_epochs=run["num_train_epochs"],
        per_device_train_batch_size=run["per_device_train_batch_size"], disable_tqdm=True,
    )  # fmt: skip
    data = encode_splits(args, load_splits(args), Path(scratch))
    labels = np.asarray(data.train["label"])
    removed = [int(i) for i in run["removed_train_ids"][options.method]]
    seeds = rows[options.method]["seeds"]
    check = retrained_accuracy(args, training_args, data, removed, seeds[0])
    control = [
        retrained_accuracy(args, training_args, data, label_matched(labels, removed, s), s) for s in seeds
    ]
    method, random_rows = (
        np.asarray(rows[options.method]["accuracies"]),
        np.asarray(rows["random removal"]["accuracies"]),
    )
    result = {
        "run": str(options.run), "method": options.method, "seeds": seeds,
        "removed_labels": {str(k): int((labels[removed] == k).sum()) for k in sorted(set(labels.tolist()))},
        "reproduced_first_seed": {"run": float(method[0]), "again": check},
        "control_accuracies": control,
        "method_minus_control": mean_se(100 * (method - control)),
        "control_minus_random": mean_se(100 * (np.asarray(control) - random_rows)),
    }  # fmt: skip
    atomic_write_text(options.run / "label_control.json", json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
