"""Checkpoint folder layout: shard plans, the index, side files and the checksum manifest."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_cli.errors import FormatError, UsageError
from lora_cli.io import sysio
from lora_cli.io.dtypes import SAFETENSORS_DTYPES, nbytes_of
from lora_cli.io.writer import copy_file, io_error, write_small_file

MANIFEST_NAME = "lora-checksums.sha256"
WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".gguf",
    ".npz",
    ".index.json",
)
# Trainer state that is never part of a servable model.
SKIP_SIDE_FILES = {"training_args.bin", "optimizer.pt", "scheduler.pt", "trainer_state.json"}
MAX_SIDE_FILE = 200 << 20

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
}


def parse_size(text: str | int) -> int:
    """``5GB`` → 5·10⁹, ``2GiB`` → 2·2³⁰, like transformers' ``convert_file_size_to_int``."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise UsageError(f"size {text} must be positive")
        return text
    if not isinstance(text, str):
        raise UsageError(f"cannot read size {text!r}", "use a number with a unit: 500MB, 5GB, 2GiB")
    m = _SIZE_RE.match(text)
    unit = m.group(2).upper() if m else None
    if not m or unit not in _UNITS:
        raise UsageError(f"cannot read size {text!r}", "use a number with a unit: 500MB, 5GB, 2GiB")
    size = int(float(m.group(1)) * _UNITS[unit])
    if text.strip().endswith("b") and unit in ("KB", "MB", "GB", "TB"):
        size //= 8  # transformers reads a lowercase b as bits: "5Gb" is 625 MB
    if size <= 0:
        raise UsageError(f"size {text!r} must be positive")
    return size


Spec = tuple[str, str, tuple[int, ...]]


@dataclass
class ShardPlan:
    filename: str
    specs: list[Spec] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=lambda: {"format": "pt"})

    @property
    def nbytes(self) -> int:
        return sum(nbytes_of(d, s) for _, d, s in self.specs)


def plan_shards(specs: Iterable[Spec], max_shard_size: int, stem: str = "model") -> list[ShardPlan]:
    """Greedy split in the given order, as transformers does: a tensor larger than the limit
    gets a shard of its own. One shard is named ``{stem}.safetensors`` with no index."""
    shards: list[ShardPlan] = []
    current: list[Spec] = []
    size = 0
    for spec in specs:
        n = nbytes_of(spec[1], spec[2])
        if current and size + n > max_shard_size:
            shards.append(ShardPlan("", current))
            current, size = [], 0
        current.append(spec)
        size += n
    if current or not shards:
        shards.append(ShardPlan("", current))
    total = len(shards)
    for i, shard in enumerate(shards, 1):
        shard.filename = (
            f"{stem}.safetensors" if total == 1 else f"{stem}-{i:05d}-of-{total:05d}.safetensors"
        )
    return shards


def write_index(folder: Path, shards: list[ShardPlan], stem: str = "model") -> Path | None:
    """``{stem}.safetensors.index.json`` with a byte ``total_size``; none for a single file."""
    if len(shards) <= 1:
        return None
    weight_map = {name: s.filename for s in shards for name, _, _ in s.specs}
    total = sum(s.nbytes for s in shards)
    doc = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    path = folder / f"{stem}.safetensors.index.json"
    write_small_file(path, (json.dumps(doc, indent=2) + "\n").encode())
    return path


def _followable(link: Path, folder: Path) -> bool:
    """A symlinked side file is copied only when it points inside the input folder or, in
    the Hugging Face cache layout (``snapshots/<rev>/f -> ../../blobs/<hash>``), into the
    repo's ``blobs``; a link to anything else (``~/.ssh/...``) is never copied out."""
    try:
        target = link.resolve(strict=True)
        real_folder = folder.resolve(strict=True)
    except (OSError, RuntimeError):
        return False
    allowed = [real_folder]
    if real_folder.parent.name == "snapshots":
        allowed.append(real_folder.parent.parent / "blobs")
    return any(root in target.parents for root in allowed)


def side_files(folder: Path) -> list[Path]:
    """Small non-weight files that belong with a model (config, tokenizer, templates)."""
    if not folder.is_dir():
        return []
    out = []
    for p in sorted(folder.iterdir()):
        if (
            p.is_file()
            and (not p.is_symlink() or _followable(p, folder))
            and not p.name.startswith(".")
            and not p.name.endswith(WEIGHT_SUFFIXES)
            and p.name not in SKIP_SIDE_FILES
            and p.name != MANIFEST_NAME
            and p.stat().st_size <= MAX_SIDE_FILE
        ):
            out.append(p)
    return out


def copy_side_files(src: Path, dst: Path, skip: Iterable[str] = ()) -> list[str]:
    skipped = set(skip)
    copied = []
    for p in side_files(src):
        if p.name in skipped:
            continue
        copy_file(p, dst / p.name)
        copied.append(p.name)
    return copied


def config_dtype_update(config: dict[str, Any] | None, dtype: str) -> dict[str, Any]:
    """The config.json keys that record the weights' dtype (``dtype`` in transformers v5,
    ``torch_dtype`` before), set to ``dtype`` (a safetensors name)."""
    value = SAFETENSORS_DTYPES[dtype][1]
    keys = [k for k in ("dtype", "torch_dtype") if k in (config or {})] or ["torch_dtype"]
    return {k: value for k in keys}


# JSON side files are small: configs are kilobytes, and the largest index.json published
# (Kimi-K2, ~210k tensor entries for per-expert INT4 parts) is about 20 MB. 64 MiB is three
# times that, and bounds the memory a hostile "config" can make a run spend parsing it.
MAX_JSON_BYTES = 64 << 20
# Adapter configs are kilobytes; one spelling out rank_pattern/alpha_pattern for every module
# of a 100k-module MoE is a few MB. 16 MiB refuses a 60 MB "config" before it is parsed.
MAX_ADAPTER_CONFIG_BYTES = 16 << 20
# Real configs nest 4–5 levels (quantization_config.config_groups.group_0.weights); 64
# leaves room for anything a producer writes while a 100 000-deep ``[[[[…`` is refused
# before it can exhaust Python's recursion limit in the parser or in code walking it.
MAX_JSON_DEPTH = 64


def read_json(
    path: Path, what: str, *, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH
) -> dict[str, Any]:
    """A JSON object from ``path`` or a one-line error naming it.

    Bounded before it is trusted: a regular file (``sysio.read_file``: a FIFO never blocks),
    its size (``max_bytes``, checked before reading), the nesting depth (``max_depth``), and
    the top level must be an object. ``NaN``/``Infinity`` literals parse as Python floats;
    the field checks of each format refuse them where a number must be finite.
    """
    try:
        raw = sysio.read_file(path, max_bytes, what)
    except OSError as exc:
        raise FormatError(f"{path}: cannot read {what} ({exc.strerror})") from None
    try:
        doc = json.loads(raw.decode("utf-8"))
    except RecursionError:
        doc = None
        too_deep = True
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError included
        raise FormatError(f"{path}: {what} is not valid JSON ({exc})") from None
    else:
        too_deep = json_depth(doc, max_depth) > max_depth
    if too_deep:
        raise FormatError(
            f"{path}: {what} nests deeper than {max_depth} levels",
            "this is not a config a trainer writes; check the file",
        )
    if not isinstance(doc, dict):
        raise FormatError(
            f"{path}: {what} must be a JSON object, not {type(doc).__name__}",
            "the file holds another kind of JSON document",
        )
    return doc


def json_depth(doc: Any, limit: int) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0), walked without recursion and
    given up at ``limit + 1``, so the walk costs at most the document's size."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(doc, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children: Iterable[Any] = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        depth += 1
        if depth > limit:
            return depth
        deepest = max(deepest, depth)
        stack.extend((child, depth) for child in children)
    return deepest


OUTPUT_EMBEDDING = "lm_head.weight"  # the tensor transformers drops for tied embeddings


def write_json(path: Path, doc: dict[str, Any]) -> None:
    write_small_file(path, (json.dumps(doc, indent=2, sort_keys=False) + "\n").encode())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with sysio.open_binary(path) as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def fsync_file(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise io_error(path, exc) from None


def write_manifest(folder: Path, known: dict[str, str] | None = None) -> Path:
    """sha256 of every file, in ``sha256sum`` format so ``sha256sum -c`` checks it too.

    ``known`` holds digests already computed (merge hashes each shard on a spare
    thread as soon as it is complete, overlapping the hashing with the next shard).
    """
    known = known or {}
    # a known digest also stands for a shard already pushed and evicted (merge/publish.py)
    names = {p.name for p in folder.iterdir() if p.is_file()} | {n for n, d in known.items() if d}
    lines = [
        f"{known.get(name) or sha256_file(folder / name)}  {name}\n"
        for name in sorted(names)
        if name != MANIFEST_NAME
    ]
    path = folder / MANIFEST_NAME
    write_small_file(path, "".join(lines).encode())
    return path


def read_manifest(folder: Path) -> dict[str, str] | None:
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return None
    entries = {}
    text = sysio.read_file(path, MAX_JSON_BYTES, "checksum manifest").decode("utf-8", "replace")
    for line in text.splitlines():
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name:
            raise FormatError(f"{path}: malformed line {line!r}")
        entries[name] = digest
    return entries
