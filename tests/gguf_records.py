"""GGUF files as records a test can rewrite: KV pairs and tensor infos parsed from a real
file (llama.cpp's converter output) and serialized back byte for byte, so hostile cases
and the fuzzer change one count, type, string or shape and keep everything else real."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
           10: "<Q", 11: "<q", 12: "<d"}  # fmt: skip
STRING, ARRAY = 8, 9
ALIGNMENT = 32  # the files used here do not set general.alignment


@dataclass
class Kv:
    key: str
    vtype: int
    value: Any  # scalar, str, or (item type, count) with ``items`` for arrays
    items: list[Any] = field(default_factory=list)


@dataclass
class Tensor:
    name: str
    dims: list[int]
    type: int
    offset: int


@dataclass
class Records:
    version: int
    kvs: list[Kv]
    tensors: list[Tensor]
    data: bytes  # the tensor data (re-padded to ``ALIGNMENT`` after the header)
    tensor_count: int | None = None  # overrides for hostile counts
    kv_count: int | None = None
    string_length_override: tuple[str, int] | None = None


def _string(s: str) -> bytes:
    raw = s.encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(raw)) + raw


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, fmt: str) -> Any:
        (v,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.take("<Q")
        s = self.data[self.pos : self.pos + n].decode("utf-8")
        self.pos += n
        return s

    def value(self, vtype: int) -> tuple[Any, list[Any]]:
        if vtype in SCALARS:
            return self.take(SCALARS[vtype]), []
        if vtype == STRING:
            return self.string(), []
        item, n = self.take("<I"), self.take("<Q")
        return (item, n), [self.value(item) for _ in range(n)]


def parse(data: bytes) -> Records:
    r = _Reader(data)
    assert data[:4] == b"GGUF"
    r.pos = 4
    version, n_tensors, n_kv = r.take("<I"), r.take("<Q"), r.take("<Q")
    kvs = []
    for _ in range(n_kv):
        key, vtype = r.string(), r.take("<I")
        value, items = r.value(vtype)
        kvs.append(Kv(key, vtype, value, items))
    tensors = []
    for _ in range(n_tensors):
        name, n_dims = r.string(), r.take("<I")
        dims = [r.take("<Q") for _ in range(n_dims)]
        tensors.append(Tensor(name, dims, r.take("<I"), r.take("<Q")))
    start = -(-r.pos // ALIGNMENT) * ALIGNMENT
    return Records(version, kvs, tensors, data[start:])


def _value(vtype: int, value: Any, items: list[Any]) -> bytes:
    if vtype in SCALARS:
        return struct.pack(SCALARS[vtype], value)
    if vtype == STRING:
        return _string(value)
    item, n = value
    return struct.pack("<IQ", item, n) + b"".join(_value(item, *v) for v in items)


def serialize(rec: Records) -> bytes:
    out = [b"GGUF", struct.pack("<I", rec.version)]
    out.append(
        struct.pack("<Q", len(rec.tensors) if rec.tensor_count is None else rec.tensor_count)
    )
    out.append(struct.pack("<Q", len(rec.kvs) if rec.kv_count is None else rec.kv_count))
    for kv in rec.kvs:
        if rec.string_length_override and rec.string_length_override[0] == kv.key:
            raw = kv.value.encode()
            body = struct.pack("<Q", rec.string_length_override[1]) + raw
        else:
            body = _value(kv.vtype, kv.value, kv.items)
        out.append(_string(kv.key) + struct.pack("<I", kv.vtype) + body)
    for t in rec.tensors:
        out.append(_string(t.name) + struct.pack("<I", len(t.dims)))
        out.append(b"".join(struct.pack("<Q", d) for d in t.dims))
        out.append(struct.pack("<IQ", t.type, t.offset))
    header = b"".join(out)
    return header + b"\0" * (-len(header) % ALIGNMENT) + rec.data
