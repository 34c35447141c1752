"""recipes/score.py: a saved model, its training set and targets in, a dataset of scores out; resumable; launchable
with `accelerate launch` (one or two CPU processes: the same result)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import PINNED
from hub_fixtures import make_trained
from transformers import AutoModelForSequenceClassification

from hf_turnover import estimate_influence, mean_influence, save_turnover_model, self_influence
from hf_turnover.scoring_run import load_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("score")
    model, tokenizer, train = make_trained(tmp, n=40)
    save_turnover_model(model, tmp / "model", tokenizer=tokenizer, train_dataset=train)
    return model, tokenizer, train, tmp / "model"


@pytest.fixture
def score(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "recipes"))
    import score

    return score.main


def _table(scores, sort=False):
    table = scores.to_pandas()
    if sort:
        table = table.sort_values(["target_id", "train_id"], kind="stable").reset_index(drop=True)
    return table


def _assert_identical(a, b, sort=False):
    a, b = _table(a, sort), _table(b, sort)
    assert list(a.columns) == list(b.columns)
    for column in a.columns:
        np.testing.assert_array_equal(a[column].to_numpy(), b[column].to_numpy(), err_msg=column)


SENTENCES = ["w1 w2 w3", "w12 w13 w3 w4 w5", "w19"]


@pytest.mark.parametrize(
    "kind,extra",
    [("influence", ["--top_k", "4"]), ("influence", ["--method", "linear"]), ("self_influence", []),
     ("mean_influence", ["--train_batch_size", "3"])],
)  # fmt: skip
def test_command_equals_the_library(saved, score, tmp_path, kind, extra, one_thread):
    _, tokenizer, train, folder = saved
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()  # as the command loads it
    argv = [
        "--model_name_or_path",
        str(folder),
        "--kind",
        kind,
        "--output_dir",
        str(tmp_path),
        "--shard_size",
        "7",
    ]
    argv += ["--self_batch_size", "4", *extra] + (
        ["--sentences", *SENTENCES] if kind != "self_influence" else []
    )
    score(argv)
    result = load_run(tmp_path)
    targets = [dict(tokenizer(s)) for s in SENTENCES]
    options = (
        {"method": "linear"}
        if "linear" in extra
        else {"train_batch_size": 3}
        if kind == "mean_influence"
        else {}
    )
    if kind == "influence":
        expected = estimate_influence(model, train, targets, progress=False, top_k=4 if "--top_k" in extra else None,
                                      **options)  # fmt: skip
    elif kind == "mean_influence":
        expected = mean_influence(model, train, targets, progress=False, **options)
    else:
        expected = self_influence(
            model, train.map(lambda r: tokenizer(r["sentence"])), batch_size=4, progress=False
        )
    _assert_identical(result, expected, sort=kind == "influence" and "--top_k" not in extra)


# The README's launches: one process, and two (--multi_gpu picks torchrun; without GPUs the ranks use the CPU
# and gloo), both with one intra-op thread per process and MKL's strict reproducibility mode: a matmul's last
# bits can depend on the thread count and on the alignment of its buffers, which differs between processes.
ONE = ["--num_processes", "1", "--num_cpu_threads_per_process", "1"]
TWO = ["--multi_gpu", "--num_processes", "2", "--num_cpu_threads_per_process", "1"]


def _launch(launch: list[str], argv: list[str], **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", **PINNED}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch, "--num_machines", "1"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "recipes" / "score.py"), *argv]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, text=True, **popen)


def _run(launch: list[str], argv: list[str]) -> str:
    process = _launch(launch, argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-4000:]
    return output


@pytest.mark.slow
def test_readme_commands_on_the_default_model(tmp_path):
    """The README's scoring commands (the embedded default model, 4,000 training sentences): two processes write
    what one writes, and only the main process shows a progress bar."""
    argv = ["--sentences", "A gorgeous, witty, seductive movie.", "Dull and far too long.", "--top_k", "5"]
    one = _run(ONE, argv + ["--output_dir", str(tmp_path / "one")])
    two = _run(TWO, argv + ["--output_dir", str(tmp_path / "two")])
    _assert_identical(load_run(tmp_path / "one"), load_run(tmp_path / "two"))
    assert len(load_run(tmp_path / "two")) == 2 * 10
    assert json.loads((tmp_path / "two" / "arguments.json").read_text())["complete"]
    assert "by 1 process(es)" in one and "by 2 process(es)" in two
    assert two.count("Scoring influence:   0%") == 1  # the main process's bar only


@pytest.mark.slow
def test_two_processes_and_a_killed_run(saved, tmp_path):
    """Two CPU processes write what one writes (pairwise with top_k, self and mean influence); a run killed after
    its first shards resumes to the same result; a rerun of a finished run does no work."""
    *_, folder = saved
    argv = [
        "--model_name_or_path",
        str(folder),
        "--sentences",
        *SENTENCES,
        "--top_k",
        "3",
        "--shard_size",
        "4",
    ]
    _run(ONE, argv + ["--output_dir", str(tmp_path / "one")])
    assert "by 2 process(es)" in _run(TWO, argv + ["--output_dir", str(tmp_path / "two")])
    _assert_identical(load_run(tmp_path / "one"), load_run(tmp_path / "two"))
    for kind in ("self_influence", "mean_influence"):
        common = [
            "--model_name_or_path",
            str(folder),
            "--kind",
            kind,
            "--sentences",
            *SENTENCES,
            "--shard_size",
            "8",
        ]
        _run(ONE, common + ["--output_dir", str(tmp_path / f"{kind}1")])
        _run(TWO, common + ["--output_dir", str(tmp_path / f"{kind}2")])
        _assert_identical(load_run(tmp_path / f"{kind}1"), load_run(tmp_path / f"{kind}2"))

    killed = tmp_path / "killed"
    slow = argv + ["--output_dir", str(killed), "--shard_size", "1", "--train_batch_size", "1"]
    process = _launch(TWO, slow, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while len(list((killed / "shards").glob("shard-*.parquet"))) < 3 and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished = len(list((killed / "shards").glob("shard-*.parquet")))
    assert 3 <= finished < 40, finished
    _run(TWO, slow)
    _assert_identical(load_run(killed), load_run(tmp_path / "one"))
    stamp = {p: p.stat().st_mtime_ns for p in killed.rglob("*.parquet")}
    _run(TWO, slow)  # finished: nothing is rewritten
    assert {p: p.stat().st_mtime_ns for p in killed.rglob("*.parquet")} == stamp


def test_centered_uses_the_reference_saved_beside_the_model(saved, score, tmp_path):
    """--method centered scores with the reference gradient that ships with the model: the linear scores minus
    each training id's linear score under that reference, exactly as the library's centered method."""
    from hf_turnover.pipeline_turnover import load_reference

    model, tokenizer, train, path = saved
    loaded = AutoModelForSequenceClassification.from_pretrained(path)
    reference = load_reference(loaded)
    assert reference is not None  # save_turnover_model writes it beside the model
    argv = ["--model_name_or_path", str(path), "--kind", "influence", "--sentences", *SENTENCES]
    score([*argv, "--method", "centered", "--output_dir", str(tmp_path / "centered")])
    score([*argv, "--method", "linear", "--output_dir", str(tmp_path / "linear")])
    centered, linear = (load_run(tmp_path / k) for k in ("centered", "linear"))
    targets = [dict(tokenizer(s)) for s in SENTENCES]
    expected = estimate_influence(
        loaded,
        train,
        targets,
        method="centered",
        reference=reference,
        progress=False,
        check_fingerprint=False,
    )
    np.testing.assert_allclose(
        _table(centered, sort=True)["score"], _table(expected, sort=True)["score"], rtol=1e-5, atol=1e-6
    )
    assert not np.allclose(_table(centered, sort=True)["score"], _table(linear, sort=True)["score"])
