"""Where the pooled method's signal comes from: the same pooled fit with the training ids' own masks and with the
masks of ids that were never trained (same labels, same principal components, same target gradients).

    python benchmarks/faithfulness/pooled_control.py --halves_from benchmarks/faithfulness/results_frontier_pooled

If the pooled scores only re-used the labels and the representation, the never-trained masks would score as
well; if the masks carry the signal, they fall to chance. Trains models 0 and 1 of the default's set-up (as
``frontier.py``; seconds on the cache) and reads the retrained halves' target losses of an earlier ``frontier.py``
run of the same set-up and targets (``--halves_from``: its output folder), so nothing is retrained here.

Writes ``results.json`` and ``results.md`` to ``--output_dir``.
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
import frontier as F
import numpy as np
import torch
from bench_common import parse_benchmark_arguments
from faithfulness_lib import minilm as M
from faithfulness_lib import minilm_top as top
from minilm_top_lds import build, train_options

from hf_turnover.atomic import atomic_write_text
from hf_turnover.evaluation import random_half_subsets, seed_agreement
from hf_turnover.pooled import PooledBasis

SMOKE = {"num_train": 64, "num_val": 64, "cache_to_disk": False}


@dataclass
class ControlArguments:
    halves_from: str = field(metadata={"help": "Output folder of a frontier.py run (its results.json)."})
    output_dir: str = field(
        default="benchmarks/faithfulness/results_pooled_control", metadata={"help": "Results."}
    )
    num_train: int = field(default=8454, metadata={"help": "Training sentences N (as the frontier run)."})
    num_val: int | None = field(default=None, metadata={"help": "Validation sentences for accuracy (all)."})
    cache_to_disk: bool = field(default=True, metadata={"help": "Keep the frozen-layer cache in ~/.cache."})
    threads: int = field(default=1, metadata={"help": "torch threads."})
    smoke: bool = field(default=False, metadata={"help": "Tiny settings (N=64), for the tests."})


def score(model, data, basis: PooledBasis, ids: np.ndarray) -> np.ndarray:
    """(2, T, N) pooled scores under labels 0 and 1, of training instance j scored through the masks of ids[j]."""
    return F.label_scores(model, data["targets"][0], len(ids), "pooled", basis=basis, first_id=int(ids[0]))


def main(argv: list[str] | None = None) -> dict:
    args = parse_benchmark_arguments(ControlArguments, argv, SMOKE)
    source = json.loads((Path(args.halves_from) / "results.json").read_text())
    point = source["points"][0]["point"]
    frontier_args = F.FrontierArguments(
        num_train=args.num_train, num_targets=source["num_targets"], num_val=args.num_val,
        first_target=source["arguments"].get("first_target", 0), cache_to_disk=args.cache_to_disk,
        threads=args.threads, smoke=args.smoke,
    )  # fmt: skip
    a = F.setup_arguments(frontier_args, {k: point[k] for k in ("width", "epochs", "lr", "schedule")})
    losses = np.asarray(source["points"][0]["target_losses"])
    start = time.perf_counter()
    below, data = F.load_frontier_data(frontier_args, a)
    (hidden, y), (hidden_t, y_t) = data["train"], data["targets"]
    n, y_t = len(y), y_t.numpy()
    members = random_half_subsets(n, losses.shape[1], seed=1)
    scores: dict[str, list[np.ndarray]] = {"own masks": [], "never-trained masks": []}
    predicted = []
    for seed in (0, 1):
        model = build(a, seed)
        with top.cut_bottom(model, below):
            top.train_top(model, M.snapshot(model), hidden, y, **train_options(a, seed))
            predicted.append(top.logits(model, hidden_t).argmax(-1).numpy())
            features = top.pooled_features(model, hidden)
            for name, first in (("own masks", 0), ("never-trained masks", 10 * n)):
                ids = np.arange(first, first + n)
                basis = PooledBasis.from_features(ids, y, features)
                scores[name].append(score(model, data, basis, ids))
        print(f"  model {seed} scored", flush=True)
    rows = []
    for name, (s0, s1) in scores.items():
        lds = F.faithfulness(F.pick(s0, y_t), members, losses)
        rows.append({"masks": name, **lds, **M.identical_class(F.pick(s0, predicted[0]), predicted[0], y.numpy()),
                     "agreement": seed_agreement(F.pick(s0, y_t), F.pick(s1, y_t), labels=y.numpy())})  # fmt: skip
    results = {
        "arguments": asdict(args), "machine": f"{platform.machine()} CPU, torch {torch.__version__}",
        "command": "python benchmarks/faithfulness/pooled_control.py "
        + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:])),
        "halves_from": source["command"], "num_train": n, "num_targets": len(y_t), "rows": rows,
        "wall_seconds": time.perf_counter() - start,
    }  # fmt: skip
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    atomic_write_text(out / "results.md", markdown(results))
    print(markdown(results), flush=True)
    return results


def markdown(r: dict) -> str:
    lines = [
        "# Pooled turn-over scores with the training ids' own masks and with never-trained ids' masks",
        "",
        f"Written by `benchmarks/faithfulness/pooled_control.py`. Command: `{r['command']}`",
        f"Halves (target losses) from: `{r['halves_from']}`. N = {r['num_train']}, {r['num_targets']} targets, "
        f"{r['wall_seconds'] / 60:.1f} min on {r['machine']}.",
        "",
        "Same models (seeds 0 and 1), labels, principal components and target gradients; only the mask bits that "
        "the pooled fit reads differ.",
        "",
        "| masks | LDS ± SE over targets (± over halves) | helpful top-1 same class | pairwise Spearman | "
        "mean-influence Spearman | within label |",
        "|---|---|---|---|---|---|",
    ]  # fmt: skip
    for row in r["rows"]:
        ag = row["agreement"]
        lines.append(f"| {row['masks']} | {F._lds(row)} | {row['helpful_same_class']:.2f} | "
                     f"{ag['pairwise_spearman']:.3f} | {ag['mean_influence_spearman']:.3f} | "
                     f"{ag['mean_influence_spearman_within_label']:.3f} |")  # fmt: skip
    return "\n".join([*lines, ""])


if __name__ == "__main__":
    main()
