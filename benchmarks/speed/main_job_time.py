"""Wall time of the main job, ``accelerate launch recipes/sst2.py`` with its defaults, against the main job of an
earlier commit, run one after the other on the same machine.

    python benchmarks/speed/main_job_time.py --reference a9d0230 --output_json benchmarks/speed/main_job_time.json
    python benchmarks/speed/main_job_time.py --reference d3a0f3c --output_json benchmarks/speed/main_job_time_d3a0f3c.json

a9d0230 is main on 2026-11-28, the reference of the 1.3x time budget; d3a0f3c is main after that
issue's first stop (faster scoring, the same 4,000-sentence, one-layer job).

The reference commit is checked out into a temporary git worktree and runs with its own code (``PYTHONPATH``
points at that worktree); the current tree runs with this checkout's code. Each run writes to its own temporary
output folder. The script prints both wall times, each run's own ``timings`` from its ``results.json``, and the
ratio current / reference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import _paths  # noqa: F401  (benchmarks/lib on sys.path)
from bench_common import print_and_save_json
from transformers import HfArgumentParser

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class MainJobArguments:
    reference: str = field(default="a9d0230", metadata={"help": "Commit whose main job is the baseline."})
    order: str = field(default="reference,current", metadata={"help": "Which runs first (comma-separated)."})
    output_json: str | None = field(default=None, metadata={"help": "Write the results here."})


def run_main_job(tree: Path, output_dir: Path) -> dict:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += [str(tree / "recipes" / "sst2.py"), "--output_dir", str(output_dir), "--disable_tqdm", "true"]
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    subprocess.run(command, env=env, cwd=tree, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - start
    results = json.loads((output_dir / "results.json").read_text())
    return {
        "wall_s": wall,
        "timings": results["timings"],
        "num_train": results["num_train"],
        "accuracy_turnover": results["accuracy_turnover"],
        "accuracy_baseline_dropout": results["accuracy_baseline_dropout"],
    }


def main() -> None:
    (args,) = HfArgumentParser(MainJobArguments).parse_args_into_dataclasses()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", args.reference], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        reference_tree = Path(tmp) / "reference"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(reference_tree), commit], cwd=ROOT, check=True
        )
        try:
            trees = {"reference": reference_tree, "current": ROOT}
            for name in args.order.split(","):
                print(f"running the {name} main job ...", flush=True)
                runs[name] = run_main_job(trees[name], Path(tmp) / f"out_{name}")
                print(f"{name}: {runs[name]['wall_s'] / 60:.1f} min", flush=True)
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(reference_tree)], cwd=ROOT, check=True
            )
    results = {
        "arguments": asdict(args),
        "reference_commit": commit,
        **runs,
        "current_over_reference": runs["current"]["wall_s"] / runs["reference"]["wall_s"],
        "load_average_after": os.getloadavg(),
    }
    print_and_save_json(results, args.output_json)


if __name__ == "__main__":
    main()
