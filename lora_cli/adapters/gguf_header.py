"""A bounded walk over a GGUF file's header, before the ``gguf`` package parses it.

``gguf.GGUFReader`` trusts every count and length it reads: a 1 KB file declaring 2⁶³
array entries loops forever (past the end of the file each entry reads as 0 bytes), a
huge string length or tensor count is taken as is, and truncation surfaces as
``IndexError``. This walk reads the same records with ``struct`` and checks each count,
length and offset against the bytes the file actually holds before going on, so a
malformed file ends in one line naming the file and the record, in time linear in the
header's size. Only then is the file handed to the reader (which then sees a file whose
every record is in bounds).

Layout (ggml/docs/gguf.md): magic, u32 version, u64 tensor count, u64 KV count, KV
records (string key, u32 type, value), tensor infos (string name, u32 n_dims, u64 dims,
u32 ggml type, u64 offset), padding to ``general.alignment``, tensor data.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any

from lora_cli.errors import FormatError

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # what gguf-py's reader supports
# GGML_MAX_DIMS in ggml.h: no GGUF tensor has more dimensions.
MAX_DIMS = 4
# Arrays of arrays exist (nothing writes deeper than one level); 8 bounds the recursion.
MAX_ARRAY_NESTING = 8
DEFAULT_ALIGNMENT = 32
# Value type → struct format of one scalar (GGUFValueType); 8 = string, 9 = array.
SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
STRING, ARRAY = 8, 9
ARRAY_VALUE = object()  # what an array KV reads as: its items are checked, not kept
# The smallest a record can be, for bounding counts by the bytes left: a KV record is a
# key length, a type and at least one value byte; a tensor info a name length, n_dims,
# a type and an offset.
MIN_KV_BYTES = 8 + 4 + 1
MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8
FIX = "the file is truncated or was not written by a GGUF writer; re-convert the adapter"


class _Cursor:
    def __init__(self, path: Path, data: Any, size: int) -> None:
        self.path, self.data, self.size, self.pos = path, data, size, 0

    def fail(self, what: str) -> FormatError:
        return FormatError(f"{self.path}: {what} (at byte {self.pos})", FIX)

    def take(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        if self.pos + n > self.size:
            raise self.fail(f"{what}: the file ends inside it")
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += n
        return value

    def count(self, what: str, least_bytes: int) -> int:
        n = self.take("<Q", what)
        left = self.size - self.pos
        if n > left // max(least_bytes, 1):
            raise self.fail(f"{what} is {n}, more than the {left} bytes left can hold")
        return n

    def string(self, what: str) -> str:
        n = self.count(f"{what} length", 1)
        raw = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in SCALARS:
            return self.take(SCALARS[vtype], what)
        if vtype == STRING:
            return self.string(what)
        if vtype == ARRAY:
            if depth >= MAX_ARRAY_NESTING:
                raise self.fail(f"{what}: arrays nested deeper than {MAX_ARRAY_NESTING}")
            item = self.take("<I", f"{what} item type")
            least = struct.calcsize(SCALARS[item]) if item in SCALARS else 8
            n = self.count(f"{what} array length", least)
            if item in SCALARS:  # skipped in one step: no reader here needs array values
                self.pos += n * least
            else:  # strings and arrays: at least 8 bytes each, so n steps are bounded
                for _ in range(n):
                    self.value(item, what, depth + 1)
            return ARRAY_VALUE
        raise self.fail(f"{what}: unknown value type {vtype}")


def walk_header(path: Path, type_sizes: dict[int, tuple[int, int]]) -> dict[str, Any]:
    """Check every header record of the GGUF file ``path`` against its size; returns the
    KV pairs (arrays as ``ARRAY_VALUE``). ``type_sizes``: ggml type → (block size, bytes per block)
    (``gguf.GGML_QUANT_SIZES``), for the tensors' byte sizes."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < len(MAGIC) + 4 + 16:
                raise FormatError(f"{path}: {size} bytes is too short for a GGUF header", FIX)
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return _walk(_Cursor(path, data, size), type_sizes)
    except OSError as exc:
        raise FormatError(f"{path}: cannot read the GGUF file ({exc.strerror})") from None


def _walk(c: _Cursor, type_sizes: dict[int, tuple[int, int]]) -> dict[str, Any]:
    if bytes(c.data[0:4]) != MAGIC:
        raise c.fail("not a GGUF file (bad magic)")
    c.pos = 4
    version = c.take("<I", "version")
    if version not in VERSIONS:
        raise c.fail(f"GGUF version {version} is not supported (only {VERSIONS})")
    n_tensors = c.take("<Q", "tensor count")
    n_kv = c.count("KV count", MIN_KV_BYTES)
    if n_tensors > (c.size - c.pos) // MIN_TENSOR_INFO_BYTES:
        raise c.fail(f"tensor count {n_tensors} is more than the file can hold")
    kv: dict[str, Any] = {}
    for i in range(n_kv):
        key = c.string(f"KV record {i} key")
        vtype = c.take("<I", f"KV {key!r} type")
        if key in kv:
            raise c.fail(f"KV {key!r} appears twice")
        kv[key] = c.value(vtype, f"KV {key!r}")
    tensors = []
    for i in range(n_tensors):
        name = c.string(f"tensor info {i} name")
        n_dims = c.take("<I", f"tensor {name!r} n_dims")
        if not 1 <= n_dims <= MAX_DIMS:
            raise c.fail(f"tensor {name!r} has {n_dims} dimensions (GGUF allows 1 to {MAX_DIMS})")
        dims = [c.take("<Q", f"tensor {name!r} dimension") for _ in range(n_dims)]
        ggml_type = c.take("<I", f"tensor {name!r} type")
        offset = c.take("<Q", f"tensor {name!r} offset")
        if ggml_type not in type_sizes:
            raise c.fail(f"tensor {name!r} has unknown ggml type {ggml_type}")
        if any(d == 0 for d in dims):
            raise c.fail(f"tensor {name!r} has a zero dimension {dims} (rank 0?)")
        tensors.append((name, dims, ggml_type, offset))
    names = [t[0] for t in tensors]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise c.fail(f"tensor {dup!r} appears twice")
    alignment = kv.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise c.fail(f"general.alignment {alignment!r} is not a power of two")
    data_start = -(-c.pos // alignment) * alignment
    for name, dims, ggml_type, offset in tensors:
        block, block_bytes = type_sizes[ggml_type]
        numel = 1
        for d in dims:
            numel *= d
        nbytes = -(-numel // block) * block_bytes
        if data_start + offset + nbytes > c.size:
            raise FormatError(
                f"{c.path}: tensor {name!r}: {dims} at offset {offset} needs {nbytes} bytes "
                f"past byte {data_start + offset}, beyond the file's {c.size} bytes",
                FIX,
            )
    return kv
