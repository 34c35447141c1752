"""Seconds per explanation of ``pipeline("turnover-influence")`` and where they go, exact against linear scoring
in the same process, plus how varied the explanations are.

    python benchmarks/speed/pipeline_speed.py --num_queries 40 --output_json benchmarks/speed/pipeline_speed.json

Queries are held-out Rotten Tomatoes test sentences (the default model never trained on them). Each query is
explained with ``top_k=5`` against the whole training set, once per method, alternating methods query by query so
that load from other processes hits both alike. Stages are timed by wrapping the functions the pipeline calls:
tokenizing (``preprocess``), the prediction forward (``explain.predict``; linear: the forward and backward pass
that gives the prediction and the mask gradients), choosing candidates and reading the training ids, scoring
(``scorer.score``: the exact forwards; linear: the product with the mask table),
and the rest (top-k, looking up the texts, postprocessing). The first call of each method (probes, the mask
table) is timed apart as "first call". Also reported, per method: the distinct training sentences over all
queries' top-5 helpful lists, and the identical-class rate (the top helpful sentence carries the predicted label).
Last, all queries are explained in one call (``pipe(queries)``) and the seconds per text are reported.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import _paths  # noqa: F401  (benchmarks/lib on sys.path)
import torch
from bench_common import print_and_save_json
from transformers import HfArgumentParser, pipeline

import hf_turnover  # noqa: F401  (registers the task)
from hf_turnover import explain
from hf_turnover.data import load_bundled_dataset


@dataclass
class PipelineSpeedArguments:
    model: str | None = field(default=None, metadata={"help": "Model folder or Hub id (default: embedded)."})
    methods: str = field(default="exact,linear", metadata={"help": "Scoring methods, comma-separated."})
    num_queries: int = field(default=40, metadata={"help": "Held-out test sentences explained per method."})
    threads: int = field(default=2, metadata={"help": "torch threads."})
    output_json: str | None = field(default=None, metadata={"help": "Write the results here."})


class StageTimer:
    """Accumulates wall time per stage for the call in progress."""

    def __init__(self) -> None:
        self.current: dict[str, float] = defaultdict(float)

    def wrap(self, owner, name: str, stage: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.current[stage] += time.perf_counter() - start

        setattr(owner, name, timed)


def main() -> None:
    (args,) = HfArgumentParser(PipelineSpeedArguments).parse_args_into_dataclasses()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    pipe = pipeline("turnover-influence", model=args.model) if args.model else pipeline("turnover-influence")
    load_s = time.perf_counter() - start
    timer = StageTimer()
    timer.wrap(pipe, "preprocess", "tokenize")
    timer.wrap(explain, "predict", "forward")
    timer.wrap(explain, "_candidates", "candidates")
    timer.wrap(explain, "training_ids", "candidates")
    methods = args.methods.split(",")
    for method in methods:
        scorer = pipe._scorer(method, None)
        timer.wrap(scorer, "score", "scoring")
        if hasattr(scorer, "logits_and_gradients"):  # linear: prediction and mask gradients in one pass
            timer.wrap(scorer, "logits_and_gradients", "forward")
            timer.wrap(scorer, "scores_from_gradients", "scoring")
    queries = list(load_bundled_dataset("rotten_tomatoes")["test"]["sentence"])[: args.num_queries]
    first, totals, stages, outputs = {}, defaultdict(list), defaultdict(lambda: defaultdict(list)), {}
    for method in methods:  # first calls: probes and mask tables
        begin = time.perf_counter()
        pipe(queries[0], top_k=5, method=method)
        first[method] = time.perf_counter() - begin
    for query in queries:
        for method in methods:
            timer.current.clear()
            begin = time.perf_counter()
            outputs.setdefault(method, []).append(pipe(query, top_k=5, method=method))
            total = time.perf_counter() - begin
            totals[method].append(total)
            for stage, value in timer.current.items():
                stages[method][stage].append(value)
            stages[method]["rest"].append(total - sum(timer.current.values()))
    list_s = {}
    for method in methods:  # all queries in one call: the linear method batches them
        begin = time.perf_counter()
        pipe(queries, top_k=5, method=method)
        list_s[method] = (time.perf_counter() - begin) / len(queries)
    label_names = pipe.model.config.id2label
    results = {
        "arguments": asdict(args),
        "pipeline_load_s": load_s,
        "training_set_size": len(pipe.train_dataset),
    }
    for method in methods:
        median = statistics.median(totals[method])
        helpful = [out["helpful"] for out in outputs[method]]
        results[method] = {
            "first_call_s": first[method],
            "as_one_list_s_per_text": list_s[method],
            "median_s": median,
            "mean_s": statistics.fmean(totals[method]),
            "stage_share_of_median": {
                stage: statistics.median(values) / median for stage, values in stages[method].items()
            },
            "distinct_top5_helpful": len({item["train_id"] for items in helpful for item in items}),
            "top5_entries": sum(len(items) for items in helpful),
            "identical_class_top1": statistics.fmean(
                float(items[0]["label"] == out["prediction"]["label"])
                for items, out in zip(helpful, outputs[method], strict=True)
            ),
            "labels": sorted(label_names.values()),
        }
    if "exact" in results and "linear" in results:
        results["exact_over_linear_median"] = results["exact"]["median_s"] / results["linear"]["median_s"]
    print_and_save_json(results, args.output_json)


if __name__ == "__main__":
    main()
