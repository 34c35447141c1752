"""Mislabel detection on the default model's design: 10% of the training labels flipped, turn-over self-influence
against the training loss and the last-layer influence function's self-influence, on the same models.

    nice -n 10 python benchmarks/faithfulness/minilm_mislabel.py --output_dir benchmarks/faithfulness/results_minilm_mislabel

Smoke run (what tests/test_minilm_mislabel.py runs): ``--output_dir /tmp/minilm_mislabel --smoke true``.

The set-up of ``minilm_top_lds.py`` (all-MiniLM-L6-v2 frozen, ``seq_bn`` adapters in the top two layers, masks on
both adapters and the classifier input, trained on the cached frozen layers) with ``--width``, ``--epochs``,
``--learning_rate`` and ``--lr_schedule`` as given. ``flip_labels(y, 2, fraction, seed=2)`` moves a share of the
N training labels to the other class; models of seeds 0 .. ``num_seeds``-1 train on the noisy labels. Each
ranking (higher = more suspicious) is scored by ROC AUC and by the share of the flipped labels in its top 10%
(``hf_turnover/resources/metrics/mislabel_detection``); rankings of seed 0 and seed 1 are compared by Spearman.
"""

from __future__ import annotations

import json
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import _paths  # noqa: F401  (benchmarks/lib on sys.path)
import numpy as np
import torch
from bench_common import parse_benchmark_arguments
from faithfulness_lib import minilm as M
from faithfulness_lib import minilm_top as top
from faithfulness_lib.setups import flip_labels
from minilm_top_lds import MiniLMTopArguments, build, load_data, train_options
from transformers import AutoTokenizer

from hf_turnover.atomic import atomic_write_text
from hf_turnover.evaluation import load_faithfulness_metric, seed_agreement

SMOKE = {"num_train": 64, "num_val": 64, "width": 32, "lower_width": 16, "cache_to_disk": False}


@dataclass
class MislabelArguments:
    output_dir: str = field(
        default="benchmarks/faithfulness/results_minilm_mislabel", metadata={"help": "Results."}
    )
    num_train: int = field(default=8454, metadata={"help": "Training sentences N."})
    num_val: int | None = field(default=None, metadata={"help": "Validation sentences for accuracy (all)."})
    fraction: float = field(default=0.1, metadata={"help": "Share of the training labels flipped."})
    num_seeds: int = field(
        default=2, metadata={"help": "Models trained on the noisy labels (>= 2: agreement)."}
    )
    width: int = field(default=1536, metadata={"help": "Adapter units in the top layer."})
    lower_width: int = field(default=384, metadata={"help": "Adapter units in the layer below."})
    heads: int = field(
        default=1, metadata={"help": "Masked heads on the frozen body (2: the embedded default's)."}
    )
    epochs: int = field(default=1, metadata={"help": "Epochs."})
    learning_rate: float = field(default=3e-3, metadata={"help": "AdamW peak lr."})
    lr_schedule: str = field(
        default="linear", metadata={"help": "'linear' decay or 'constant' after warm-up."}
    )
    cache_to_disk: bool = field(default=True, metadata={"help": "Keep the frozen-layer cache in ~/.cache."})
    threads: int = field(default=1, metadata={"help": "torch threads."})
    smoke: bool = field(default=False, metadata={"help": "Tiny settings (N=64, W=32/16)."})


def rankings(model, hidden: top.Hidden, noisy: torch.Tensor) -> dict[str, np.ndarray]:
    """Every suspicion ranking of the N training rows under the noisy labels (higher = more suspicious)."""
    influence = M.TailLastLayerInfluence(top.last_layer(model), top.pooled_features(model, hidden), noisy)
    return {
        "turn-over self-influence (linear)": top.turnover_self_influence(model, hidden, noisy),
        "training loss (full network)": top.target_losses(model, hidden, noisy),
        "influence function self-influence (last layer, exact)": influence.self_scores(),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_benchmark_arguments(MislabelArguments, argv, SMOKE)
    if args.num_seeds < 1 or not 0.0 < args.fraction < 1.0:
        raise ValueError(
            f"--num_seeds {args.num_seeds} must be >= 1 and --fraction {args.fraction} in (0, 1)."
        )
    start = time.perf_counter()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    setup = MiniLMTopArguments(num_train=args.num_train, num_targets=1, num_val=args.num_val, width=args.width,
                               lower_width=args.lower_width, heads=args.heads, num_train_epochs=args.epochs,
                               learning_rate=args.learning_rate, lr_schedule=args.lr_schedule,
                               cache_to_disk=args.cache_to_disk, smoke=args.smoke)  # fmt: skip
    setup.masked_layers = setup.top_layers
    tokenizer = AutoTokenizer.from_pretrained(M.backbone_path())
    model = build(setup, 0)
    below = top.frozen_below(model)
    _, data = load_data(setup, model, tokenizer, below)
    (hidden, y), (hidden_val, y_val) = data["train"], data["val"]
    noisy, flipped = flip_labels(y, 2, args.fraction, seed=2)
    metric = load_faithfulness_metric("mislabel_detection")
    seeds = []
    for seed in range(args.num_seeds):
        model = build(setup, seed)
        with top.cut_bottom(model, below):
            run = top.train_top(model, M.snapshot(model), hidden, noisy, **train_options(setup, seed))
            scores = rankings(model, hidden, noisy)
            accuracy = top.accuracy(model, hidden_val, y_val)
        detection = {name: metric.compute(predictions=s, references=flipped) for name, s in scores.items()}
        seeds.append({"seed": seed, "val_accuracy": accuracy, "train_seconds": run.seconds, "scores": scores,
                      "detection": detection})  # fmt: skip
        print(f"seed {seed}: val acc {accuracy:.3f}, " + ", ".join(
            f"{k}: AUC {v['roc_auc']:.3f}" for k, v in detection.items()), flush=True)  # fmt: skip
    names = list(seeds[0]["scores"])
    summary = {}
    for name in names:
        aucs = [s["detection"][name]["roc_auc"] for s in seeds]
        recalls = [s["detection"][name]["top_fraction_recall"] for s in seeds]
        row = {"roc_auc": aucs, "top10_recall": recalls}
        if len(seeds) > 1:
            row["seed_spearman"] = seed_agreement(seeds[0]["scores"][name], seeds[1]["scores"][name])[
                "spearman"
            ]
        summary[name] = row
    results = {
        "arguments": asdict(args), "machine": f"{platform.machine()} CPU, torch {torch.__version__}",
        "command": "python benchmarks/faithfulness/minilm_mislabel.py "
        + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "num_train": len(y), "num_flipped": int(flipped.sum()), "summary": summary,
        "val_accuracy": [s["val_accuracy"] for s in seeds], "train_seconds": [s["train_seconds"] for s in seeds],
        "wall_seconds": time.perf_counter() - start,
    }  # fmt: skip
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    report = markdown(results)
    atomic_write_text(out / "results.md", report)
    print(report, flush=True)
    return results


def markdown(r: dict) -> str:
    a = r["arguments"]
    fmt = lambda v: " / ".join(f"{x:.3f}" for x in v)  # noqa: E731
    lines = [
        "# Mislabel detection on the default model's design",
        "",
        f"Written by `benchmarks/faithfulness/minilm_mislabel.py`. Command: `{r['command']}`",
        f"Wall time {r['wall_seconds'] / 60:.1f} min on {r['machine']}. N = {r['num_train']}, "
        f"{r['num_flipped']} labels flipped (`flip_labels(y, 2, {a['fraction']}, seed=2)`); W = {a['width']}, "
        f"{a.get('heads', 1)} masked head(s), {a['epochs']} epoch(s), lr {a['learning_rate']:g} {a['lr_schedule']}; seeds 0..{a['num_seeds'] - 1}, "
        f"validation accuracy {fmt(r['val_accuracy'])} (clean labels).",
        "",
        "| ranking (higher = more suspicious) | ROC AUC per seed | flipped found in top 10% per seed | "
        "Spearman seed 0 vs 1 |",
        "|---|---|---|---|",
    ]  # fmt: skip
    for name, row in r["summary"].items():
        rho = f"{row['seed_spearman']:.3f}" if "seed_spearman" in row else "–"
        lines.append(f"| {name} | {fmt(row['roc_auc'])} | {fmt(row['top10_recall'])} | {rho} |")
    return "\n".join([*lines, ""])


if __name__ == "__main__":
    main()
