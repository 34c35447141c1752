"""Scoring throughput with one and with two processes (``distributed=True`` under ``accelerate launch``).

    accelerate launch --config_file recipes/accelerate_configs/cpu.yaml benchmarks/speed/distributed_speed.py
    accelerate launch --multi_gpu --num_processes 2 benchmarks/speed/distributed_speed.py

Each launch writes ``benchmarks/distributed_speed_{K}proc.json`` (K processes). The model is the embedded default
(all-MiniLM-L6-v2, adapters in its top layer, turn-over on them and on the classifier input) with its 4,000
training sentences; targets are the first bundled Rotten Tomatoes validation sentences. Every figure is the median
of ``--rounds`` timed calls after one warm-up call, wall time on the main process from before the call to the
gathered result (so the gather is included). One process uses both cores for its intra-op threads; two processes
use one thread each (torchrun's ``OMP_NUM_THREADS=1``).

The main process also counts the FLOPs of one exact scoring call (``torch.utils.flop_counter``) and divides
them by the ids scored: the per-id cost of the masked part (own and flipped rows through the top layer's tail
at the [CLS] position) that the cost model in ``benchmarks/RESULTS.md`` scales up.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import HfArgumentParser

from hf_turnover import estimate_influence, self_influence
from hf_turnover.atomic import atomic_write_text
from hf_turnover.default_model import DEFAULT_MODEL_DIR, load_default_model
from hf_turnover.distributed import process_state
from hf_turnover.fingerprint import recorded_fingerprint
from hf_turnover.pipeline_turnover import _backbone_tokenizer
from hf_turnover.scorer import TurnoverScorer
from hf_turnover.scoring_steps import TargetPrep
from hf_turnover.training_set import load_training_set

BUNDLED = Path(__file__).resolve().parents[2] / "hf_turnover" / "resources" / "data" / "rotten_tomatoes"


@dataclass
class Arguments:
    exact_targets: int = field(default=8, metadata={"help": "Targets of the exact pairwise figure."})
    linear_targets: int = field(default=64, metadata={"help": "Targets of the linear pairwise figure."})
    self_rows: int = field(default=1024, metadata={"help": "Training rows of the self-influence figure."})
    rounds: int = field(default=3, metadata={"help": "Timed calls per figure (median)."})
    output_dir: str = field(default="benchmarks", metadata={"help": "Where the JSON goes."})


def timed(function, rounds: int, state) -> float:
    function()  # warm-up: probes, mask tables, allocator
    times = []
    for _ in range(rounds):
        if state is not None:
            state.wait_for_everyone()
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def flops_per_id(model, train, target) -> float:
    scorer = TurnoverScorer(model)
    ids = torch.as_tensor(train["instance_id"])
    inputs, labels = TargetPrep(scorer, "instance_id")(target)
    with FlopCounterMode(display=False) as counter:
        scorer.score(inputs, labels, ids)
    return counter.get_total_flops() / len(ids)


def main() -> None:
    (args,) = HfArgumentParser(Arguments).parse_args_into_dataclasses()
    state = process_state()
    processes = state.num_processes if state is not None else 1
    main_process = state is None or state.is_main_process
    model = load_default_model().eval()
    tokenizer = _backbone_tokenizer(model)
    train = load_training_set(DEFAULT_MODEL_DIR, recorded_fingerprint(model))
    sentences = datasets.Dataset.from_parquet(str(BUNDLED / "validation.parquet"))
    targets = sentences.select(range(max(args.exact_targets, args.linear_targets))).map(
        lambda r: tokenizer(r["sentence"], truncation=True, max_length=128)
    )
    tokenized = train.map(lambda r: tokenizer(r["sentence"], truncation=True, max_length=128))
    rows = tokenized.select(range(args.self_rows))
    n = len(train)
    common = {"progress": False, "distributed": True}
    figures = {
        "exact_pairs_per_s": args.exact_targets * n / timed(
            lambda: estimate_influence(model, train, targets.select(range(args.exact_targets)), top_k=10, **common),
            args.rounds, state,
        ),
        "linear_pairs_per_s": args.linear_targets * n / timed(
            lambda: estimate_influence(
                model, train, targets.select(range(args.linear_targets)), method="linear", top_k=10, **common
            ),
            args.rounds, state,
        ),
        "self_exact_rows_per_s": args.self_rows / timed(
            lambda: self_influence(model, rows, batch_size=64, check_fingerprint=False, **common), args.rounds, state
        ),
    }  # fmt: skip
    if main_process:
        report = {
            "processes": processes,
            "torch_threads_per_process": torch.get_num_threads(),
            "num_train_ids": n,
            "arguments": asdict(args),
            "load_average_at_end": os.getloadavg(),
            "cpu_count": os.cpu_count(),
            **figures,
            "exact_flops_per_id": flops_per_id(model, train, targets[0]),
        }
        path = Path(args.output_dir) / f"distributed_speed_{processes}proc.json"
        atomic_write_text(path, json.dumps(report, indent=2) + "\n")
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
