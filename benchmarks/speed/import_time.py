"""Cost of ``import hf_turnover`` against ``import transformers.pipelines`` (which registering the pipeline task
needs anyway), in fresh processes of the same environment, alternated over ``--rounds``:

    python benchmarks/speed/import_time.py --rounds 7

Prints the median wall time of each and the median of the per-round ratios (target: at most 1.10).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

STATEMENTS = {"transformers.pipelines": "import transformers.pipelines", "hf_turnover": "import hf_turnover"}


def seconds(statement: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", statement], check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    seconds("import hf_turnover")  # warm the file cache and the compiled bytecode
    times = {name: [] for name in STATEMENTS}
    for _ in range(args.rounds):
        for name, statement in STATEMENTS.items():
            times[name].append(seconds(statement))
    ratios = [a / b for a, b in zip(times["hf_turnover"], times["transformers.pipelines"], strict=True)]
    result = {f"{name} s": statistics.median(values) for name, values in times.items()}
    result["ratio (median of rounds)"] = statistics.median(ratios)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
