"""TEST DOUBLE of the Hugging Face Hub HTTP API, for offline tests.

This is NOT a Hub implementation. It is a small local HTTP server (standard library only) that answers
the subset of requests that ``huggingface_hub`` 0.36 and ``datasets`` make for create/upload/download
round trips, so that tests can run without network. Storage is a directory on disk (blobs addressed by
sha256 plus a ``state.json`` with repos, branches, tags and the full commit history).

Use it from tests with ``HubDouble`` (``start()`` returns ``http://127.0.0.1:<port>``, ``stop()``) or the
``running_hub_double()`` context manager. ``huggingface_hub`` reads ``HF_ENDPOINT`` at import time, so the
client code must run in a fresh process whose environment comes from ``HubDouble.client_env()``.
``python tests/hub_double.py --port N --storage DIR`` serves until killed and prints ``HUB_DOUBLE_URL=...``.

Endpoints (``{t}`` is ``models`` or ``datasets``; ``{rev}`` is a branch, tag or 40-hex commit sha):

- ``GET  /api/whoami-v2``                          fake user (any bearer token; 401 without one)
- ``POST /api/repos/create``                       create_repo (409 + url when it exists)
- ``DELETE /api/repos/delete``                     delete_repo
- ``POST /api/validate-yaml``                      README.md metadata check (always valid)
- ``GET  /api/{t}/{repo}[/revision/{rev}]``        model_info / dataset_info / repo_info (siblings)
- ``GET  /api/{t}/{repo}/tree/{rev}[/{path}]``     list_repo_tree (``recursive``, ``expand``)
- ``POST /api/{t}/{repo}/paths-info/{rev}``        get_paths_info (used by HfFileSystem)
- ``GET  /api/{t}/{repo}/refs``                    list_repo_refs
- ``GET  /api/{t}/{repo}/commits/{rev}``           list_repo_commits
- ``POST /api/{t}/{repo}/branch/{branch}``         create_branch
- ``POST /api/{t}/{repo}/tag/{rev}``               create_tag
- ``POST /api/{t}/{repo}/preupload/{rev}``         upload modes ("regular", or "lfs" for LFS-like files)
- ``POST /api/{t}/{repo}/commit/{rev}``            NDJSON commit: file, lfsFile, deletedFile, deletedFolder
- ``POST /[datasets/]{repo}.git/info/lfs/objects/batch``  LFS batch API ("basic" transfer only)
- ``PUT  /lfs-upload/{sha256}``                    LFS object upload target returned by the batch API
- ``GET|HEAD /[datasets/]{repo}/resolve/{rev}/{path}``  file bytes, ETag, X-Repo-Commit, Range support

Behaviour worth knowing:

- A new repo gets an initial commit with a ``.gitattributes`` file, as on the Hub.
- Preupload answers "regular" except for files whose name ends with one of ``lfs_suffixes``
  (default ``.parquet``/``.arrow``) or whose size is >= ``lfs_threshold`` (10 MiB): those get "lfs".
  ``datasets.push_to_hub`` needs this: it deletes each parquet shard right after preupload, so the
  shard must already be on the server before the commit is sent.
- Errors carry ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) so the client
  raises ``RepositoryNotFoundError``, ``RevisionNotFoundError``, ``EntryNotFoundError``.
- Private repos: every read (info, tree, paths-info, refs, commits, file download) needs
  ``Authorization: Bearer <DEFAULT_TOKEN>``; without it the answer is 401 ``RepoNotFound``, as on the Hub.
- Not modelled: other auth checks (any token may write), gated repos, pull requests (``create_pr``), spaces,
  Xet storage, LFS multipart, pagination, search/listing endpoints, the dataset viewer.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

DEFAULT_USER = "test-user"
DEFAULT_TOKEN = "hf_test_double_token"
DEFAULT_LFS_SUFFIXES: tuple[str, ...] = (".parquet", ".arrow")
DEFAULT_LFS_THRESHOLD = 10 * 1024 * 1024
GITATTRIBUTES = (
    b"*.parquet filter=lfs diff=lfs merge=lfs -text\n*.arrow filter=lfs diff=lfs merge=lfs -text\n"
)
URL_PREFIX = {"model": "", "dataset": "datasets/"}

Json = dict[str, Any]


# --------------------------------------------------------------------------------------------------------
# Requests, responses, errors


class HubError(Exception):
    """An error answered as JSON ``{"error": message}`` with ``X-Error-Code`` / ``X-Error-Message``."""

    def __init__(self, status: int, message: str, code: str | None = None, extra: Json | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra or {}


@dataclass
class Request:
    method: str
    params: dict[str, str]  # regex groups of the route, percent-decoded
    query: dict[str, list[str]]
    headers: Message
    body: bytes
    base_url: str

    def json(self) -> Any:
        return json.loads(self.body) if self.body else {}

    def flag(self, name: str) -> bool:
        return self.query.get(name, [""])[-1].lower() in ("1", "true", "yes")

    @property
    def rtype(self) -> str:
        return "dataset" if self.params.get("rtype") == "datasets" else "model"


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def json_response(data: Any, status: int = 200) -> Response:
    return Response(status, json.dumps(data).encode(), {"Content-Type": "application/json"})


def error_response(err: HubError) -> Response:
    resp = json_response({"error": err.message, **err.extra}, err.status)
    resp.headers["X-Error-Message"] = err.message.encode("latin-1", "replace").decode("latin-1")[:500]
    if err.code:
        resp.headers["X-Error-Code"] = err.code
    return resp


def repo_not_found(repo_id: str) -> HubError:
    return HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")


def entry_not_found(path: str, message: str = "Entry not found") -> HubError:
    return HubError(404, f"{message}: {path}", "EntryNotFound")


# --------------------------------------------------------------------------------------------------------
# Storage


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def iso_now() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


class HubState:
    """Repos, refs and commits (in ``state.json``) plus content-addressed blobs (in ``blobs/``).

    A repo is ``{"type", "id", "private", "createdAt", "branches": {name: sha}, "tags": {name: sha},
    "commits": {sha: commit}}``; a commit is ``{"id", "parent", "title", "message", "date", "files"}`` with
    the full file map ``{path: {"sha256", "size", "oid", "lfs"}}`` (no deltas: repos in tests are small).
    """

    def __init__(self, storage: Path, user: str, lfs_suffixes: tuple[str, ...], lfs_threshold: int):
        self.storage, self.user, self.token = storage, user, DEFAULT_TOKEN
        self.lfs_suffixes, self.lfs_threshold = lfs_suffixes, lfs_threshold
        self.lock = threading.RLock()
        (storage / "blobs").mkdir(parents=True, exist_ok=True)
        self.state_file = storage / "state.json"
        state = json.loads(self.state_file.read_text()) if self.state_file.exists() else {}
        self.repos: dict[str, Json] = state.get("repos", {})
        self.counter: int = state.get("counter", 0)

    def save(self) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"repos": self.repos, "counter": self.counter}))
        tmp.replace(self.state_file)

    # blobs
    def blob_path(self, sha256: str) -> Path:
        return self.storage / "blobs" / sha256

    def put_blob(self, data: bytes) -> str:
        sha256 = hashlib.sha256(data).hexdigest()
        path = self.blob_path(sha256)
        if not path.exists():
            tmp = path.with_name(f"{sha256}.{threading.get_ident()}.tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
        return sha256

    def read_blob(self, sha256: str) -> bytes:
        return self.blob_path(sha256).read_bytes()

    def file_record(self, data: bytes, lfs: bool) -> Json:
        sha256 = self.put_blob(data)
        oid = git_blob_oid(lfs_pointer(sha256, len(data)) if lfs else data)
        return {"sha256": sha256, "size": len(data), "oid": oid, "lfs": lfs}

    def is_lfs(self, path: str, size: int) -> bool:
        return size > 0 and (path.endswith(self.lfs_suffixes) or size >= self.lfs_threshold)

    # repos, refs, commits
    def get_repo(self, rtype: str, repo_id: str) -> Json:
        repo = self.repos.get(f"{rtype}:{repo_id}")
        if repo is None:
            raise repo_not_found(repo_id)
        return repo

    def resolve(self, repo: Json, rev: str) -> Json:
        """Commit for a branch, tag, ``refs/heads/x``, ``refs/tags/x`` or full commit sha."""
        name = rev.removeprefix("refs/heads/").removeprefix("refs/tags/")
        sha = (
            repo["branches"].get(name) or repo["tags"].get(name) or (rev if rev in repo["commits"] else None)
        )
        if sha is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return repo["commits"][sha]

    def add_commit(
        self, repo: Json, parent: str | None, files: dict[str, Json], title: str, message: str
    ) -> str:
        self.counter += 1
        seed = json.dumps([repo["id"], parent, sorted(files), title, time.time_ns(), self.counter])
        sha = hashlib.sha1(seed.encode()).hexdigest()
        repo["commits"][sha] = {
            "id": sha,
            "parent": parent,
            "title": title,
            "message": message,
            "date": iso_now(),
            "files": files,
        }
        return sha

    def history(self, repo: Json, commit: Json) -> Iterator[Json]:
        while commit is not None:
            yield commit
            commit = repo["commits"].get(commit["parent"]) if commit["parent"] else None

    def last_change(self, repo: Json, commit: Json, path: str, folder: bool) -> Json:
        """``lastCommit`` of a path: oldest commit since which the path (or folder content) is unchanged."""

        def signature(c: Json) -> Json:
            prefix = f"{path}/" if path else ""
            return {
                p: f["oid"] for p, f in c["files"].items() if (p.startswith(prefix) if folder else p == path)
            }

        target, found = signature(commit), commit
        for older in self.history(repo, commit):
            if signature(older) != target:
                break
            found = older
        return {"id": found["id"], "title": found["title"], "date": found["date"]}


# --------------------------------------------------------------------------------------------------------
# Helpers shared by handlers


def repo_url(req: Request, rtype: str, repo_id: str) -> str:
    return f"{req.base_url}/{URL_PREFIX[rtype]}{repo_id}"


def repo_and_commit(hub: HubState, req: Request) -> tuple[Json, Json]:
    repo = hub.get_repo(req.rtype, req.params["repo"])
    if repo["private"] and req.headers.get("Authorization") != f"Bearer {hub.token}":
        # The Hub answers 401 for a private repo read without the owner's token, as for a missing repo.
        raise HubError(401, f"Repository not found: {repo['id']} (private; pass the token)", "RepoNotFound")
    return repo, hub.resolve(repo, req.params.get("rev") or "main")


def file_entry(hub: HubState, repo: Json, commit: Json, path: str, expand: bool) -> Json:
    f = commit["files"][path]
    entry: Json = {"type": "file", "path": path, "size": f["size"], "oid": f["oid"]}
    if f["lfs"]:
        pointer_size = len(lfs_pointer(f["sha256"], f["size"]))
        entry["lfs"] = {"oid": f["sha256"], "size": f["size"], "pointerSize": pointer_size}
    if expand:
        entry["lastCommit"] = hub.last_change(repo, commit, path, folder=False)
    return entry


def folder_entry(hub: HubState, repo: Json, commit: Json, path: str, expand: bool) -> Json:
    prefix = f"{path}/"
    listing = "\n".join(f"{p} {f['oid']}" for p, f in sorted(commit["files"].items()) if p.startswith(prefix))
    entry: Json = {"type": "directory", "path": path, "oid": hashlib.sha1(listing.encode()).hexdigest()}
    if expand:
        entry["lastCommit"] = hub.last_change(repo, commit, path, folder=True)
    return entry


def path_entry(hub: HubState, repo: Json, commit: Json, path: str, expand: bool) -> Json | None:
    path = path.strip("/")
    if path in commit["files"]:
        return file_entry(hub, repo, commit, path, expand)
    if any(p.startswith(f"{path}/") for p in commit["files"]):
        return folder_entry(hub, repo, commit, path, expand)
    return None


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` -> inclusive (start, end); None when unsatisfiable."""
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip())
    if match is None or match.groups() == ("", ""):
        return None
    first, last = match.groups()
    if first == "":
        return max(0, size - int(last)), size - 1
    start, end = int(first), min(int(last), size - 1) if last else size - 1
    return (start, end) if start < size and start <= end else None


# --------------------------------------------------------------------------------------------------------
# Handlers


def whoami(hub: HubState, req: Request) -> Response:
    if not req.headers.get("Authorization", "").startswith("Bearer "):
        raise HubError(401, "Invalid credentials in Authorization header")
    token = {"displayName": "test-double-token", "role": "write"}
    return json_response(
        {
            "type": "user",
            "id": "0" * 24,
            "name": hub.user,
            "fullname": "Test User",
            "email": f"{hub.user}@example.invalid",
            "emailVerified": True,
            "isPro": False,
            "orgs": [],
            "auth": {"type": "access_token", "accessToken": token},
        }
    )


def create_repo(hub: HubState, req: Request) -> Response:
    body = req.json()
    rtype = body.get("type") or "model"
    if rtype not in URL_PREFIX:
        raise HubError(400, f"hub test double: repo type {rtype!r} is not supported")
    repo_id = f"{body.get('organization') or hub.user}/{body['name']}"
    url = repo_url(req, rtype, repo_id)
    if f"{rtype}:{repo_id}" in hub.repos:
        raise HubError(409, f"You already created this {rtype} repo", extra={"url": url})
    repo: Json = {
        "type": rtype,
        "id": repo_id,
        "private": bool(body.get("private")),
        "createdAt": iso_now(),
        "branches": {},
        "tags": {},
        "commits": {},
    }
    files = {".gitattributes": hub.file_record(GITATTRIBUTES, lfs=False)}
    repo["branches"]["main"] = hub.add_commit(repo, None, files, "initial commit", "")
    hub.repos[f"{rtype}:{repo_id}"] = repo
    hub.save()
    return json_response({"url": url, "name": repo_id, "id": repo_id})


def delete_repo(hub: HubState, req: Request) -> Response:
    body = req.json()
    repo_id = f"{body.get('organization') or hub.user}/{body['name']}"
    key = f"{body.get('type') or 'model'}:{repo_id}"
    if key not in hub.repos:
        raise repo_not_found(repo_id)
    del hub.repos[key]
    hub.save()
    return json_response({})


def validate_yaml(hub: HubState, req: Request) -> Response:
    return json_response({"errors": [], "warnings": []})


def repo_info(hub: HubState, req: Request) -> Response:
    repo, commit = repo_and_commit(hub, req)
    siblings = []
    for path in sorted(commit["files"]):
        sibling: Json = {"rfilename": path}
        if req.flag("blobs"):
            entry = file_entry(hub, repo, commit, path, expand=False)
            sibling.update(size=entry["size"], blobId=entry["oid"])
            if "lfs" in entry:
                lfs = entry["lfs"]
                sibling["lfs"] = {
                    "size": lfs["size"],
                    "sha256": lfs["oid"],
                    "pointerSize": lfs["pointerSize"],
                }
        siblings.append(sibling)
    author = repo["id"].split("/")[0]
    return json_response(
        {
            "_id": hashlib.sha1(repo["id"].encode()).hexdigest()[:24],
            "id": repo["id"],
            "author": author,
            "sha": commit["id"],
            "private": repo["private"],
            "gated": False,
            "disabled": False,
            "createdAt": repo["createdAt"],
            "lastModified": commit["date"],
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
        }
    )


def list_tree(hub: HubState, req: Request) -> Response:
    repo, commit = repo_and_commit(hub, req)
    path = (req.params.get("path") or "").strip("/")
    prefix = f"{path}/" if path else ""
    under = sorted(p for p in commit["files"] if p.startswith(prefix))
    if path and not under:
        raise entry_not_found(path, "Folder not found")
    recursive, expand = req.flag("recursive"), req.flag("expand")
    folders: set[str] = set()
    files: list[str] = []
    for p in under:
        parts = p[len(prefix) :].split("/")
        if recursive:
            folders.update(prefix + "/".join(parts[:i]) for i in range(1, len(parts)))
            files.append(p)
        elif len(parts) == 1:
            files.append(p)
        else:
            folders.add(prefix + parts[0])
    entries = [folder_entry(hub, repo, commit, d, expand) for d in sorted(folders)]
    entries += [file_entry(hub, repo, commit, f, expand) for f in files]
    return json_response(entries)


def paths_info(hub: HubState, req: Request) -> Response:
    repo, commit = repo_and_commit(hub, req)
    if req.headers.get("Content-Type", "").startswith("application/json"):
        body = req.json()
        paths, expand = body.get("paths", []), bool(body.get("expand"))
    else:
        form = parse_qs(req.body.decode())
        paths, expand = form.get("paths", []), form.get("expand", [""])[-1].lower() in ("1", "true")
    entries = [path_entry(hub, repo, commit, p, expand) for p in paths]
    return json_response([e for e in entries if e is not None])


def list_refs(hub: HubState, req: Request) -> Response:
    repo = hub.get_repo(req.rtype, req.params["repo"])

    def refs(kind: str, names: dict[str, str]) -> list[Json]:
        return [
            {"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": sha} for n, sha in sorted(names.items())
        ]

    return json_response(
        {
            "branches": refs("heads", repo["branches"]),
            "tags": refs("tags", repo["tags"]),
            "converts": [],
            "pullRequests": [],
        }
    )


def list_commits(hub: HubState, req: Request) -> Response:
    repo, commit = repo_and_commit(hub, req)
    authors = [{"user": hub.user}]
    items = [
        {"id": c["id"], "title": c["title"], "message": c["message"], "date": c["date"], "authors": authors}
        for c in hub.history(repo, commit)
    ]
    return json_response(items)


def create_branch(hub: HubState, req: Request) -> Response:
    repo = hub.get_repo(req.rtype, req.params["repo"])
    branch = req.params["branch"]
    if branch in repo["branches"]:
        raise HubError(409, f"Reference already exists: refs/heads/{branch}")
    start = hub.resolve(repo, req.json().get("startingPoint") or "main")
    repo["branches"][branch] = start["id"]
    hub.save()
    return json_response({})


def create_tag(hub: HubState, req: Request) -> Response:
    repo, commit = repo_and_commit(hub, req)
    tag = req.json()["tag"]
    if tag in repo["tags"]:
        raise HubError(409, f"Reference already exists: refs/tags/{tag}")
    repo["tags"][tag] = commit["id"]
    hub.save()
    return json_response({})


def preupload(hub: HubState, req: Request) -> Response:
    repo = hub.get_repo(req.rtype, req.params["repo"])
    branch_sha = repo["branches"].get(req.params["rev"])
    current = repo["commits"][branch_sha]["files"] if branch_sha else {}
    answers = []
    for item in req.json().get("files", []):
        path, size = item["path"], int(item.get("size", 0))
        mode = "lfs" if hub.is_lfs(path, size) else "regular"
        existing = current.get(path)
        oid = (existing["sha256"] if mode == "lfs" else existing["oid"]) if existing else None
        answers.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
    return json_response({"files": answers, "commitOid": branch_sha})


def commit(hub: HubState, req: Request) -> Response:
    if req.flag("create_pr"):
        raise HubError(400, "hub test double: create_pr is not supported")
    repo = hub.get_repo(req.rtype, req.params["repo"])
    branch = req.params["rev"].removeprefix("refs/heads/")
    if branch not in repo["branches"]:
        raise HubError(
            404, f"Invalid rev id: {branch} (commits go to an existing branch)", "RevisionNotFound"
        )
    head = repo["branches"][branch]
    files = dict(repo["commits"][head]["files"])
    header: Json = {}
    for line in req.body.splitlines():
        if not line.strip():
            continue
        item = json.loads(line)
        key, value = item["key"], item["value"]
        if key == "header":
            header = value
        else:
            apply_operation(hub, files, key, value)
    parent = header.get("parentCommit")
    if parent and parent != head:
        raise HubError(412, "A commit has happened since. Please refresh and try again.")
    sha = hub.add_commit(repo, head, files, header.get("summary", ""), header.get("description", ""))
    repo["branches"][branch] = sha
    hub.save()
    commit_url = f"{repo_url(req, repo['type'], repo['id'])}/commit/{sha}"
    return json_response({"success": True, "commitUrl": commit_url, "commitOid": sha, "pullRequestUrl": None})


def apply_operation(hub: HubState, files: dict[str, Json], key: str, value: Json) -> None:
    path = value["path"].strip("/")
    if key == "file":
        content = value["content"]
        data = base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
        files[path] = hub.file_record(data, lfs=False)
    elif key == "lfsFile":
        sha256 = value["oid"]
        if not hub.blob_path(sha256).exists():
            raise HubError(400, f"LFS object {sha256} for {path} was not uploaded")
        files[path] = hub.file_record(hub.read_blob(sha256), lfs=True)
    elif key == "deletedFile":
        if files.pop(path, None) is None:
            raise entry_not_found(path, "A file with this name doesn't exist")
    elif key == "deletedFolder":
        doomed = [p for p in files if p.startswith(f"{path}/")]
        if not doomed:
            raise entry_not_found(path, "A folder with this name doesn't exist")
        for p in doomed:
            del files[p]
    else:
        raise HubError(400, f"hub test double: unsupported commit operation {key!r}")


def lfs_batch(hub: HubState, req: Request) -> Response:
    hub.get_repo(req.rtype, req.params["repo"])
    body = req.json()
    if body.get("operation") != "upload":
        raise HubError(400, "hub test double: only LFS uploads are supported")
    objects = []
    for obj in body.get("objects", []):
        answer: Json = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
        if not hub.blob_path(obj["oid"]).exists():
            answer["actions"] = {"upload": {"href": f"{req.base_url}/lfs-upload/{obj['oid']}", "header": {}}}
        objects.append(answer)
    return json_response({"transfer": "basic", "objects": objects, "hash_algo": "sha256"})


def lfs_upload(hub: HubState, req: Request) -> Response:
    if hashlib.sha256(req.body).hexdigest() != req.params["oid"]:
        raise HubError(400, "hub test double: uploaded content does not match its sha256")
    hub.put_blob(req.body)
    return Response(200)


def resolve_file(hub: HubState, req: Request) -> Response:
    repo, commit = repo_and_commit(hub, req)
    path = req.params["path"]
    f = commit["files"].get(path)
    if f is None:
        raise entry_not_found(path)
    data = hub.read_blob(f["sha256"])
    etag = f'"{f["sha256"] if f["lfs"] else f["oid"]}"'
    headers = {
        "X-Repo-Commit": commit["id"],
        "ETag": etag,
        "Accept-Ranges": "bytes",
        "Content-Type": "application/octet-stream",
    }
    if f["lfs"]:
        headers.update({"X-Linked-Etag": etag, "X-Linked-Size": str(f["size"])})
    range_header = req.headers.get("Range")
    if not range_header or not data:
        return Response(200, data, headers)
    byte_range = parse_range(range_header, len(data))
    if byte_range is None:
        return Response(416, b"", {**headers, "Content-Range": f"bytes */{len(data)}"})
    start, end = byte_range
    headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
    return Response(206, data[start : end + 1], headers)


# --------------------------------------------------------------------------------------------------------
# Dispatch table: (method, path regex) -> handler. GET routes also answer HEAD. Groups are percent-decoded.

Handler = Callable[[HubState, Request], Response]
_REPO = r"(?P<repo>[^/]+(?:/[^/]+)?)"
_API = r"/api/(?P<rtype>models|datasets)/" + _REPO
_GIT = r"/(?:(?P<rtype>datasets)/)?" + _REPO

ROUTES: list[tuple[str, re.Pattern[str], Handler]] = [
    (method, re.compile(pattern), handler)
    for method, pattern, handler in [
        ("GET", r"/api/whoami-v2", whoami),
        ("POST", r"/api/repos/create", create_repo),
        ("DELETE", r"/api/repos/delete", delete_repo),
        ("POST", r"/api/validate-yaml", validate_yaml),
        ("GET", _API, repo_info),
        ("GET", _API + r"/revision/(?P<rev>[^/]+)", repo_info),
        ("GET", _API + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", list_tree),
        ("POST", _API + r"/paths-info/(?P<rev>[^/]+)", paths_info),
        ("GET", _API + r"/refs", list_refs),
        ("GET", _API + r"/commits/(?P<rev>[^/]+)", list_commits),
        ("POST", _API + r"/branch/(?P<branch>[^/]+)", create_branch),
        ("POST", _API + r"/tag/(?P<rev>[^/]+)", create_tag),
        ("POST", _API + r"/preupload/(?P<rev>[^/]+)", preupload),
        ("POST", _API + r"/commit/(?P<rev>[^/]+)", commit),
        ("POST", _GIT + r"\.git/info/lfs/objects/batch", lfs_batch),
        ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", lfs_upload),
        ("GET", _GIT + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)", resolve_file),
    ]
]


def route(method: str, path: str) -> tuple[Handler, dict[str, str]]:
    method = "GET" if method == "HEAD" else method
    for route_method, pattern, handler in ROUTES:
        match = pattern.fullmatch(path) if route_method == method else None
        if match:
            return handler, {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
    raise HubError(404, f"hub test double: no route for {method} {path}")


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; every response carries Content-Length
    server: _Server

    def do_GET(self) -> None:
        self.dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def dispatch(self) -> None:
        url = urlsplit(self.path)
        body = self.read_body()
        try:
            handler, params = route(self.command, url.path)
            req = Request(self.command, params, parse_qs(url.query), self.headers, body, self.server.base_url)
            with self.server.hub.lock:
                resp = handler(self.server.hub, req)
        except HubError as err:
            resp = error_response(err)
        except Exception as exc:  # a bug in the double: say so loudly
            traceback.print_exc()
            resp = json_response({"error": f"hub test double internal error: {exc!r}"}, 500)
        self.send(resp)

    def read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def send(self, resp: Response) -> None:
        self.send_response(resp.status)
        for name, value in resp.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(resp.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(resp.body)

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:
            super().log_message(format, *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    hub: HubState
    verbose: bool

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"


# --------------------------------------------------------------------------------------------------------
# Running it


class HubDouble:
    """Runs the test double on ``127.0.0.1`` in a daemon thread.

    >>> hub = HubDouble(tmp_path / "hub")
    >>> url = hub.start()  # http://127.0.0.1:<free port>
    >>> subprocess.run([sys.executable, "client.py"], env=hub.client_env(tmp_path / "home"), check=True)
    >>> hub.stop()

    Without ``storage_dir`` a temporary directory is used and removed by ``stop()``.
    """

    def __init__(
        self,
        storage_dir: str | os.PathLike[str] | None = None,
        *,
        port: int = 0,
        user: str = DEFAULT_USER,
        lfs_suffixes: tuple[str, ...] = DEFAULT_LFS_SUFFIXES,
        lfs_threshold: int = DEFAULT_LFS_THRESHOLD,
        verbose: bool = False,
    ):
        self._own_storage = storage_dir is None
        self.storage = (
            Path(storage_dir) if storage_dir is not None else Path(tempfile.mkdtemp(prefix="hubdbl-"))
        )
        self.port, self.user, self.verbose = port, user, verbose
        self.lfs_suffixes, self.lfs_threshold = lfs_suffixes, lfs_threshold
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("HubDouble is not started")
        return self._server.base_url

    def make_server(self) -> _Server:
        server = _Server(("127.0.0.1", self.port), _RequestHandler)
        server.hub = HubState(self.storage, self.user, self.lfs_suffixes, self.lfs_threshold)
        server.verbose = self.verbose
        return server

    def start(self) -> str:
        if self._server is None:
            self._server = self.make_server()
            self._thread = threading.Thread(target=self._server.serve_forever, name="hub-double", daemon=True)
            self._thread.start()
        return self.url

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._thread is not None:
                self._thread.join(timeout=5)
            self._server = self._thread = None
        if self._own_storage:
            shutil.rmtree(self.storage, ignore_errors=True)

    def __enter__(self) -> HubDouble:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def client_env(self, home: str | os.PathLike[str], base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for a fresh client process: endpoint, fake token, caches under ``home``, no proxy."""
        home = Path(home)
        env = dict(os.environ if base is None else base)
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN_PATH"):
            env.pop(name, None)
        no_proxy = ",".join(filter(None, [env.get("NO_PROXY", ""), "127.0.0.1", "localhost"]))
        env.update(
            HF_ENDPOINT=self.url,
            HF_TOKEN=DEFAULT_TOKEN,
            HF_HOME=str(home),
            HF_HUB_CACHE=str(home / "hub"),
            HF_DATASETS_CACHE=str(home / "datasets"),
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_XET="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            HF_DATASETS_DISABLE_PROGRESS_BARS="1",
            NO_PROXY=no_proxy,
            no_proxy=no_proxy,
        )
        return env


@contextmanager
def running_hub_double(
    storage_dir: str | os.PathLike[str] | None = None, **kwargs: Any
) -> Iterator[HubDouble]:
    """Context manager for fixtures: ``with running_hub_double(tmp_path / "hub") as hub: yield hub``."""
    hub = HubDouble(storage_dir, **kwargs)
    hub.start()
    try:
        yield hub
    finally:
        hub.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="TEST DOUBLE of the Hugging Face Hub API (offline tests only)."
    )
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: a free one)")
    parser.add_argument("--storage", required=True, help="directory for blobs and state.json")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)
    server = HubDouble(args.storage, port=args.port, verbose=args.verbose).make_server()
    print(f"HUB_DOUBLE_URL={server.base_url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    sys.exit(main())
