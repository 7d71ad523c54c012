"""The part record (``part.json``): what ``merge --part`` wrote, checked field by field at the join.

A record arrives from another job, machine or CI artifact, so ``--join`` treats it as input
from a stranger: bounded size and depth, no duplicate keys, every field of the one type and
format it may have (a sha256 is 64 lowercase hex digits, a shard name is a plain file name,
sizes are integers in range). Only then are its values compared with the join's own plan and
its digests with the bytes on disk.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_cli.errors import LoraError

SCHEMA = "lora-part/1"
RECORD_NAME = "part.json"
MAX_RECORD_BYTES = 4 << 20  # ~30 k shards; a real record is a few KB (parsed: < 100 MB)
MAX_PARTS = 1 << 16
MAX_SHARD_BYTES = 1 << 50  # 1 PiB
MAX_NAME = 255
MAX_TEXT = 1 << 16
FINGERPRINT_KEYS = ("lora_version", "options", "base", "adapter", "plan")
HEX_KEYS = ("base", "adapter", "plan")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_VERSION = re.compile(r"[0-9A-Za-z.+_-]{1,64}")
_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


class PartError(LoraError):
    """A part is missing, incomplete, duplicated, stale, altered or from other inputs."""


@dataclass(frozen=True)
class ShardRecord:
    nbytes: int
    sha256: str


@dataclass(frozen=True)
class PushedRecord:
    """``merge --part --push-to-hub``: the repo (and branch) the part pre-uploaded its shards
    to, and what it uploaded; ``--join --push-to-hub`` commits them by hash."""

    repo: str
    revision: str | None
    shards: dict[str, ShardRecord]

    def to_json(self) -> dict[str, Any]:
        return {"repo": self.repo, "revision": self.revision, "shards": _shards_json(self.shards)}


@dataclass(frozen=True)
class PartRecord:
    part: int
    of: int
    fingerprint: dict[str, str]
    shards: dict[str, ShardRecord]
    pushed: PushedRecord | None = None

    def to_json(self) -> dict[str, Any]:
        doc = {
            "schema": SCHEMA,
            "part": self.part,
            "of": self.of,
            "fingerprint": dict(self.fingerprint),
            "shards": _shards_json(self.shards),
        }
        if self.pushed is not None:
            doc["pushed"] = self.pushed.to_json()
        return doc


def _shards_json(shards: dict[str, ShardRecord]) -> dict[str, Any]:
    return {n: {"bytes": s.nbytes, "sha256": s.sha256} for n, s in shards.items()}


def read_record(path: Path, rerun: str) -> PartRecord:
    """The record at ``path``, checked; ``rerun`` is the command that rewrites it."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_RECORD_BYTES + 1)
    except OSError as exc:
        raise PartError(f"{path}: cannot read the part record ({exc.strerror})", rerun) from None
    return parse_record(data, path, rerun)


def parse_record(data: bytes, path: Path, rerun: str) -> PartRecord:
    """``data`` as a part record, or one ``PartError`` naming ``path`` and the field."""

    def bad(what: str) -> PartError:
        return PartError(f"{path}: {what}", rerun)

    if len(data) > MAX_RECORD_BYTES:
        raise bad(f"part record larger than {MAX_RECORD_BYTES >> 20} MiB")
    try:
        doc = json.loads(
            data.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constant
        )
    except RecursionError:
        raise bad("part record nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad(f"part record is not valid JSON ({_short(exc)})") from None
    doc = _obj(doc, "record", bad)
    _keys(doc, ("schema", "part", "of", "fingerprint", "shards"), "record", bad, ("pushed",))
    if doc["schema"] != SCHEMA:
        raise bad(f"schema is {_show(doc['schema'])}, not {SCHEMA!r} (another lora version?)")
    of = _int(doc["of"], "of", 1, MAX_PARTS, bad)
    part = _int(doc["part"], "part", 1, of, bad)
    fp = _obj(doc["fingerprint"], "fingerprint", bad)
    _keys(fp, FINGERPRINT_KEYS, "fingerprint", bad)
    for key in FINGERPRINT_KEYS:
        value = fp[key]
        if not isinstance(value, str):
            raise bad(f"fingerprint.{key} is {_kind(value)}, not a string")
        if key in HEX_KEYS and not _SHA256.fullmatch(value):
            raise bad(f"fingerprint.{key} is not 64 lowercase hex digits")
        if key == "lora_version" and not _VERSION.fullmatch(value):
            raise bad("fingerprint.lora_version is not a version number")
        if key == "options" and (len(value) > MAX_TEXT or not value.isprintable()):
            raise bad("fingerprint.options is too long or holds control characters")
    shards = _shards(doc["shards"], "shards", bad)
    pushed = _pushed(doc["pushed"], bad) if "pushed" in doc else None
    return PartRecord(part, of, {k: fp[k] for k in FINGERPRINT_KEYS}, shards, pushed)


def parse_pushed(doc: object, path: Path, rerun: str) -> PushedRecord:
    """A ``pushed`` entry, checked as the join will check it (also before a part writes it)."""
    return _pushed(doc, lambda what: PartError(f"{path}: {what}", rerun))


def _shards(value: object, field: str, bad: Any) -> dict[str, ShardRecord]:
    shards: dict[str, ShardRecord] = {}
    for name, entry in _obj(value, field, bad).items():
        _check_name(name, bad)
        entry = _obj(entry, f"{field}[{name!r}]", bad)
        _keys(entry, ("bytes", "sha256"), f"{field}[{name!r}]", bad)
        nbytes = _int(entry["bytes"], f"{field}[{name!r}].bytes", 8, MAX_SHARD_BYTES, bad)
        sha = entry["sha256"]
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            raise bad(f"{field}[{name!r}].sha256 is not 64 lowercase hex digits")
        if sha == "0" * 64:
            raise bad(f"{field}[{name!r}].sha256 is all zeros (a placeholder, not a digest)")
        shards[name] = ShardRecord(nbytes, sha)
    return shards


def _pushed(value: object, bad: Any) -> PushedRecord:
    doc = _obj(value, "pushed", bad)
    _keys(doc, ("repo", "revision", "shards"), "pushed", bad)
    repo, revision = doc["repo"], doc["revision"]
    if not isinstance(repo, str) or not _REPO.fullmatch(repo):
        raise bad(f"pushed.repo {_show(repo)} is not a Hub repo id (org/name)")
    if revision is not None and (
        not isinstance(revision, str) or not revision or len(revision) > MAX_NAME
        or not revision.isprintable()
    ):  # fmt: skip
        raise bad(f"pushed.revision {_show(revision)} is not a branch name")
    return PushedRecord(repo, revision, _shards(doc["shards"], "pushed.shards", bad))


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for key, value in pairs:
        if key in doc:
            raise ValueError(f"duplicate key {key[:40]!r}")
        doc[key] = value
    return doc


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _short(exc: Exception) -> str:
    return ascii(str(exc))[1:-1][:120]


def _kind(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), "null" if value is None else "a number"
    )


def _show(value: object) -> str:
    return ascii(value)[:60] if isinstance(value, str | int | float) else _kind(value)


def _obj(value: object, field: str, bad: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise bad(f"{field} is {_kind(value)}, not an object")
    return value


def _keys(
    doc: dict[str, Any], keys: tuple[str, ...], field: str, bad: Any, optional: tuple[str, ...] = ()
) -> None:
    missing = [k for k in keys if k not in doc]
    if missing:
        raise bad(f"{field} has no {missing[0]!r}")
    extra = sorted(k for k in doc if k not in keys and k not in optional)
    if extra:
        raise bad(f"{field} has an unknown field {ascii(extra[0])[:60]}")


def _int(value: object, field: str, low: int, high: int, bad: Any) -> int:
    if type(value) is not int:
        raise bad(f"{field} is {_kind(value)}, not an integer")
    if not low <= value <= high:
        raise bad(f"{field} is {_show(value)}, outside {low}…{high}")
    return value


def _check_name(name: str, bad: Any) -> None:
    """A plain file name: the join opens it inside the part's folder and prints it."""
    if (
        not name
        or len(name) > MAX_NAME
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or not name.isprintable()
    ):
        raise bad(f"shard name {ascii(name)[:80]} is not a plain file name")
