"""Scoring under `accelerate launch` with two CPU processes (gloo) equals one process, bit for bit."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import PINNED

from hf_turnover.distributed import merge_candidates, shard_range

SCRIPT = Path(__file__).parent / "scripts" / "ddp_score.py"
ROOT = Path(__file__).parents[1]


def launch(script: Path, *args: str, processes: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    """``accelerate launch --multi_gpu --num_processes N script args`` on the CPU (gloo), PYTHONPATH = repo."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", **PINNED}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(processes),
    ]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.mark.parametrize("n", [0, 1, 7, 24, 25])
@pytest.mark.parametrize("unit", [1, 5])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_cover_the_ids_once_at_unit_boundaries(n, unit, world):
    bounds = [shard_range(n, rank, world, unit) for rank in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    for (_, stop), (start, _) in zip(bounds, bounds[1:], strict=False):
        assert stop == start and (start % unit == 0 or start == n)


def test_merge_keeps_the_global_top_and_bottom():
    full = torch.randn(40)
    positions, scores = [], []
    for rank in range(3):
        start, stop = shard_range(40, rank, 3)
        keep = torch.cat([torch.topk(full[start:stop], 4).indices, torch.topk(-full[start:stop], 4).indices])
        keep = keep.sort().values
        positions.append((start + keep).numpy())
        scores.append(full[start:stop][keep].numpy())
    position, score = merge_candidates(positions, scores, top_k=4)
    expected = torch.cat([torch.topk(full, 4).indices, torch.topk(full, 4, largest=False).indices.flip(0)])
    assert position.tolist() == expected.tolist() and score.tolist() == full[expected].tolist()


def test_two_processes_score_like_one(tmp_path):
    """Pairwise (exact, linear; with and without top_k), self and mean influence: two ranks = one, bit for bit."""
    result = launch(SCRIPT, str(tmp_path))
    assert result.returncode == 0, result.stderr[-4000:]
    for rank in range(2):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["world_size"] == 2
        failed = [name for name, case in report["cases"].items() if not case["identical"]]
        assert not failed, f"rank {rank}: {failed} differ from the single-process run"
    assert report["cases"]["pairwise_exact_top_k"]["rows"] == 3 * 6
    assert report["cases"]["pairwise_exact"]["rows"] == 3 * 24
