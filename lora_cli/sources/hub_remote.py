"""A Hub base planned from its headers and fetched shard by shard.

A merge reads each base shard once, and a ``--part`` job only some of them, so downloading
the whole snapshot first costs the disk of the whole model. Here the repo is pinned to one
commit sha for the whole job (a branch that moves meanwhile changes nothing we read), the
small files (index, config, tokenizer, licence) are downloaded, and every shard's
safetensors header is read by HTTP range requests and checked by our own parser
(``safetensors_format``), so planning, ``--dry-run`` and a part's split need no shard on
disk. A shard is downloaded (``hf_hub_download``, into the ordinary Hugging Face cache)
when a tensor is first read from it, and ``evict`` deletes it again once the merge is
done with it: a job's disk peak is then about one input shard plus one output shard.

Offline (``HF_HUB_OFFLINE=1``) or for a base without safetensors weights, ``sources/hub.py``'s
snapshot path is used instead.
"""

from __future__ import annotations

import errno
import os
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from lora_cli.errors import HubError
from lora_cli.io.reader import TensorSource, open_from_headers
from lora_cli.io.safetensors_format import MAX_HEADER_SIZE, SafetensorsHeader, parse_header_bytes
from lora_cli.sources.hub import (
    HubRef,
    Notice,
    hub_error,
    hub_error_kind,
    hub_progress_bars,
    select_files,
)

FIRST_RANGE = 100_000  # huggingface_hub's guess: most headers fit, one request per shard
HEADER_THREADS = 8
RETRIES = 5
RETRY_BASE_S = 0.25
RETRY_MAX_S = 30.0
TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
_DROPPED = {  # the HTTP clients' names for a connection that failed or dropped
    "ConnectError", "ReadError", "WriteError", "RemoteProtocolError", "ReadTimeout",
    "ConnectTimeout", "ConnectionError", "ChunkedEncodingError",
}  # fmt: skip

T = TypeVar("T")


@dataclass
class Fetched:
    """What a job took from the Hub, for ``--json``."""

    headers: dict[str, int] = field(default_factory=dict)  # shard → header bytes read
    files: dict[str, int] = field(default_factory=dict)  # file → bytes downloaded
    evicted: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "header_bytes": sum(self.headers.values()),
            "headers": len(self.headers),
            "files": dict(sorted(self.files.items())),
            "bytes": sum(self.files.values()),
            "evicted": sorted(self.evicted),
        }


@dataclass
class RemoteBase:
    """A Hub model repo pinned to one commit; files land in its cache snapshot folder."""

    ref: HubRef
    commit: str
    folder: Path  # the cache's snapshots/<commit>/
    sizes: dict[str, int]  # the repo's files at that commit
    index: str | None
    shards: list[str]
    progress: bool = True
    fetched: Fetched = field(default_factory=Fetched)

    @property
    def label(self) -> str:
        return f"{self.ref.repo_id}@{self.commit}"

    def open(self) -> RemoteSource:
        """The base as a tensor source: headers read now (in parallel), data on first read."""
        paths = [self.folder / s for s in self.shards]
        with ThreadPoolExecutor(HEADER_THREADS) as pool:
            headers = dict(zip(paths, pool.map(self._header, paths), strict=True))

        def make(*args: Any, **kwargs: Any) -> RemoteSource:
            return RemoteSource(self, *args, **kwargs)

        index = self.folder / self.index if self.index else None
        source = open_from_headers(index, paths, headers.__getitem__, make)
        assert isinstance(source, RemoteSource)
        return source

    # -- headers -------------------------------------------------------------------------
    def _header(self, path: Path) -> SafetensorsHeader:
        name = path.name
        if path.is_file():  # already cached: its own bytes
            from lora_cli.io.safetensors_format import read_header

            return read_header(path)
        size = self.sizes.get(name)
        head, total = self._range(name, 0, FIRST_RANGE)
        size = total if total is not None else size
        if size is None:
            size = len(head)
        if len(head) >= 8:
            (n,) = struct.unpack("<Q", head[:8])
            if n <= MAX_HEADER_SIZE and len(head) < 8 + n <= size:
                more, _ = self._range(name, len(head), 8 + n - 1)
                head += more
        self.fetched.headers[name] = len(head)
        return parse_header_bytes(path, head, size)

    def _range(self, name: str, start: int, stop: int) -> tuple[bytes, int | None]:
        """Bytes ``start..stop`` (inclusive) of ``name`` at the pinned commit, and the file's
        size when the server says it (``Content-Range``)."""
        from huggingface_hub import constants, hf_hub_url
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        url = hf_hub_url(self.ref.repo_id, name, revision=self.commit, endpoint=constants.ENDPOINT)
        headers = {**build_hf_headers(), "Range": f"bytes={start}-{stop}"}

        def get() -> tuple[bytes, int | None]:
            # streamed and cut at what was asked: a server that ignores Range (200, the whole
            # file) or sends more costs no more memory than the header
            with get_session().stream(
                "GET", url, headers=headers, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    hf_raise_for_status(response)
                whole = response.status_code == 200
                want = stop + 1 if whole else stop - start + 1
                data = bytearray()
                for chunk in response.iter_bytes():
                    data += chunk
                    if len(data) >= want:
                        break
                size = response.headers.get("Content-Length" if whole else "Content-Range", "")
                size = size.rpartition("/")[2]
            data = data[start:want] if whole else data[:want]
            return bytes(data), int(size) if size.isdigit() else None

        return self.call(get, name)

    # -- files ---------------------------------------------------------------------------
    def download(self, name: str) -> Path:
        """``name`` at the pinned commit, into the cache (nothing when already there)."""
        from huggingface_hub import hf_hub_download

        target = self.folder / name
        present = target.is_file()
        # a shard is fetched mid-merge, under lora's own progress bar: the Hub's stays off
        with hub_progress_bars(self.progress and not name.endswith(".safetensors")):
            path = Path(
                self.call(
                    lambda: hf_hub_download(self.ref.repo_id, name, revision=self.commit), name
                )
            )
        if not present:
            self.fetched.files[name] = path.stat().st_size
        return path

    def evict(self, path: Path) -> bool:
        """Delete a shard this job downloaded: the snapshot's link and the blob behind it."""
        if path.name not in self.fetched.files or path.name in self.fetched.evicted:
            return False
        blob = path.resolve()
        for p in {path, blob}:
            p.unlink(missing_ok=True)
        self.fetched.evicted.append(path.name)
        return True

    def call(self, fn: Callable[[], T], name: str = "") -> T:
        """``fn`` with retries and backoff on transient errors (429, 5xx, dropped
        connections); other failures become one-line HubErrors."""
        return with_retries(fn, lambda exc: remote_error(self.ref, "base", exc, name))


class RemoteSource(TensorSource):
    """A TensorSource whose shards are fetched on first read and can be evicted after."""

    def __init__(self, remote: RemoteBase, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.remote = remote
        self._fetch_lock = threading.Lock()

    def fd(self, path: Path) -> int:
        if path not in self._fds:
            with self._fetch_lock:
                if path not in self._fds and not path.is_file():
                    self.remote.download(path.name)
                return super().fd(path)
        return super().fd(path)

    def identity(self) -> str | None:
        return f"hub:{self.remote.label}"

    def evict(self, path: Path) -> bool:
        with self._fetch_lock:
            fd = self._fds.pop(path, None)
            if fd is not None:
                os.close(fd)
            return self.remote.evict(path)


def remote_base(
    ref: str | Path, what: str, notice: Notice | None, progress: bool
) -> RemoteBase | None:
    """``ref`` pinned (``pin_remote``) when it names a Hub repo and the Hub is online (not
    ``HF_HUB_OFFLINE``); None for a local path, offline, or a repo without safetensors."""
    from huggingface_hub import constants

    from lora_cli.sources.hub import names_hub_repo, parse_repo_ref

    hub = parse_repo_ref(str(ref)) if names_hub_repo(ref) else None
    if hub is None or constants.HF_HUB_OFFLINE:
        return None
    return pin_remote(hub, what, notice, progress)


def pin_remote(ref: HubRef, what: str, notice: Notice | None, progress: bool) -> RemoteBase | None:
    """``ref`` pinned to its current commit with its small files downloaded, or None when it
    has no safetensors weights (the snapshot path then serves)."""
    from huggingface_hub import HfApi

    def info() -> Any:
        return HfApi().model_info(ref.repo_id, revision=ref.revision, files_metadata=True)

    repo = with_retries(info, lambda exc: remote_error(ref, what, exc))
    sizes = {s.rfilename: int(s.size or 0) for s in repo.siblings or []}
    wanted = select_files(sizes)
    shards = [n for n in wanted if n.endswith(".safetensors")]
    if not shards or not repo.sha:
        return None
    indexes = [n for n in wanted if n.endswith(".safetensors.index.json")]
    index = "model.safetensors.index.json" if "model.safetensors.index.json" in indexes else None
    index = index or (indexes[0] if len(indexes) == 1 else None)
    remote = RemoteBase(ref, repo.sha, _snapshot_folder(ref.repo_id, repo.sha), sizes, index,
                        shards, progress)  # fmt: skip
    for name in wanted:
        if not name.endswith(".safetensors"):
            remote.download(name)
    if index:
        remote.shards = _indexed_shards(remote.folder / index, shards)
    _remember_ref(remote)
    if notice:
        notice(f"{what} {ref}: Hugging Face Hub commit {repo.sha}, headers only until read")
    return remote


def _remember_ref(remote: RemoteBase) -> None:
    """``refs/<revision>`` → the commit, as huggingface_hub records it when it downloads by
    branch name, so the same id resolves offline (``HF_HUB_OFFLINE=1``) later."""
    revision = remote.ref.revision or "main"
    if revision == remote.commit:
        return
    refs = remote.folder.parent.parent / "refs"
    try:
        refs.mkdir(parents=True, exist_ok=True)
        (refs / revision).write_text(remote.commit)
    except OSError:
        pass  # a convenience for later offline runs, not needed by this one


def _indexed_shards(index: Path, listed: list[str]) -> list[str]:
    """The shards the index names (the reader checks them against the listing's)."""
    import json

    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return listed  # the reader reports the broken index
    return [n for n in names if isinstance(n, str) and "/" not in n] or listed


def _snapshot_folder(repo_id: str, commit: str) -> Path:
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    name = repo_folder_name(repo_id=repo_id, repo_type="model")
    return Path(constants.HF_HUB_CACHE) / name / "snapshots" / commit


# -- errors and retries ----------------------------------------------------------------------
def status_of(exc: BaseException | None) -> int | None:
    """The HTTP status behind ``exc``, also when huggingface_hub wrapped it (an upload's
    ``RuntimeError`` has the ``HfHubHTTPError`` as its cause)."""
    for _ in range(8):
        if exc is None:
            return None
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if isinstance(status, int):
            return status
        exc = exc.__cause__ or exc.__context__
    return None


def transient(exc: BaseException) -> bool:
    if status_of(exc) in TRANSIENT_STATUS:
        return True
    names = {c.__name__ for c in type(exc).__mro__}
    return bool(names & _DROPPED)


def with_retries(fn: Callable[[], T], error: Callable[[BaseException], Exception]) -> T:
    """``fn()``, retried with exponential backoff (honouring ``Retry-After``) while the
    failure is transient; the last failure, or any other, becomes ``error(exc)``."""
    for attempt in range(RETRIES):
        try:
            return fn()
        except HubError:
            raise
        except Exception as exc:
            if not transient(exc) or attempt == RETRIES - 1:
                raise error(exc) from None
            wait = RETRY_BASE_S * 2**attempt
            after = getattr(getattr(exc, "response", None), "headers", {}).get("Retry-After")
            if after and str(after).isdigit():
                wait = max(wait, float(after))
            time.sleep(min(wait, RETRY_MAX_S))
    raise AssertionError("unreachable")


def remote_error(ref: HubRef, what: str, exc: BaseException, name: str = "") -> HubError:
    """One line for each way the Hub says no; ``name``: the file being fetched."""
    where = f"{what} {ref}" + (f": {name}" if name else "")
    status = status_of(exc)
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return HubError(
            f"{where}: the disk is full ({exc.filename or 'the Hugging Face cache'})",
            "free space, or use --part I/N with --evict to hold one shard at a time",
        )
    if hub_error_kind(exc) == "other" and status in (401, 403):
        return HubError(
            f"{where}: the Hugging Face Hub refused access ({status})",
            "set HF_TOKEN to a token that can read this repo (and accept its terms if gated)",
        )
    if status == 429:
        return HubError(
            f"{where}: rate-limited by the Hugging Face Hub (429), still after {RETRIES} tries",
            "wait and rerun; a token (HF_TOKEN) has higher limits",
        )
    if hub_error_kind(exc) == "other" and status is not None:
        return HubError(f"{where}: the Hugging Face Hub answered {status}", "rerun later")
    error = hub_error(ref, what, exc)
    if name and hub_error_kind(exc) == "other":
        error = HubError(f"{where}: transfer failed ({_first_line(exc)})", "rerun; it resumes")
    return error


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
