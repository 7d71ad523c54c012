"""The safetensors header: parse it with the Rust library's rules, and plan one for writing.

Validation happens before any tensor byte is touched, so a hostile or truncated
file is refused with a one-line error instead of a crash halfway through a merge.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from lora_cli.errors import FormatError
from lora_cli.io import sysio
from lora_cli.io.dtypes import DTYPE_ORDER, SAFETENSORS_DTYPES, nbytes_of

MAX_HEADER_SIZE = 100_000_000
ALIGNMENT = 8


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file; offsets are relative to the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass
class SafetensorsHeader:
    path: Path
    data_start: int
    metadata: dict[str, str]
    entries: dict[str, TensorEntry] = field(default_factory=dict)

    @property
    def file_size(self) -> int:
        return self.data_start + max((e.end for e in self.entries.values()), default=0)


def _fail(path: Path, what: str, tensor: str | None = None) -> FormatError:
    where = f"{path}: tensor {tensor!r}: " if tensor else f"{path}: "
    return FormatError(
        where + what, "the file is corrupt or truncated; re-download or re-export it"
    )


class _JsonObject(dict):
    """A JSON object that remembers the keys it saw twice (the last value wins)."""

    duplicates: tuple[str, ...] = ()


def _object_pairs(pairs: list[tuple[str, object]]) -> _JsonObject:
    obj = _JsonObject(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        obj.duplicates = tuple(k for k, _ in pairs if k in seen or seen.add(k))
    return obj


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


def parse_header_bytes(path: Path, prefix: bytes, file_size: int) -> SafetensorsHeader:
    """Validate ``prefix`` (at least the first 8 + N bytes of the file) as a header."""
    if len(prefix) < 8:
        raise _fail(path, f"file is {file_size} bytes, too small for a safetensors header")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_SIZE:
        raise _fail(path, f"header length {n} exceeds the 100 MB limit")
    if 8 + n > file_size:
        raise _fail(path, f"header length {n} runs past the end of the file ({file_size} bytes)")
    raw = prefix[8 : 8 + n]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _fail(path, "header is not valid UTF-8") from None
    try:
        obj = json.loads(text, object_pairs_hook=_object_pairs, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise _fail(path, f"header is not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise _fail(path, "header is not a JSON object")
    if obj.duplicates:
        raise _fail(path, "tensor name appears twice in the header", obj.duplicates[0])

    # Rust: Option<HashMap<String, String>>, so null is "no metadata" and duplicate
    # metadata keys keep the last value.
    metadata = obj.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _fail(path, "__metadata__ must map strings to strings")
    metadata = dict(metadata)

    entries: list[TensorEntry] = []
    for name, info in obj.items():
        entries.append(_parse_entry(path, name, info))
    entries.sort(key=lambda e: (e.start, e.end))
    position = 0
    for e in entries:
        if e.start != position or e.end < e.start:
            raise _fail(
                path,
                f"data_offsets [{e.start}, {e.end}] overlap or leave a gap (expected start "
                f"{position})",
                e.name,
            )
        position = e.end
    data_start = 8 + n
    if data_start + position != file_size:
        raise _fail(
            path,
            f"the last tensor ends at data byte {position} but the file holds "
            f"{file_size - data_start} data bytes",
            entries[-1].name if entries else None,
        )
    header = SafetensorsHeader(path=path, data_start=data_start, metadata=metadata)
    header.entries = {e.name: e for e in sorted(entries, key=lambda e: e.start)}
    return header


def _parse_entry(path: Path, name: str, info: object) -> TensorEntry:
    if not isinstance(info, dict):
        raise _fail(path, "entry is not an object", name)
    if getattr(info, "duplicates", ()):
        raise _fail(path, f"field {info.duplicates[0]!r} appears twice", name)
    dtype = info.get("dtype")
    shape = info.get("shape")
    offsets = info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise _fail(path, f"unknown dtype {dtype!r}", name)
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**48 for d in shape
    ):
        raise _fail(path, f"invalid shape {shape!r}", name)
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
    ):
        raise _fail(path, f"invalid data_offsets {offsets!r}", name)
    expected = nbytes_of(dtype, shape)
    if expected < 0:
        raise _fail(path, f"{dtype} tensor of shape {shape} does not fill whole bytes", name)
    start, end = offsets
    if end - start != expected:
        raise _fail(
            path,
            f"shape {shape} of {dtype} needs {expected} bytes but data_offsets span {end - start}",
            name,
        )
    return TensorEntry(name=name, dtype=dtype, shape=tuple(shape), start=start, end=end)


def read_header(path: Path) -> SafetensorsHeader:
    """Read and validate the header of the safetensors file at ``path``."""
    try:
        with sysio.open_binary(path) as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) == 8:
                (n,) = struct.unpack("<Q", head)
                if n <= MAX_HEADER_SIZE and 8 + n <= size:
                    head += f.read(n)
    except OSError as exc:
        raise FormatError(f"{path}: cannot read ({exc.strerror})") from None
    return parse_header_bytes(path, head, size)


def plan_header(
    specs: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None
) -> tuple[bytes, list[TensorEntry]]:
    """Lay out a file the way the Rust writer does.

    Tensors sorted by dtype alignment (descending) then name, offsets back to back,
    header padded with spaces to 8 bytes so every tensor starts aligned, non-ASCII
    written as UTF-8 (not ``\\u`` escapes), ``__metadata__`` first and always holding
    ``format: pt``. With no other metadata the bytes equal ``safetensors.torch.save``'s
    (Rust orders several metadata keys by hash, so only their order can differ). Returns the
    full header bytes (length prefix included) and the entries in write order.
    """
    names = [s[0] for s in specs]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise FormatError(f"tensor {dup!r} planned twice in one file")
    meta = {"format": "pt", **(metadata or {})}
    bad_meta = [k for k, v in meta.items() if not (isinstance(k, str) and isinstance(v, str))]
    if bad_meta:
        raise FormatError(f"__metadata__ entry {bad_meta[0]!r} is not a string → string pair")
    if "__metadata__" in names:
        raise FormatError("a tensor cannot be named '__metadata__' in safetensors")
    for name in [*names, *meta.keys(), *meta.values()]:
        if not isinstance(name, str) or not _utf8(name):
            raise FormatError(f"tensor or metadata name {name!r} cannot be stored in safetensors")
    for _, dtype, _ in specs:
        if dtype not in SAFETENSORS_DTYPES:
            raise FormatError(f"unknown dtype {dtype!r}")
    ordered = sorted(specs, key=lambda s: (-DTYPE_ORDER[s[1]], s[0]))
    entries: list[TensorEntry] = []
    offset = 0
    for name, dtype, shape in ordered:
        size = nbytes_of(dtype, shape)
        if size < 0:
            raise FormatError(f"tensor {name!r}: {dtype} shape {shape} does not fill whole bytes")
        entries.append(TensorEntry(name, dtype, tuple(shape), offset, offset + size))
        offset += size
    obj: dict[str, object] = {"__metadata__": meta}
    for e in entries:
        obj[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [e.start, e.end]}
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * ((-(8 + len(text))) % ALIGNMENT)
    return struct.pack("<Q", len(text)) + text, entries


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from a hostile pickle
        return False
    return True
