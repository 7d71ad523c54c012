"""Read torch zip checkpoints (``.bin``/``.pt``/``.pth``) without executing their pickle.

``torch.load`` runs the pickle in ``data.pkl``, and even its weights-only mode has had
remote-code and memory-corruption bugs. Here the pickle is parsed by an unpickler whose
every global, callable and ``BUILD`` target is one of our own inert stand-ins, so the
result is a tree of plain records. All bounds are checked against the zip entries
before a byte of tensor data is read, and each tensor is then read on its own.

A top level without tensors whose one ``state_dict``/``model_state_dict``/``model``/``module``
entry holds tensors is unwrapped (``unwrapped`` names the key; its siblings are skipped).
Nested dicts with string keys are flattened with ``.`` joins; everything else that is
not a tensor (numbers, lists, dicts with non-string keys such as optimizer state) is listed
by name in ``skipped``.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_cli.errors import FormatError, UnsafePickleError
from lora_cli.io import sysio
from lora_cli.io.dtypes import SAFETENSORS_DTYPES, itemsize_bits, nbytes_of, to_torch

if TYPE_CHECKING:
    import torch

# Torch attribute name -> safetensors name, for whole-byte dtypes only (F4 packs two
# values per torch element, so its shapes would not match).
_DTYPES = {a: n for n, (bits, a) in SAFETENSORS_DTYPES.items() if a and bits % 8 == 0}
# Dtypes torch can pickle that safetensors cannot store: allowed, then refused by name.
_OTHER_DTYPES = ("complex128", "complex32", "float4_e2m1fn_x2", "quint8", "qint8", "qint32")
_STORAGES = {
    "FloatStorage": "F32", "HalfStorage": "F16", "BFloat16Storage": "BF16",
    "DoubleStorage": "F64", "LongStorage": "I64", "IntStorage": "I32", "ShortStorage": "I16",
    "CharStorage": "I8", "ByteStorage": "U8", "BoolStorage": "BOOL",
    "ComplexFloatStorage": "C64", "ComplexDoubleStorage": None, "UntypedStorage": None,
}  # fmt: skip
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module")
_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_MALICIOUS = "not part of a tensor state dict; this file may be malicious"
_MAX_DEPTH = 64
_MAX_PICKLE = 1 << 30


@dataclass(frozen=True)
class TorchTensorRecord:
    """One tensor as a view (offset/shape/stride) on a raw storage inside the zip."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_key: str
    storage_offset: int
    storage_nbytes: int
    data_offset: int

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.dtype, self.shape)

    @property
    def byte_span(self) -> tuple[int, int]:
        """Bytes of the storage the view can touch; overlapping spans mean aliasing."""
        size = itemsize_bits(self.dtype) // 8
        start = self.storage_offset * size
        return start, start + _extent(self.shape, self.stride) * size

    @property
    def contiguous(self) -> bool:
        expected = 1
        for size, stride in zip(reversed(self.shape), reversed(self.stride), strict=True):
            if size == 0:
                return True
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True

    @property
    def complete(self) -> bool:
        """True when the tensor's bytes are exactly the whole storage entry."""
        return self.contiguous and self.storage_offset == 0 and self.nbytes == self.storage_nbytes


def _extent(shape: tuple[int, ...], stride: tuple[int, ...]) -> int:
    if 0 in shape:
        return 0
    return 1 + sum((n - 1) * s for n, s in zip(shape, stride, strict=True))


# --- inert stand-ins the unpickler builds instead of torch objects ---------------------


@dataclass(frozen=True)
class _Tag:
    """A storage class or dtype global; ``dtype`` is None when it has no safetensors name."""

    torch_name: str
    dtype: str | None


@dataclass(frozen=True)
class _Storage:
    key: str
    tag: _Tag
    numel: int  # bytes for UntypedStorage


@dataclass(frozen=True)
class _Tensor:
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    tag: _Tag


def _ints(value: Any) -> bool:
    return isinstance(value, tuple) and all(type(v) is int for v in value)


def _tensor(storage: Any, offset: Any, shape: Any, stride: Any, tag: Any) -> _Tensor:
    if not (isinstance(storage, _Storage) and type(offset) is int and isinstance(tag, _Tag)):
        raise ValueError("malformed tensor rebuild arguments")
    if not (_ints(shape) and _ints(stride) and len(shape) == len(stride)):
        raise ValueError("malformed tensor shape/stride")
    return _Tensor(storage, offset, shape, stride, tag)


def _rebuild_v2(storage: Any, offset: Any, shape: Any, stride: Any, *_: Any) -> _Tensor:
    tag = getattr(storage, "tag", None)
    if tag is None or tag.torch_name == "UntypedStorage":
        raise ValueError("_rebuild_tensor_v2 needs a typed storage")
    return _tensor(storage, offset, shape, stride, tag)


def _rebuild_v3(storage: Any, offset: Any, shape: Any, stride: Any, _g: Any, _h: Any,
                dtype: Any, *_: Any) -> _Tensor:  # fmt: skip
    return _tensor(storage, offset, shape, stride, dtype)


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    return data


def _size(dims: Any = ()) -> tuple[int, ...]:
    return tuple(dims)


_CALLABLES: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): dict,
    ("torch", "Size"): _size,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}
_SAFE_CALLS = tuple(_CALLABLES.values())


class _SafeUnpickler(pickle._Unpickler):  # the pure-Python one, so opcodes can be overridden
    def __init__(self, data: bytes, label: str) -> None:
        super().__init__(io.BytesIO(data))
        self.label = label

    def _refuse(self, what: str) -> UnsafePickleError:
        return UnsafePickleError(f"{self.label}: refused {what}", _MALICIOUS)

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _CALLABLES:
            return _CALLABLES[module, name]
        if module in ("torch", "torch.storage", "torch.cuda") and name in _STORAGES:
            return _Tag(name, _STORAGES[name])
        if module == "torch" and (name in _DTYPES or name in _OTHER_DTYPES):
            return _Tag(name, _DTYPES.get(name))
        raise self._refuse(f"to load global '{module}.{name}'")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise ValueError(f"unexpected persistent id {pid!r:.80}")
        _, tag, key, _location, numel = pid
        if not (isinstance(tag, _Tag) and tag.torch_name.endswith("Storage")):
            raise ValueError("persistent id without a storage type")
        if not (isinstance(key, str) and key and "/" not in key and type(numel) is int):
            raise ValueError(f"malformed storage id {pid!r:.80}")
        return _Storage(key, tag, numel)

    def load_reduce(self) -> None:
        if not any(self.stack[-2] is f for f in _SAFE_CALLS):
            raise self._refuse(f"to call {self.stack[-2]!r:.80}")
        super().load_reduce()

    def load_build(self) -> None:
        """Drop attribute state (``state_dict()._metadata``) rather than set it."""
        self.stack.pop()
        if not isinstance(self.stack[-1], (dict, _Tensor)):
            raise self._refuse(f"BUILD on {type(self.stack[-1]).__name__}")

    def _refuse_opcode(self) -> None:
        raise self._refuse("an object-construction opcode (INST/OBJ/NEWOBJ)")

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.BUILD[0]] = load_build
    for _op in (pickle.INST, pickle.OBJ, pickle.NEWOBJ, pickle.NEWOBJ_EX):
        dispatch[_op[0]] = _refuse_opcode
    del _op


# --- the zip container -------------------------------------------------------------------


class TorchZipFile:
    """A parsed and validated torch zip checkpoint; tensors are read one at a time."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.records: dict[str, TorchTensorRecord] = {}
        self.skipped: list[str] = []
        self.unwrapped: str | None = None  # wrapper key ("state_dict", ...) that was unwrapped
        self.big_endian = False
        self._fh = open(self.path, "rb")  # noqa: SIM115 - held for read()
        try:
            self._parse()
        except BaseException:
            self._fh.close()
            raise

    def _error(self, message: str, hint: str | None = None) -> FormatError:
        return FormatError(f"{self.path.name}: {message}", hint)

    def _parse(self) -> None:
        head = self._fh.read(32)
        if not head.startswith(b"PK\x03\x04"):
            if head.startswith(b"\x80") and _LEGACY_MAGIC in head:
                raise self._error("legacy (torch<1.6) file", "re-save it with torch>=1.6")
            raise self._error("not a zip-format torch file", "re-save it with torch>=1.6")
        self._fh.seek(0)
        try:
            with zipfile.ZipFile(self._fh) as zf:
                self._parse_zip(zf)
        except (zipfile.BadZipFile, zlib.error, NotImplementedError, EOFError, OSError,
                ValueError, struct.error) as exc:  # fmt: skip
            raise self._error(f"truncated or corrupt zip ({exc})") from None

    def _parse_zip(self, zf: zipfile.ZipFile) -> None:
        infos = {i.filename: i for i in zf.infolist()}
        if any(n.endswith("/constants.pkl") or n.split("/")[1:2] == ["code"] for n in infos):
            raise self._error("TorchScript archive, not a state dict", "save model.state_dict()")
        pickles = [n for n in infos if n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise self._error(f"expected one <prefix>/data.pkl entry, found {len(pickles)}")
        prefix = pickles[0][: -len("data.pkl")]
        order = zf.read(infos[f"{prefix}byteorder"]) if f"{prefix}byteorder" in infos else b"little"
        if order not in (b"little", b"big"):
            raise self._error(f"unknown byteorder {order[:16]!r}")
        self.big_endian = order == b"big"
        if infos[pickles[0]].file_size > _MAX_PICKLE:
            raise self._error(f"data.pkl is {infos[pickles[0]].file_size} bytes; too large")
        tree = self._unpickle(zf.read(infos[pickles[0]]))
        offsets: dict[_Storage, tuple[int, int]] = {}
        for name, tensor in self._flatten(tree):
            storage = tensor.storage
            if storage not in offsets:
                info = infos.get(f"{prefix}data/{storage.key}")
                offsets[storage] = self._locate(name, storage, info)
            self.records[name] = self._record(name, tensor, *offsets[storage])

    def _unpickle(self, data: bytes) -> Any:
        try:
            return _SafeUnpickler(data, self.path.name).load()
        except FormatError:
            raise
        except Exception as exc:  # every callable is ours: any failure is a malformed pickle
            raise self._error(f"bad data.pkl ({type(exc).__name__}: {exc})") from None

    def _flatten(self, tree: Any) -> list[tuple[str, _Tensor]]:
        """Unwrap ``{"state_dict": {...}}``-style wrappers and flatten nested string-key dicts."""
        if not isinstance(tree, dict):
            raise self._error(f"top-level object is a {type(tree).__name__}, not a dict")
        if not any(isinstance(v, _Tensor) for v in tree.values()):
            wrappers = [
                k for k in _WRAPPER_KEYS
                if isinstance(tree.get(k), dict)
                and any(isinstance(v, _Tensor) for v in tree[k].values())
            ]  # fmt: skip
            if len(wrappers) == 1:
                self.unwrapped = wrappers[0]
                self.skipped += [str(k) for k in tree if k != self.unwrapped]
                tree = tree[self.unwrapped]
        out: list[tuple[str, _Tensor]] = []
        self._walk(tree, "", out, set(), 0)
        names = [n for n, _ in out]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise self._error(f"tensor name {dup!r} occurs twice after flattening nested dicts")
        return out

    def _walk(self, node: dict, prefix: str, out: list, seen: set[int], depth: int) -> None:
        if depth > _MAX_DEPTH:
            raise self._error(f"dicts nested deeper than {_MAX_DEPTH} levels at {prefix!r}")
        seen.add(id(node))
        for key, value in node.items():
            name = f"{prefix}{key}" if isinstance(key, str) else f"{prefix}{key!r}"
            if isinstance(value, _Tensor) and isinstance(key, str):
                out.append((name, value))
            elif (
                isinstance(value, dict) and value and id(value) not in seen
                and all(isinstance(k, str) for k in value)
            ):  # fmt: skip
                self._walk(value, name + ".", out, seen, depth + 1)
            else:
                self.skipped.append(name)

    def _locate(
        self, name: str, storage: _Storage, info: zipfile.ZipInfo | None
    ) -> tuple[int, int]:
        """Absolute data offset and byte length of a storage entry, from its local header."""
        where = f"storage {storage.key!r} of tensor {name!r}"
        if info is None:
            raise self._error(f"{where} is missing from the zip")
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 1:
            raise self._error(f"{where} is compressed or encrypted", "torch writes it stored")
        bits = 8 if storage.tag.torch_name == "UntypedStorage" else _itembits(storage.tag)
        if bits is None:
            raise self._error(f"tensor {name!r} has dtype {storage.tag.torch_name}, "
                              "which safetensors cannot store")  # fmt: skip
        if info.file_size != storage.numel * bits // 8:
            raise self._error(f"{where} holds {info.file_size} bytes, "
                              f"expected {storage.numel} x {bits // 8}")  # fmt: skip
        self._fh.seek(info.header_offset)
        header = self._fh.read(30)
        if len(header) < 30 or header[:4] != b"PK\x03\x04":
            raise self._error(f"{where}: bad local zip header (truncated file?)")
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        start = info.header_offset + 30 + name_len + extra_len
        if start + info.file_size > os.fstat(self._fh.fileno()).st_size:
            raise self._error(f"{where} runs past the end of the file (truncated?)")
        return start, info.file_size

    def _record(self, name: str, t: _Tensor, data_offset: int, nbytes: int) -> TorchTensorRecord:
        bits = _itembits(t.tag)
        if bits is None:
            raise self._error(f"tensor {name!r} has dtype {t.tag.torch_name}, "
                              "which safetensors cannot store")  # fmt: skip
        if t.offset < 0 or min(t.shape, default=0) < 0 or min(t.stride, default=0) < 0:
            raise self._error(f"tensor {name!r} has a negative offset, size or stride")
        end = t.offset + _extent(t.shape, t.stride)
        if end > nbytes // (bits // 8):
            raise self._error(f"tensor {name!r} (offset {t.offset}, shape {list(t.shape)}, "
                              f"stride {list(t.stride)}) overruns its storage of "
                              f"{nbytes // (bits // 8)} elements")  # fmt: skip
        return TorchTensorRecord(name, t.tag.dtype, t.shape, t.stride, t.storage.key,
                                 t.offset, nbytes, data_offset)  # fmt: skip

    def read(self, name: str) -> torch.Tensor:
        """The tensor as a contiguous little-endian CPU tensor, reading only its own bytes."""
        import torch

        rec = self.records[name]
        dtype = to_torch(rec.dtype)
        start, end = rec.byte_span
        if end == start:
            return torch.empty(rec.shape, dtype=dtype)
        buf = bytearray(end - start)
        # positional reads, not seek+read: merge reads ahead on a worker thread
        done, view, offset = 0, memoryview(buf), rec.data_offset + start
        while done < len(buf):
            n = sysio.read_at(self._fh.fileno(), view[done:], offset + done)
            if n <= 0:
                raise self._error(f"tensor {name!r}: file ended early (truncated?)")
            done += n
        raw = torch.frombuffer(buf, dtype=torch.uint8)
        if self.big_endian and itemsize_bits(rec.dtype) > 8:
            unit = itemsize_bits(rec.dtype) // 8 // (2 if rec.dtype == "C64" else 1)
            raw = raw.view(-1, unit).flip(-1).reshape(-1)
        flat = raw.view(dtype)
        return torch.as_strided(flat, rec.shape, rec.stride).contiguous()

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> TorchZipFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _itembits(tag: _Tag | None) -> int | None:
    return itemsize_bits(tag.dtype) if tag is not None and tag.dtype else None
