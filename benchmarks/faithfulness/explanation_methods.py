"""The explanation checks of one model under each scoring method, on the same queries: which method's lists look
more like explanations (Hanawa et al. 2021's identical-class test) and how many distinct training instances fill
them (the same few on top of unrelated queries point at mask luck).

    python benchmarks/faithfulness/explanation_methods.py --output_json benchmarks/faithfulness/explanation_methods.json

Default: the embedded default model, the first 500 bundled validation sentences, each explained against the whole
training set (``top_k=5``, no ``restrict_to_label``) by ``pipeline("turnover-influence")`` with
``method="linear"`` and ``"centered"``. Reports per method the identical-class rate (the top helpful training
sentence carries the predicted label), the harmful-other rate (the top harmful one carries the other label), the
distinct top-1 and top-5 sentences, and the mean overlap of the two methods' top-5 lists.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import _paths  # noqa: F401  (benchmarks/lib on sys.path)
import numpy as np
import torch
from bench_common import print_and_save_json
from transformers import HfArgumentParser, pipeline

import hf_turnover  # noqa: F401  (registers the task)
from hf_turnover.data import load_bundled_dataset
from hf_turnover.evaluation import explanation_checks


@dataclass
class ExplanationMethodsArguments:
    model: str | None = field(default=None, metadata={"help": "Model folder or Hub id (default: embedded)."})
    methods: str = field(default="linear,centered", metadata={"help": "Scoring methods, comma-separated."})
    split: str = field(
        default="validation", metadata={"help": "Bundled rotten_tomatoes split of the queries."}
    )
    num_queries: int = field(default=500, metadata={"help": "The first N sentences of the split."})
    threads: int = field(default=2, metadata={"help": "torch threads."})
    output_json: str | None = field(default=None, metadata={"help": "Write the results here."})


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(ExplanationMethodsArguments).parse_args_into_dataclasses(argv)
    torch.set_num_threads(args.threads)
    pipe = pipeline("turnover-influence", model=args.model)
    split = load_bundled_dataset("rotten_tomatoes")[args.split]
    column = "sentence" if "sentence" in split.column_names else "text"
    texts = split.select(range(min(args.num_queries, len(split))))[column]
    outputs = {method: pipe(list(texts), top_k=5, method=method) for method in args.methods.split(",")}
    results = {"arguments": asdict(args), "model": args.model or "embedded default", "methods": {}}
    for method, explanations in outputs.items():
        harmful_other = [e["harmful"][0]["label"] != e["prediction"]["label"] for e in explanations]
        results["methods"][method] = {
            **explanation_checks(explanations, top_k=5),
            "harmful_other_class_rate": float(np.mean(harmful_other)),
        }
    if len(outputs) == 2:
        first, second = outputs.values()
        overlap = [
            len({i["train_id"] for i in a["helpful"]} & {i["train_id"] for i in b["helpful"]}) / 5
            for a, b in zip(first, second, strict=True)
        ]
        results["top5_overlap_between_methods"] = float(np.mean(overlap))
    print_and_save_json(results, args.output_json)
    return results


if __name__ == "__main__":
    main()
