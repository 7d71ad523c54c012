"""A minimal Hugging Face Hub for tests: the HTTP API huggingface_hub 2.4.0 uses to plan,
download and publish a merge, served on 127.0.0.1 from a temporary folder.

Endpoints (paths as huggingface_hub 2.4.0 builds them; model repos only):

- ``GET  /api/models/{repo}[/revision/{rev}]``: repo info: ``id``, ``sha`` (the commit the
  revision names), ``private``, ``siblings`` (``rfilename``, ``size``, ``lfs``)
- ``HEAD|GET /{repo}/resolve/{rev}/{path}``: a file at a revision, never redirected:
  ``X-Repo-Commit``, ``ETag`` (the content's sha256, quoted), ``Content-Length``,
  ``Accept-Ranges``; ``Range: bytes=a-b`` answers 206 with ``Content-Range``
- ``POST /api/repos/create``: a new (empty) repo; 409 when it exists
- ``POST /api/models/{repo}/branch/{branch}``: a branch at main; 409 when it exists
- ``POST /api/validate-yaml``: the card's metadata, always accepted
- ``POST /api/models/{repo}/preupload/{rev}``: ``*.safetensors`` go by LFS, the rest inline
- ``POST /{repo}.git/info/lfs/objects/batch``: basic transfer; an upload action only for
  content the server does not hold
- ``PUT  /lfs-upload/{oid}``: the content; refused unless its sha256 is ``oid``
- ``POST /api/models/{repo}/commit/{rev}``: an NDJSON commit (``header``, ``file``,
  ``lfsFile``); ``?create_pr=1`` commits to ``refs/pr/N``

Errors carry ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``)
as the Hub does, so the client raises its own exception classes. Xet is never offered:
uploads need ``HF_HUB_DISABLE_XET=1`` (set by ``serve``). ``fail(method, pattern, status,
times)`` injects errors (401, 403, 429, 500…), ``log`` records every request and
``downloaded`` sums what was served, for assertions; ``hold`` stalls a request (to kill
the client mid-upload). ``serve`` is a context manager: the
server always stops with the test.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors",)


@dataclass
class Request:
    method: str
    path: str  # unquoted, without the query
    range: str | None
    status: int = 0
    body_bytes: int = 0  # content bytes sent (GET) or received (PUT)


@dataclass
class Repo:
    private: bool = False
    branches: dict[str, str] = field(default_factory=dict)  # ref → commit
    commits: dict[str, dict[str, str]] = field(default_factory=dict)  # commit → path → sha256
    prs: int = 0


@dataclass
class Failure:
    method: str
    pattern: re.Pattern[str]
    status: int
    times: int


class FakeHub:
    """The Hub's state: repos, commits, content-addressed blobs in ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.repos: dict[str, Repo] = {}
        self.log: list[Request] = []
        self.failures: list[Failure] = []
        self.token: str | None = None  # when set, private repos need "Bearer <token>"
        self.ignore_range = False  # answer every GET with the whole file, as some proxies do
        self.lock = threading.Lock()
        self.holds: list[tuple[str, re.Pattern[str], threading.Event]] = []
        self.release = threading.Event()
        self.endpoint = ""
        self._commits = 0

    # -- test-side helpers ------------------------------------------------------------
    def add_folder(self, repo_id: str, folder: Path, *, private: bool = False) -> str:
        """Commit every file of ``folder`` to ``repo_id``'s main; returns the commit sha."""
        files = {}
        for f in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
            files[f.relative_to(folder).as_posix()] = self._store(f.read_bytes())
        repo = self.repos.setdefault(repo_id, Repo(private=private))
        return self._commit(repo, "main", files, replace=True)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        commit = repo.branches.get(revision, revision)
        return {p: (self.blobs / s).read_bytes() for p, s in repo.commits[commit].items()}

    def fail(self, method: str, pattern: str, status: int, times: int = 1) -> None:
        """Answer the next ``times`` ``method`` requests whose path matches ``pattern``
        with ``status``."""
        self.failures.append(Failure(method, re.compile(pattern), status, times))

    def hold(self, method: str, pattern: str) -> threading.Event:
        """Stall ``method`` requests matching ``pattern`` until ``release`` is set (or the
        server stops); the returned event tells when one arrived (a client to kill)."""
        reached = threading.Event()
        self.holds.append((method, re.compile(pattern), reached))
        return reached

    def requests(self, method: str | None = None, pattern: str = "") -> list[Request]:
        rx = re.compile(pattern)
        return [r for r in self.log if (method is None or r.method == method) and rx.search(r.path)]

    def downloaded(self, repo_id: str) -> dict[str, int]:
        """Content bytes served per file of ``repo_id`` (GETs of ``resolve``)."""
        out: dict[str, int] = {}
        for r in self.requests("GET", f"^/{re.escape(repo_id)}/resolve/"):
            name = r.path.split("/resolve/", 1)[1].split("/", 1)[1]
            out[name] = out.get(name, 0) + r.body_bytes
        return out

    # -- state ------------------------------------------------------------------------
    def _store(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        blob = self.blobs / sha
        if not blob.exists():
            blob.write_bytes(data)
        return sha

    def _commit(self, repo: Repo, ref: str, files: dict[str, str], *, replace: bool) -> str:
        with self.lock:
            self._commits += 1
            parent = repo.commits.get(repo.branches.get(ref, ""), {})
            tree = dict(files) if replace else {**parent, **files}
            sha = hashlib.sha1(f"{self._commits}:{sorted(tree.items())}".encode()).hexdigest()
            repo.commits[sha] = tree
            repo.branches[ref] = sha
            return sha


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # TCP_NODELAY

    def log_message(self, *args: object) -> None:  # quiet
        pass

    # -- plumbing ---------------------------------------------------------------------
    def _start(self) -> tuple[str, dict[str, list[str]]]:
        url = urlsplit(self.path)
        path = unquote(url.path)
        self.record = Request(self.command, path, self.headers.get("Range"))
        self.hub.log.append(self.record)
        return path, parse_qs(url.query)

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        if n:
            return self.rfile.read(n)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        return b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.record.status = status
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)
            self.record.body_bytes = len(body)

    def _json(self, status: int, obj: object, code: str | None = None) -> None:
        headers = {"Content-Type": "application/json"}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, json.dumps(obj).encode(), headers)

    def _error(self, status: int, code: str | None, message: str) -> None:
        self._json(status, {"error": message}, code)

    def _injected(self, path: str) -> bool:
        for method, pattern, reached in self.hub.holds:
            if method == self.command and pattern.search(path):
                reached.set()
                self.hub.release.wait(60)
        with self.hub.lock:
            for f in self.hub.failures:
                if f.times > 0 and f.method == self.command and f.pattern.search(path):
                    f.times -= 1
                    status = f.status
                    break
            else:
                return False
        headers = {"Retry-After": "0"} if status == 429 else {}
        body = json.dumps({"error": f"injected {status}"}).encode()
        self._send(status, body, {"Content-Type": "application/json", **headers})
        return True

    def _repo(self, repo_id: str) -> Repo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return None
        bearer = f"Bearer {self.hub.token}"
        if repo.private and self.hub.token and self.headers.get("Authorization") != bearer:
            self._error(401, "RepoNotFound", "Invalid username or password.")
            return None
        return repo

    def _revision(self, repo: Repo, rev: str) -> str | None:
        rev = unquote(rev)
        if rev in repo.branches:
            return repo.branches[rev]
        if rev in repo.commits:
            return rev
        self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return None

    # -- dispatch ---------------------------------------------------------------------
    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        path, _ = self._start()
        if self._injected(path):
            return
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?", path)
        if m:
            return self._info(m.group(1), m.group(2) or "main")
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m:
            return self._resolve(m.group(1), m.group(2), m.group(3))
        self._error(404, None, f"no route {path}")

    def do_POST(self) -> None:
        path, query = self._start()
        body = self._body()
        if self._injected(path):
            return
        if path == "/api/repos/create":
            return self._create(json.loads(body))
        if path == "/api/validate-yaml":
            return self._json(200, {"warnings": []})
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/branch/(.+)", path)
        if m:
            return self._branch(m.group(1), m.group(2))
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/(.+)", path)
        if m:
            return self._preupload(m.group(1), json.loads(body))
        m = re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)
        if m:
            return self._batch(m.group(1), json.loads(body))
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/(.+)", path)
        if m:
            return self._commit(m.group(1), m.group(2), body, query)
        self._error(404, None, f"no route {path}")

    def do_PUT(self) -> None:
        path, _ = self._start()
        body = self._body()
        self.record.body_bytes = len(body)
        if self._injected(path):
            return
        m = re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", path)
        if not m:
            return self._error(404, None, f"no route {path}")
        if hashlib.sha256(body).hexdigest() != m.group(1):
            return self._error(400, None, "content does not match its oid")
        self.hub._store(body)
        self._send(200)

    # -- endpoints --------------------------------------------------------------------
    def _at(self, repo_id: str, rev: str) -> tuple[Repo, str] | None:
        """The repo and the commit ``rev`` names; None once the error is sent."""
        repo = self._repo(repo_id)
        commit = self._revision(repo, rev) if repo is not None else None
        return (repo, commit) if repo is not None and commit is not None else None

    def _info(self, repo_id: str, rev: str) -> None:
        found = self._at(repo_id, rev)
        if found is None:
            return
        repo, commit = found
        siblings = []
        for name, sha in sorted(repo.commits[commit].items()):
            size = (self.hub.blobs / sha).stat().st_size
            entry: dict = {"rfilename": name, "size": size, "blobId": sha[:40]}
            if name.endswith(LFS_SUFFIXES):
                entry["lfs"] = {"sha256": sha, "size": size, "pointerSize": 134}
            siblings.append(entry)
        self._json(
            200,
            {"id": repo_id, "modelId": repo_id, "sha": commit, "private": repo.private,
             "siblings": siblings, "tags": [], "downloads": 0, "likes": 0},
        )  # fmt: skip

    def _resolve(self, repo_id: str, rev: str, name: str) -> None:
        found = self._at(repo_id, rev)
        if found is None:
            return
        repo, commit = found
        sha = repo.commits[commit].get(name)
        if sha is None:
            return self._error(404, "EntryNotFound", f"{name} not found")
        blob = self.hub.blobs / sha
        size = blob.stat().st_size
        headers = {
            "X-Repo-Commit": commit,
            "ETag": f'"{sha}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        start, stop = 0, size
        status = 200
        rng = None if self.hub.ignore_range else self.headers.get("Range")
        if rng:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if not m or int(m.group(1)) >= max(size, 1):
                return self._send(416, b"", {"Content-Range": f"bytes */{size}"})
            start = int(m.group(1))
            stop = min(size, int(m.group(2)) + 1) if m.group(2) else size
            status = 206
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
        headers["Content-Length"] = str(stop - start)
        self.record.status = status
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD":
            return
        with open(blob, "rb") as f:
            f.seek(start)
            left = stop - start
            while left:
                chunk = f.read(min(left, 1 << 20))
                self.wfile.write(chunk)
                left -= len(chunk)
                self.record.body_bytes += len(chunk)

    def _create(self, payload: dict) -> None:
        repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}"
        if "/" in payload["name"]:
            repo_id = payload["name"]
        if repo_id in self.hub.repos:
            return self._json(409, {"error": "You already created this model repo",
                                    "url": f"{self.hub.endpoint}/{repo_id}"})  # fmt: skip
        repo = Repo(private=bool(payload.get("private")))
        self.hub.repos[repo_id] = repo
        self.hub._commit(repo, "main", {}, replace=True)
        self._json(200, {"url": f"{self.hub.endpoint}/{repo_id}", "name": repo_id})

    def _branch(self, repo_id: str, branch: str) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        if branch in repo.branches:
            return self._json(409, {"error": "Reference already exists"})
        repo.branches[branch] = repo.branches["main"]
        self._json(200, {})

    def _preupload(self, repo_id: str, payload: dict) -> None:
        if self._repo(repo_id) is None:
            return
        files = [
            {"path": f["path"], "shouldIgnore": False,
             "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular"}
            for f in payload["files"]
        ]  # fmt: skip
        self._json(200, {"files": files})

    def _batch(self, repo_id: str, payload: dict) -> None:
        if self._repo(repo_id) is None:
            return
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if not (self.hub.blobs / obj["oid"]).exists():
                href = f"{self.hub.endpoint}/lfs-upload/{obj['oid']}"
                entry["actions"] = {"upload": {"href": href}}
            objects.append(entry)
        self._json(200, {"transfer": "basic", "objects": objects})

    def _commit(self, repo_id: str, rev: str, body: bytes, query: dict) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        rev = unquote(rev)
        if rev not in repo.branches:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        files: dict[str, str] = {}
        for line in body.splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "file":
                files[value["path"]] = self.hub._store(base64.b64decode(value["content"]))
            elif item["key"] == "lfsFile":
                if not (self.hub.blobs / value["oid"]).exists():
                    return self._error(400, None, f"LFS object {value['oid']} was not uploaded")
                files[value["path"]] = value["oid"]
        ref = rev
        if query.get("create_pr") in (["1"], ["true"], ["True"]):
            repo.prs += 1
            ref = f"refs/pr/{repo.prs}"
            repo.branches[ref] = repo.branches[rev]
        commit = self.hub._commit(repo, ref, files, replace=False)
        answer = {"commitUrl": f"{self.hub.endpoint}/{repo_id}/commit/{commit}",
                  "commitOid": commit}  # fmt: skip
        if ref != rev:
            answer["pullRequestUrl"] = f"{self.hub.endpoint}/{repo_id}/discussions/{repo.prs}"
        self._json(200, answer)


@contextlib.contextmanager
def serve(root: Path, monkeypatch=None) -> Iterator[FakeHub]:
    """Run a FakeHub on a free 127.0.0.1 port; with ``monkeypatch``, point huggingface_hub
    at it (``HF_ENDPOINT``) with Xet off and a cache under ``root``. Stops on exit."""
    hub = FakeHub(Path(root) / "server")
    handler = type("Handler", (_Handler,), {"hub": hub})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    hub.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        if monkeypatch is not None:
            point_client_at(hub, monkeypatch, Path(root) / "cache")
        yield hub
    finally:
        hub.release.set()
        server.shutdown()
        server.server_close()
        thread.join(10)
        shutil.rmtree(hub.root, ignore_errors=True)


def point_client_at(hub: FakeHub, monkeypatch, cache: Path) -> None:
    """huggingface_hub (already imported, constants read at import) talks to ``hub``."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}")  # fmt: skip
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
