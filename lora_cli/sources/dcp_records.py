"""The records of a torch.distributed.checkpoint ``.metadata``, checked before anything is
allocated or read.

``.metadata`` is a stranger's pickle (parsed into inert records): every field is checked
by type and range here, and each tensor's chunks must tile it exactly — inside its bounds,
no two overlapping, together covering every element — so the assembled tensor has no
element left from ``torch.empty`` (an output is deterministic or refused). Each chunk must
also fit in the byte range that stores it and each range in its ``.distcp`` file, which
bounds every allocation by the bytes the files really hold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_cli.errors import FormatError
from lora_cli.io import sysio
from lora_cli.io.dtypes import itemsize_bits
from lora_cli.io.safe_pickle import Inert, Tag, brief

MAX_METADATA = 1 << 30
"""Bytes of ``.metadata``: a few hundred bytes per chunk, so even a 100k-tensor model
sharded over thousands of ranks stays far below 1 GiB; larger is not a checkpoint."""

MAX_TILING_CHECKS = 10_000_000
"""Chunk pairs compared while proving a tensor's chunks do not overlap. The sweep along
dimension 0 compares a chunk only with those whose rows it meets: one or a few for FSDP
(rows split across ranks) and TP×FSDP layouts, so real checkpoints use a tiny fraction;
a crafted file of many chunks stacked on the same rows is refused instead of taking
minutes."""

_HINT = "the checkpoint's .metadata is corrupt or was not written by torch.distributed.checkpoint"


@dataclass(frozen=True)
class Chunk:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    start: int
    length: int


@dataclass(frozen=True)
class Entry:
    fqn: str
    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[Chunk, ...]


def _dims(value: Any) -> tuple[int, ...] | None:
    """A shape or offset: a tuple (``torch.Size``) or list of non-negative ints, else None."""
    if isinstance(value, (tuple, list)) and all(type(v) is int and v >= 0 for v in value):
        return tuple(value)
    return None


def _dtype(props: Any) -> str | None:
    state = props.state if isinstance(props, Inert) else None
    tag = state[0] if isinstance(state, tuple) and state else _get(props, "dtype")
    return tag.dtype if isinstance(tag, Tag) else None


def _get(record: Any, name: str) -> Any:
    return record.get(name) if isinstance(record, Inert) else None


def _plain_name(rel: Any) -> bool:
    """A file name in the checkpoint folder itself (no path, no hidden file, no control)."""
    return (isinstance(rel, str) and rel != "" and not rel.startswith(".")
            and not any(c in rel for c in "/\\") and rel.isprintable())  # fmt: skip


def _is(record: Any, cls: str) -> bool:
    return isinstance(record, Inert) and record.qualname.endswith(f".{cls}")


class MetadataRecords:
    """``.metadata`` checked at its top level; ``entry`` checks one tensor's records."""

    def __init__(self, meta_path: Path, meta: Any) -> None:
        self.path = meta_path
        self.folder = meta_path.parent
        tensors, storage = _get(meta, "state_dict_metadata"), _get(meta, "storage_data")
        if not (_is(meta, "Metadata") and isinstance(tensors, dict)
                and isinstance(storage, dict)):  # fmt: skip
            raise FormatError(f"{meta_path}: not torch.distributed.checkpoint metadata "
                              "(no state_dict_metadata / storage_data)", _HINT)  # fmt: skip
        for fqn, md in tensors.items():
            if not isinstance(fqn, str):
                raise self._bad("state_dict_metadata", f"key {brief(fqn)} is not a string")
            if not (_is(md, "TensorStorageMetadata") or _is(md, "BytesStorageMetadata")):
                raise self._bad(fqn, f"record {brief(md)} is not a tensor or bytes entry")
        self.tensors: dict[str, Inert] = tensors
        self.where = self._storage(storage)
        self._sizes: dict[str, int] = {}

    def _bad(self, where: str, what: str) -> FormatError:
        return FormatError(f"{self.path}: {where[:200]!r}: {what}", _HINT)

    def _storage(self, storage: dict) -> dict[tuple[str, tuple[int, ...] | None], tuple]:
        """(fqn, chunk offsets) → (file, start, length) from ``storage_data``."""
        where: dict[tuple[str, tuple[int, ...] | None], tuple[str, int, int]] = {}
        for index, info in storage.items():
            fqn = _get(index, "fqn")
            if not (_is(index, "MetadataIndex") and isinstance(fqn, str)):
                raise self._bad("storage_data", f"key {brief(index)} is not a MetadataIndex "
                                "with a string fqn")  # fmt: skip
            offset = _get(index, "offset")
            offsets = None if offset is None else _dims(offset)
            if offset is not None and offsets is None:
                raise self._bad(fqn, f"storage_data offset {brief(offset)} is not a list of "
                                "non-negative integers")  # fmt: skip
            rel, start, length = (_get(info, k) for k in ("relative_path", "offset", "length"))
            if not _plain_name(rel):
                raise self._bad(fqn, f"relative_path {brief(rel)} is not a file name in "
                                "the checkpoint folder")  # fmt: skip
            if not (type(start) is int and type(length) is int and start >= 0 and length >= 0):
                raise self._bad(fqn, f"storage byte range offset={brief(start)}, length="
                                f"{brief(length)} is not two non-negative integers")  # fmt: skip
            where[fqn, offsets] = (rel, start, length)
        return where

    def _file_size(self, rel: str, fqn: str) -> int:
        if rel not in self._sizes:
            path = self.folder / rel
            if not path.exists() and not path.is_symlink():
                raise FormatError(f"{self.folder}: {rel} (holding {fqn}) is missing",
                                  "copy every rank's .distcp file")  # fmt: skip
            self._sizes[rel] = sysio.regular_size(path)
        return self._sizes[rel]

    def entry(self, fqn: str, md: Inert) -> Entry:
        """One tensor: its shape and dtype, and chunks proven to tile it."""
        shape = _dims(md.get("size"))
        if shape is None:
            raise self._bad(fqn, f"size {brief(md.get('size'))} is not a list of "
                            "non-negative integers")  # fmt: skip
        dtype = _dtype(md.get("properties"))
        if dtype is None:
            raise self._bad(fqn, "has a dtype safetensors cannot store (or none)")
        itemsize = itemsize_bits(dtype) // 8
        records = md.get("chunks")
        if not isinstance(records, list):
            raise self._bad(fqn, f"chunks {brief(records)} is not a list")
        chunks = [self._chunk(fqn, shape, itemsize, c) for c in records]
        self._check_tiling(fqn, shape, chunks)
        return Entry(fqn, dtype, shape, tuple(chunks))

    def _chunk(self, fqn: str, shape: tuple[int, ...], itemsize: int, record: Any) -> Chunk:
        offsets, sizes = _dims(_get(record, "offsets")), _dims(_get(record, "sizes"))
        if not _is(record, "ChunkStorageMetadata") or offsets is None or sizes is None:
            raise self._bad(fqn, f"chunk {brief(record)} has no integer offsets and sizes")
        inside = all(o + n <= d for o, n, d in zip(offsets, sizes, shape, strict=False))
        if not (len(offsets) == len(sizes) == len(shape) and inside):
            raise self._bad(fqn, f"chunk at offsets {list(offsets)[:8]} with sizes "
                            f"{list(sizes)[:8]} lies outside the tensor's shape "
                            f"{list(shape)[:8]}")  # fmt: skip
        if (fqn, offsets) not in self.where:
            raise FormatError(f"{self.path}: chunk {list(offsets)} of {fqn} has no storage "
                              "record", "the checkpoint is incomplete")  # fmt: skip
        rel, start, length = self.where[fqn, offsets]
        size = self._file_size(rel, fqn)
        if start + length > size:
            raise self._bad(fqn, f"chunk at {list(offsets)} is stored at bytes "
                            f"[{start}, {start + length}) of {rel}, which has {size}")  # fmt: skip
        need = math.prod(sizes) * itemsize
        if need > length:
            raise self._bad(fqn, f"chunk at {list(offsets)} of sizes {list(sizes)} needs "
                            f"{need} bytes but its stored range holds {length}")  # fmt: skip
        return Chunk(offsets, sizes, rel, start, length)

    def _check_tiling(self, fqn: str, shape: tuple[int, ...], chunks: list[Chunk]) -> None:
        """Inside the bounds (checked per chunk), the same element count, no two chunks
        overlapping: then every element is written exactly once."""
        covered, total = sum(math.prod(c.sizes) for c in chunks), math.prod(shape)
        if covered != total:
            raise self._bad(fqn, f"chunks cover {covered} elements but the shape "
                            f"{list(shape)[:8]} has {total}")  # fmt: skip
        if not shape:
            return
        budget = MAX_TILING_CHECKS
        active: list[Chunk] = []  # chunks whose rows reach the current chunk's first row
        for c in sorted((c for c in chunks if 0 not in c.sizes), key=lambda c: c.offsets):
            budget -= len(active)
            if budget < 0:
                raise self._bad(fqn, f"more than {MAX_TILING_CHECKS} chunk pairs to check "
                                "for overlap")  # fmt: skip
            active = [a for a in active if a.offsets[0] + a.sizes[0] > c.offsets[0]]
            for a in active:
                if all(ao < co + cn and co < ao + an for ao, an, co, cn
                       in zip(a.offsets, a.sizes, c.offsets, c.sizes, strict=True)):  # fmt: skip
                    raise self._bad(fqn, f"chunks at offsets {list(a.offsets)[:8]} and "
                                    f"{list(c.offsets)[:8]} overlap (elements would be "
                                    "written twice and others never)")  # fmt: skip
            active.append(c)
