"""Run by tests/test_distributed_scoring.py under `accelerate launch --multi_gpu --num_processes 2` (CPU, gloo).

Every rank scores each case twice, with ``distributed=True`` (its shard, gathered) and ``distributed=False``
(the single-process run, same threads), and checks that the two datasets are identical bit for bit. Rank 0
writes OUT/cases.json and the gathered results as parquet.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for conftest helpers

import numpy as np  # noqa: E402
from accelerate import PartialState  # noqa: E402
from conftest import make_tiny_bert, make_token_dataset  # noqa: E402

from hf_turnover import estimate_influence, mean_influence, save_scores, self_influence  # noqa: E402
from hf_turnover.distributed import process_state  # noqa: E402

# (name, function, keyword arguments); batch_size=5 puts the shard boundary (id 12) inside a chunk.
CASES = [
    ("pairwise_exact", estimate_influence, {"batch_size": 5}),
    ("pairwise_exact_top_k", estimate_influence, {"batch_size": 5, "top_k": 3}),
    ("pairwise_exact_auto_full", estimate_influence, {"variant": "full"}),
    ("pairwise_linear", estimate_influence, {"method": "linear"}),
    ("pairwise_linear_top_k", estimate_influence, {"method": "linear", "top_k": 3}),
    ("self_exact", self_influence, {"batch_size": 5}),
    ("self_linear", self_influence, {"batch_size": 5, "method": "linear"}),
    ("mean_exact", mean_influence, {"batch_size": 5}),
    ("mean_linear", mean_influence, {"method": "linear"}),
]


def identical(a, b) -> bool:
    if a.column_names != b.column_names or a.info.description != b.info.description or len(a) != len(b):
        return False
    return all(np.array_equal(np.asarray(a[c]), np.asarray(b[c])) for c in a.column_names)


def main(out: Path) -> None:
    state = process_state() or PartialState()
    model = make_tiny_bert()
    train = make_token_dataset(24, seed=1)
    targets = make_token_dataset(3, seed=2).map(lambda r, i: {"instance_id": i}, with_indices=True)
    targets = targets.map(
        lambda r, i: {"attention_mask": [1] * 6 + [0] * 2} if i == 0 else {}, with_indices=True
    )
    report = {"world_size": state.num_processes, "cases": {}}
    for name, function, kwargs in CASES:
        args = (model, train) if function is self_influence else (model, train, targets)
        one = function(*args, progress=False, **kwargs)
        many = function(*args, progress=False, distributed=True, **kwargs)
        report["cases"][name] = {"identical": identical(one, many), "rows": len(many)}
        if state.is_main_process:
            save_scores(many, out / f"{name}.parquet")
    report["rank"] = state.process_index
    (out / f"rank{state.process_index}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
