"""Tests of the Hub TEST DOUBLE (tests/hub_double.py) against real huggingface_hub / datasets clients.

huggingface_hub reads HF_ENDPOINT at import time, so every client runs in a fresh Python process whose
environment comes from ``HubDouble.client_env``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

try:
    from tests.hub_double import DEFAULT_TOKEN, HubDouble, running_hub_double
except ImportError:  # tests/ is not importable as a package: pytest put tests/ itself on sys.path
    from hub_double import DEFAULT_TOKEN, HubDouble, running_hub_double  # type: ignore[no-redef]

HUB_DOUBLE_FILE = Path(__file__).with_name("hub_double.py")

MODEL_CLIENT = """
import hashlib, json, shutil, sys
from pathlib import Path

import torch
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.utils import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
from safetensors.torch import load_file, save_file

work = Path(sys.argv[1])
src = work / "src"
(src / "sub" / "dir").mkdir(parents=True)
(src / "config.json").write_text(json.dumps({"hidden": 4}))
save_file({"weight": torch.arange(12, dtype=torch.float32).reshape(3, 4)}, str(src / "model.safetensors"))
(src / "sub" / "dir" / "file.txt").write_text("nested\\n")
first = work / "first"
shutil.copytree(src, first)

api = HfApi()
result = {"user": api.whoami()["name"]}
result["repo_url_id"] = api.create_repo("test-user/demo").repo_id
c1 = api.upload_folder(repo_id="test-user/demo", folder_path=src, commit_message="first")
api.create_repo("test-user/demo", exist_ok=True)
(src / "config.json").write_text(json.dumps({"hidden": 8}))
c2 = api.upload_folder(repo_id="test-user/demo", folder_path=src, commit_message="second")
result["shas"] = [c1.oid, c2.oid]
result["commit_titles"] = [c.title for c in api.list_repo_commits("test-user/demo")]

def same_tree(downloaded: Path, expected: Path) -> None:
    files = sorted(str(p.relative_to(expected)) for p in expected.rglob("*") if p.is_file())
    got = sorted(str(p.relative_to(downloaded)) for p in downloaded.rglob("*") if p.is_file())
    assert got == sorted(files + [".gitattributes"]), got
    for name in files:
        assert (downloaded / name).read_bytes() == (expected / name).read_bytes(), name

same_tree(Path(snapshot_download("test-user/demo")), src)
same_tree(Path(snapshot_download("test-user/demo", revision=c1.oid)), first)
latest = hf_hub_download("test-user/demo", "config.json")
assert Path(latest).read_bytes() == (src / "config.json").read_bytes()
old = hf_hub_download("test-user/demo", "config.json", revision=c1.oid)
assert Path(old).read_bytes() == (first / "config.json").read_bytes()
weights = load_file(hf_hub_download("test-user/demo", "model.safetensors"))
assert torch.equal(weights["weight"], torch.arange(12, dtype=torch.float32).reshape(3, 4))
nested = hf_hub_download("test-user/demo", "sub/dir/file.txt", revision=c1.oid)
assert Path(nested).read_text() == "nested\\n"

tree = api.list_repo_tree("test-user/demo", recursive=True)
result["tree"] = sorted(entry.path for entry in tree)
result["exists"] = [api.repo_exists("test-user/demo"), api.repo_exists("test-user/missing")]
result["file_exists"] = [api.file_exists("test-user/demo", name) for name in ("sub/dir/file.txt", "x")]

errors = {}
for label, kwargs in {
    "missing_file": dict(repo_id="test-user/demo", filename="missing.txt"),
    "missing_repo": dict(repo_id="test-user/missing", filename="config.json"),
    "missing_revision": dict(repo_id="test-user/demo", filename="config.json", revision="no-such-branch"),
}.items():
    try:
        hf_hub_download(**kwargs)
        errors[label] = None
    except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError) as exc:
        errors[label] = type(exc).__name__
result["errors"] = errors
print(json.dumps(result))
"""

DATASET_CLIENT = """
import json

import datasets
from huggingface_hub import HfApi

rows = {"text": ["alpha", "beta", "gamma"], "label": [0, 1, 0], "score": [0.5, 1.5, 2.5]}
datasets.Dataset.from_dict(rows).push_to_hub("test-user/ds")
loaded = datasets.load_dataset("test-user/ds")
result = {"splits": sorted(loaded), "train": loaded["train"].to_dict()}
result["files"] = sorted(HfApi().list_repo_files("test-user/ds", repo_type="dataset"))
print(json.dumps(result))
"""


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubDouble]:
    with running_hub_double(tmp_path / "hub-storage") as double:
        yield double


def run_client(hub: HubDouble, script: str, work: Path) -> dict:
    """Run ``script`` in a fresh interpreter pointed at the double; return its last stdout line as JSON."""
    work.mkdir(parents=True, exist_ok=True)
    path = work / "client.py"
    path.write_text(textwrap.dedent(script))
    proc = subprocess.run(
        [sys.executable, str(path), str(work)],
        env=hub.client_env(work / "hf-home"),
        cwd=work,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"client failed\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def http(url: str, method: str = "GET", headers: dict[str, str] | None = None, data: bytes | None = None):
    """(status, headers, body) of a raw request, without raising on HTTP errors."""
    request = urllib.request.Request(url, method=method, headers=headers or {}, data=data)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


def test_model_repo_roundtrip(hub: HubDouble, tmp_path: Path) -> None:
    result = run_client(hub, MODEL_CLIENT, tmp_path / "model-client")
    assert result["user"] == "test-user"
    assert result["repo_url_id"] == "test-user/demo"
    assert all(len(sha) == 40 for sha in result["shas"]) and result["shas"][0] != result["shas"][1]
    assert result["commit_titles"] == ["second", "first", "initial commit"]
    assert result["tree"] == [
        ".gitattributes",
        "config.json",
        "model.safetensors",
        "sub",
        "sub/dir",
        "sub/dir/file.txt",
    ]
    assert result["exists"] == [True, False]
    assert result["file_exists"] == [True, False]
    assert result["errors"] == {
        "missing_file": "EntryNotFoundError",
        "missing_repo": "RepositoryNotFoundError",
        "missing_revision": "RevisionNotFoundError",
    }


def test_dataset_push_to_hub_and_load_dataset(hub: HubDouble, tmp_path: Path) -> None:
    result = run_client(hub, DATASET_CLIENT, tmp_path / "dataset-client")
    assert result["splits"] == ["train"]
    assert result["train"] == {
        "text": ["alpha", "beta", "gamma"],
        "label": [0, 1, 0],
        "score": [0.5, 1.5, 2.5],
    }
    assert result["files"] == [".gitattributes", "README.md", "data/train-00000-of-00001.parquet"]


def create_repo_raw(url: str, name: str) -> int:
    body = json.dumps({"name": name, "organization": "test-user", "type": "model"}).encode()
    headers = {"Authorization": f"Bearer {DEFAULT_TOKEN}", "Content-Type": "application/json"}
    return http(f"{url}/api/repos/create", "POST", headers, body)[0]


def test_raw_http_contract(hub: HubDouble) -> None:
    url = hub.start()
    assert url.startswith("http://127.0.0.1:")
    assert create_repo_raw(url, "raw") == 200
    assert create_repo_raw(url, "raw") == 409

    status, headers, body = http(f"{url}/api/models/test-user/missing")
    assert (status, headers["X-Error-Code"]) == (404, "RepoNotFound")
    status, headers, _ = http(f"{url}/test-user/raw/resolve/main/missing.bin", "HEAD")
    assert (status, headers["X-Error-Code"]) == (404, "EntryNotFound")
    status, headers, _ = http(f"{url}/test-user/raw/resolve/nope/.gitattributes")
    assert (status, headers["X-Error-Code"]) == (404, "RevisionNotFound")
    assert http(f"{url}/api/whoami-v2")[0] == 401
    assert http(f"{url}/api/not-an-endpoint")[0] == 404

    status, headers, full = http(f"{url}/test-user/raw/resolve/main/.gitattributes")
    assert status == 200 and len(headers["X-Repo-Commit"]) == 40 and headers["ETag"].startswith('"')
    status, headers, part = http(
        f"{url}/test-user/raw/resolve/main/.gitattributes", headers={"Range": "bytes=2-"}
    )
    assert (status, part) == (206, full[2:])
    assert headers["Content-Range"] == f"bytes 2-{len(full) - 1}/{len(full)}"


def test_state_persists_across_restarts(tmp_path: Path) -> None:
    with running_hub_double(tmp_path / "storage") as first:
        assert create_repo_raw(first.url, "kept") == 200
    with running_hub_double(tmp_path / "storage") as second:
        status, _, body = http(f"{second.url}/api/models/test-user/kept")
        assert status == 200 and json.loads(body)["id"] == "test-user/kept"


def test_command_line_entry_point(tmp_path: Path) -> None:
    cmd = [sys.executable, str(HUB_DOUBLE_FILE), "--port", "0", "--storage", str(tmp_path / "cli")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip() if proc.stdout else ""
        assert line.startswith("HUB_DOUBLE_URL=http://127.0.0.1:")
        url = line.split("=", 1)[1]
        status, _, body = http(f"{url}/api/whoami-v2", headers={"Authorization": "Bearer anything"})
        assert status == 200 and json.loads(body)["name"] == "test-user"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout:
            proc.stdout.close()
