"""Two CPU processes under `accelerate launch` (gloo): each rank masks its own rows with their own ids."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PINNED

SCRIPT = Path(__file__).parent / "scripts" / "ddp_train.py"


@pytest.mark.slow
def test_two_process_accelerate_launch(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), **PINNED}
    # --multi_gpu picks the torchrun launcher; without CUDA the ranks run on the CPU with gloo.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd += [
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(SCRIPT),
        str(tmp_path),
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["world_size"] == 2 for r in ranks)
    # The hook in the script already checked each row's mask against its id; here: the ranks split the data.
    assert set(ranks[0]["ids"]).isdisjoint(ranks[1]["ids"])
    assert sorted(ranks[0]["ids"] + ranks[1]["ids"]) == list(range(100, 116))
