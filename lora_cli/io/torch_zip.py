"""Read torch zip checkpoints (``.bin``/``.pt``/``.pth``) without executing their pickle.

``torch.load`` runs the pickle in ``data.pkl``, and even its weights-only mode has had
remote-code and memory-corruption bugs. Here the pickle is parsed by ``safe_pickle``, whose
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
import struct
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_cli.errors import FormatError
from lora_cli.io import sysio
from lora_cli.io.dtypes import itemsize_bits, nbytes_of, to_torch
from lora_cli.io.safe_pickle import PickledTensor, Storage, Tag, brief, safe_loads

if TYPE_CHECKING:
    import torch

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module")
_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_MAX_DEPTH = 64

MAX_PICKLE = 64 << 20
"""Bytes of ``data.pkl``. It holds only records (names, shapes, strides, storage keys:
~120 bytes per tensor), so a 100k-tensor state dict is ~12 MB. The pure-Python unpickler
reads about 1 MB/s, so this also bounds the time a file can cost."""

MAX_INFLATE_RATIO = 16
"""Decompressed / compressed size of a DEFLATEd ``data.pkl`` (torch stores it
uncompressed; a re-zipped one compresses about 5:1). DEFLATE reaches 1000:1, so a 390 KB
file could declare a 400 MB pickle: refused from the declared sizes before inflating
(zipfile never inflates past the declared size), which keeps the work proportional to
the bytes the file really holds."""

_RESAVE = "not a state dict as torch.save writes it; re-save it with torch.save"

MAX_SMALL_RECORD = 64
"""Bytes of the ``byteorder`` record (``little`` or ``big``)."""

MAX_DIM = (1 << 63) - 1
"""A tensor dimension safetensors can write (its header's shapes are 64-bit)."""


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


# --- the zip container -------------------------------------------------------------------


class _Window(io.RawIOBase):
    """Bytes ``[start, start + length)`` of an open file, seen as a whole file.

    A torch.distributed.checkpoint ``.distcp`` file is several complete torch zip
    archives back to back; each is parsed through a window on its byte range.
    """

    def __init__(self, fd: int, start: int, length: int) -> None:
        self.fd, self.start, self.length, self.pos = fd, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.length}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buf: Any) -> int:
        n = max(0, min(len(buf), self.length - self.pos))
        if n == 0:
            return 0
        got = sysio.read_at(self.fd, memoryview(buf)[:n], self.start + self.pos)  # headers, pickles
        self.pos += got
        return got


class TorchZipFile:
    """A parsed and validated torch zip checkpoint; tensors are read one at a time.

    ``profile`` names the pickle allowlist (``safe_pickle.PROFILES``); ``window`` (start,
    length) reads one archive embedded in a bigger file. With ``tree_only`` the pickle's
    record tree is kept in ``tree`` and nothing is flattened: formats whose tensors sit in
    lists (DeepSpeed's flat partitions) locate and read ``PickledTensor`` s themselves,
    only those they need, and only the elements they need (``read_elements``).
    """

    def __init__(
        self,
        path: Path,
        *,
        profile: str = "state_dict",
        window: tuple[int, int] | None = None,
        tree_only: bool = False,
    ) -> None:
        self.path = Path(path)
        self.records: dict[str, TorchTensorRecord] = {}
        self.skipped: list[str] = []
        self.unwrapped: str | None = None  # wrapper key ("state_dict", ...) that was unwrapped
        self.big_endian = False
        self.tree: Any = None
        self._profile = profile
        self._tree_only = tree_only
        self._fh = sysio.open_binary(self.path)  # held for read()
        size = os.fstat(self._fh.fileno()).st_size
        self._start, self._length = window if window else (0, size)
        if self._start < 0 or self._start + self._length > size:
            self._fh.close()
            raise self._error(f"byte range {window} runs past the end of the file (truncated?)")
        self._view: Any = _Window(self._fh.fileno(), self._start, self._length)
        self._infos: dict[str, zipfile.ZipInfo] = {}
        self._prefix = ""
        self._offsets: dict[Storage, tuple[int, int]] = {}
        try:
            self._parse()
        except BaseException:
            self._fh.close()
            raise

    def _error(self, message: str, hint: str | None = None) -> FormatError:
        return FormatError(f"{self.path.name}: {message}", hint)

    def _parse(self) -> None:
        head = self._view.read(32)
        if not head.startswith(b"PK\x03\x04"):
            if head.startswith(b"\x80") and _LEGACY_MAGIC in head:
                raise self._error("legacy (torch<1.6) file", "re-save it with torch>=1.6")
            raise self._error("not a zip-format torch file", "re-save it with torch>=1.6")
        self._view.seek(0)
        try:
            with zipfile.ZipFile(self._view) as zf:
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
        order = b"little"
        if f"{prefix}byteorder" in infos:
            if infos[f"{prefix}byteorder"].file_size > MAX_SMALL_RECORD:
                raise self._error("byteorder record is too large to be 'little' or 'big'")
            order = zf.read(infos[f"{prefix}byteorder"])
        if order not in (b"little", b"big"):
            raise self._error(f"unknown byteorder {order[:16]!r}")
        self.big_endian = order == b"big"
        self._check_pickle_size(infos[pickles[0]])
        self._infos, self._prefix = infos, prefix
        tree = self._unpickle(zf.read(infos[pickles[0]]))
        if self._tree_only:
            self.tree = tree
            return
        for name, tensor in self._flatten(tree):
            self.records[name] = self.record(name, tensor)

    def _check_pickle_size(self, info: zipfile.ZipInfo) -> None:
        size, packed = info.file_size, info.compress_size
        if size > MAX_PICKLE:
            raise self._error(f"data.pkl is {size} bytes, over the {MAX_PICKLE >> 20} MiB "
                              "limit for tensor records", _RESAVE)  # fmt: skip
        if info.compress_type != zipfile.ZIP_STORED and size > MAX_INFLATE_RATIO * max(packed, 1):
            raise self._error(f"data.pkl inflates {packed} bytes to {size}, over "
                              f"{MAX_INFLATE_RATIO}:1 (a decompression bomb?)",
                              _RESAVE)  # fmt: skip

    def _unpickle(self, data: bytes) -> Any:
        try:
            return safe_loads(data, self.path.name, self._profile)
        except FormatError as exc:
            if exc.message.startswith(f"{self.path.name}: bad pickle"):
                raise self._error("bad data.pkl" + exc.message.split("bad pickle", 1)[1]) from None
            raise

    def record(self, name: str, tensor: PickledTensor) -> TorchTensorRecord:
        """Locate and bounds-check one tensor of the tree (its data is not read)."""
        storage = tensor.storage
        if storage not in self._offsets:
            info = self._infos.get(f"{self._prefix}data/{storage.key}")
            self._offsets[storage] = self._locate(name, storage, info)
        return self._record(name, tensor, *self._offsets[storage])

    def read_elements(self, name: str, tensor: PickledTensor, start: int, count: int) -> Any:
        """Elements ``[start, start + count)`` of a contiguous tensor, reading only those."""
        import torch

        rec = self.record(name, tensor)
        if not rec.contiguous or start < 0 or start + count > tensor.numel:
            raise self._error(f"{name}: elements [{start}, {start + count}) are outside "
                              f"a contiguous tensor of {tensor.numel}")  # fmt: skip
        size = itemsize_bits(rec.dtype) // 8
        buf = bytearray(count * size)
        self._pread(name, buf, rec.data_offset + (rec.storage_offset + start) * size)
        if not buf:
            return torch.empty(0, dtype=to_torch(rec.dtype))
        return self._decode(buf, rec.dtype)

    def _flatten(self, tree: Any) -> list[tuple[str, PickledTensor]]:
        """Unwrap ``{"state_dict": {...}}``-style wrappers and flatten nested string-key dicts."""
        if not isinstance(tree, dict):
            raise self._error(f"top-level object is a {type(tree).__name__}, not a dict")
        if not any(isinstance(v, PickledTensor) for v in tree.values()):
            wrappers = [
                k for k in _WRAPPER_KEYS
                if isinstance(tree.get(k), dict)
                and any(isinstance(v, PickledTensor) for v in tree[k].values())
            ]  # fmt: skip
            if len(wrappers) == 1:
                self.unwrapped = wrappers[0]
                self.skipped += [str(k) for k in tree if k != self.unwrapped]
                tree = tree[self.unwrapped]
        out: list[tuple[str, PickledTensor]] = []
        self._walk(tree, "", out, set(), 0)
        counts = Counter(n for n, _ in out)
        if len(counts) != len(out):
            dup = next(n for n, k in counts.items() if k > 1)
            raise self._error(f"tensor name {dup!r} occurs twice after flattening nested dicts")
        return out

    def _walk(self, node: dict, prefix: str, out: list, seen: set[int], depth: int) -> None:
        if depth > _MAX_DEPTH:
            raise self._error(f"dicts nested deeper than {_MAX_DEPTH} levels at {prefix!r}")
        seen.add(id(node))
        for key, value in node.items():
            name = f"{prefix}{key}" if isinstance(key, str) else f"{prefix}{brief(key)}"
            if isinstance(value, PickledTensor) and isinstance(key, str):
                out.append((name, value))
            elif (
                isinstance(value, dict) and value and id(value) not in seen
                and all(isinstance(k, str) for k in value)
            ):  # fmt: skip
                self._walk(value, name + ".", out, seen, depth + 1)
            else:
                self.skipped.append(name)

    def _locate(self, name: str, storage: Storage, info: zipfile.ZipInfo | None) -> tuple[int, int]:
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
        self._view.seek(info.header_offset)
        header = self._view.read(30)
        if len(header) < 30 or header[:4] != b"PK\x03\x04":
            raise self._error(f"{where}: bad local zip header (truncated file?)")
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        start = info.header_offset + 30 + name_len + extra_len
        if start + info.file_size > self._length:
            raise self._error(f"{where} runs past the end of the file (truncated?)")
        return self._start + start, info.file_size

    def _record(
        self, name: str, t: PickledTensor, data_offset: int, nbytes: int
    ) -> TorchTensorRecord:
        bits = _itembits(t.tag)
        if bits is None:
            raise self._error(f"tensor {name!r} has dtype {t.tag.torch_name}, "
                              "which safetensors cannot store")  # fmt: skip
        if t.offset < 0 or min(t.shape, default=0) < 0 or min(t.stride, default=0) < 0:
            raise self._error(f"tensor {name!r} has a negative offset, size or stride")
        if max(t.shape, default=0) > MAX_DIM or len(t.shape) > 64:
            raise self._error(f"tensor {name!r}: shape {brief(list(t.shape))} cannot be written "
                              "(a dimension over 2^63 or more than 64 dimensions)")  # fmt: skip
        elements = nbytes // (bits // 8)
        end = t.offset + _extent(t.shape, t.stride)
        if end > elements:
            raise self._error(f"tensor {name!r} (offset {t.offset}, shape {brief(list(t.shape))}, "
                              f"stride {brief(list(t.stride))}) overruns its storage of "
                              f"{elements} elements")  # fmt: skip
        if t.numel > elements:
            raise self._error(f"tensor {name!r} declares {t.numel} elements over a storage of "
                              f"{elements} (a stride-0 or overlapping view; written out it "
                              f"would take {t.numel * (bits // 8)} bytes)",
                              "save it with .contiguous() (or .clone())")  # fmt: skip
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
        self._pread(name, buf, rec.data_offset + start)
        flat = self._decode(buf, rec.dtype)
        return torch.as_strided(flat, rec.shape, rec.stride).contiguous()

    def _pread(self, name: str, buf: bytearray, offset: int) -> None:
        # pread, not seek+read: merge reads ahead on a worker thread
        done, view = 0, memoryview(buf)
        while done < len(buf):
            n = sysio.read_at(self._fh.fileno(), view[done:], offset + done)
            if n <= 0:
                raise self._error(f"tensor {name!r}: file ended early (truncated?)")
            done += n

    def _decode(self, buf: bytearray, dtype: str) -> torch.Tensor:
        """Raw little- or big-endian bytes as a flat tensor of ``dtype``."""
        import torch

        raw = torch.frombuffer(buf, dtype=torch.uint8)
        if self.big_endian and itemsize_bits(dtype) > 8:
            unit = itemsize_bits(dtype) // 8 // (2 if dtype == "C64" else 1)
            raw = raw.view(-1, unit).flip(-1).reshape(-1)
        return raw.view(to_torch(dtype))

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> TorchZipFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _itembits(tag: Tag | None) -> int | None:
    return itemsize_bits(tag.dtype) if tag is not None and tag.dtype else None
