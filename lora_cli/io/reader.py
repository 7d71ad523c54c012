"""One reader for every tensor source: safetensors files, shard folders, torch zip pickles.

A ``TensorSource`` lists names, dtypes and shapes from headers alone and reads one
tensor at a time, so memory stays at one tensor whatever the checkpoint size. Raw
byte locations are exposed so untouched tensors can be copied without decoding.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_cli.errors import FormatError
from lora_cli.io import sysio
from lora_cli.io.dtypes import itemsize_bits
from lora_cli.io.safetensors_format import SafetensorsHeader, read_header

if TYPE_CHECKING:
    import torch

TORCH_SUFFIXES = (".bin", ".pt", ".pth")
INDEX_SUFFIXES = (".safetensors.index.json", ".bin.index.json", ".pt.index.json")


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives and what it is, known without reading its data."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    file: Path
    # Absolute offset of the tensor's bytes in ``file`` when they are stored contiguously
    # in safetensors layout (little-endian, C order); None when they must be decoded.
    raw_offset: int | None = None
    # Alias detection for pickles: views of one storage share ``storage``.
    storage: str | None = None
    byte_span: tuple[int, int] | None = None
    complete: bool = True

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class TensorSource:
    """Tensors of a checkpoint or adapter, in file order."""

    def __init__(
        self,
        root: Path,
        fmt: str,
        files: list[Path],
        infos: dict[str, TensorInfo],
        *,
        index_path: Path | None = None,
        index_map: dict[str, str] | None = None,
        file_metadata: dict[Path, dict[str, str]] | None = None,
        skipped: list[str] | None = None,
        readers: dict[Path, Any] | None = None,
    ) -> None:
        self.root = root
        self.format = fmt
        self.files = files
        self.infos = infos
        self.index_path = index_path
        self.index_map = index_map
        self.file_metadata = file_metadata or {}
        self.skipped = skipped or []
        self._readers = readers or {}
        self._fds: dict[Path, int] = {}

    # -- listing -----------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self.infos)

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def info(self, name: str) -> TensorInfo:
        return self.infos[name]

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self.infos.values())

    def by_file(self) -> dict[Path, list[TensorInfo]]:
        groups: dict[Path, list[TensorInfo]] = {f: [] for f in self.files}
        for info in self.infos.values():
            groups.setdefault(info.file, []).append(info)
        return groups

    # -- reading -----------------------------------------------------------------------
    def fd(self, path: Path) -> int:
        """One descriptor per file, shared by the merge's worker threads (positional reads
        only); two threads opening the same file at once keep the first and close the other."""
        fd = self._fds.get(path)
        if fd is None:
            fd = sysio.open_regular(path)
            kept = self._fds.setdefault(path, fd)
            if kept != fd:
                os.close(fd)
            fd = kept
        return fd

    def read(
        self,
        name: str,
        *,
        pin: bool = False,
        out: torch.Tensor | None = None,
        rows: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """The tensor as a contiguous CPU tensor.

        ``pin``: read into page-locked memory so a CUDA copy can run asynchronously.
        ``out``: a uint8 buffer of at least the tensor's size to read into (reused
        buffers spare the kernel from zeroing fresh pages for every tensor).
        ``rows``: only rows ``[start, stop)`` of the first dimension.
        """
        info = self.infos[name]
        if info.raw_offset is None:
            full = self._readers[info.file].read(name)
            return full[rows[0] : rows[1]].contiguous() if rows else full
        shape, offset, nbytes = info.shape, info.raw_offset, info.nbytes
        if rows is not None:
            row_bytes = info.nbytes // info.shape[0]
            shape = (rows[1] - rows[0], *info.shape[1:])
            offset += rows[0] * row_bytes
            nbytes = (rows[1] - rows[0]) * row_bytes
        import torch

        from lora_cli.io.dtypes import to_torch

        if out is not None and out.numel() >= nbytes:
            buf = out[:nbytes]
        else:
            buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        if nbytes:
            read_exact(self.fd(info.file), memoryview(buf.numpy()), offset, info.file)
        dtype = to_torch(info.dtype)
        if itemsize_bits(info.dtype) < 8:  # packed sub-byte dtypes: torch shape halves
            return buf.view(dtype)
        return buf.view(dtype).reshape(shape)

    def identity(self) -> str | None:
        """What names these exact bytes without reading them (a Hub commit), else None."""
        return None

    def evict(self, path: Path) -> bool:
        """Free ``path``'s disk space once nothing more is read from it: only files the
        source fetched itself (``sources/hub_remote.py``); a local input is never deleted."""
        return False

    def reads_rows(self, name: str) -> bool:
        """Whether ``read(name, rows=…)`` reads only those rows (not the whole tensor)."""
        return self.infos[name].raw_offset is not None

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        for reader in self._readers.values():
            reader.close()

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_exact(fd: int, view: memoryview, offset: int, path: Path) -> None:
    """Positional reads until ``view`` is full; a short file is a format error, not a hang."""
    done = 0
    total = len(view)
    while done < total:
        n = sysio.read_at(fd, view[done:], offset + done)
        if n <= 0:
            raise FormatError(f"{path}: file ends early (expected {total} bytes at {offset})")
        done += n


# -- opening ---------------------------------------------------------------------------
def open_source(path: Path) -> TensorSource:
    """Open any supported checkpoint or weights file by looking at what is there."""
    path = Path(path)
    if not path.exists():
        raise FormatError(f"{path}: no such file or directory")
    if not path.is_dir():
        os.close(sysio.open_regular(path))  # a FIFO or device is refused, not waited on
        if path.name.endswith(INDEX_SUFFIXES):
            return _open_index(path)
        return _open_files(path.parent, [path])
    found = find_weight_files(path)
    if found.index is None and len(found.indexes) > 1:
        safe = found.indexes[0].name.endswith(".safetensors.index.json")
        names = ", ".join(p.name for p in found.indexes)
        raise FormatError(
            f"{path}: several {'safetensors' if safe else 'pickle'} indexes ({names})",
            "pass the index file you mean",
        )
    if found.indexes:
        return _open_index(found.index or found.indexes[0])
    return _open_files(path, found.files)


PICKLE_PREFIXES = ("pytorch_model", "model", "adapter_model")
PREFERRED_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass
class WeightFiles:
    """The weights a folder holds, by the loaders' precedence: safetensors, then pickles."""

    files: list[Path]  # every weight file of the kind that wins
    indexes: list[Path]  # that kind's index files
    ignored: list[Path]  # pickles beside safetensors, which loaders skip

    @property
    def index(self) -> Path | None:
        """The index loaders use: the conventional name, or the only one."""
        preferred = [p for p in self.indexes if p.name in PREFERRED_INDEXES]
        if preferred:
            return preferred[0]
        return self.indexes[0] if len(self.indexes) == 1 else None


def find_weight_files(folder: Path) -> WeightFiles:
    """List a folder's weight files without opening them (shared with ``validate``)."""
    entries = sorted(folder.iterdir())
    st_indexes = [p for p in entries if p.name.endswith(".safetensors.index.json")]
    st_files = [p for p in entries if p.suffix == ".safetensors" and p.is_file()]
    pickle_indexes = [p for p in entries if p.name.endswith((".bin.index.json", ".pt.index.json"))]
    pickles = [
        p
        for p in entries
        if p.suffix in TORCH_SUFFIXES and p.is_file() and p.name.startswith(PICKLE_PREFIXES)
    ]
    if st_indexes or st_files:
        return WeightFiles(st_files, st_indexes, pickles)
    if pickles or pickle_indexes:
        return WeightFiles(pickles, pickle_indexes, [])
    raise FormatError(
        f"{folder}: no weights found (no *.safetensors, index, or pytorch_model*.bin)",
        "point at a checkpoint folder, an adapter folder or a weights file",
    )


HeaderOf = Callable[[Path], SafetensorsHeader]


def open_from_headers(
    index: Path | None, files: list[Path], header_of: HeaderOf, make: Callable[..., TensorSource]
) -> TensorSource:
    """A safetensors checkpoint (its index, else its files) whose headers come from
    ``header_of`` instead of the shards, which need not be on disk yet (``sources/hub_remote.py``
    reads them by HTTP range requests); ``make`` builds the source (a TensorSource subclass
    that fetches a shard when it is first read)."""
    if index is not None:
        return _open_index(index, header_of, make)
    return _open_files(files[0].parent, files, header_of, make)


def _open_index(
    index_path: Path,
    header_of: HeaderOf | None = None,
    make: Callable[..., TensorSource] = TensorSource,
) -> TensorSource:
    from lora_cli.io.layout import read_json

    weight_map = read_json(index_path, "index").get("weight_map")
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise FormatError(
            f"{index_path}: weight_map: not a valid index (needs a 'weight_map' of "
            "tensor name → shard file)",
            "re-download the index or rebuild it",
        )
    root = index_path.parent
    files: list[Path] = []
    for shard in sorted(set(weight_map.values())):
        shard_path = root / shard
        if "/" in shard or shard.startswith(".") or not (header_of or shard_path.is_file()):
            raise FormatError(
                f"{index_path}: names shard {shard!r}, which is missing",
                "the download is incomplete; fetch every shard the index lists",
            )
        files.append(shard_path)
    source = _open_files(root, files, header_of, make)
    source.index_path = index_path
    source.index_map = dict(weight_map)
    for name, shard in weight_map.items():
        info = source.infos.get(name)
        if info is None or info.file.name != shard:
            raise FormatError(
                f"{index_path}: tensor {name!r} is listed in {shard} but that shard "
                "does not hold it",
                "the index and the shards disagree; re-download or rebuild the index",
            )
    return source


def _open_files(
    root: Path,
    files: list[Path],
    header_of: HeaderOf | None = None,
    make: Callable[..., TensorSource] = TensorSource,
) -> TensorSource:
    infos: dict[str, TensorInfo] = {}
    metadata: dict[Path, dict[str, str]] = {}
    readers: dict[Path, Any] = {}
    skipped: list[str] = []
    kinds = set()
    for f in files:
        if header_of is None and _is_torch_file(f):
            kinds.add("torch")
            new = _torch_infos(f, readers, skipped)
        else:
            kinds.add("safetensors")
            header = (header_of or read_header)(f)
            metadata[f] = header.metadata
            new = [
                TensorInfo(
                    name=e.name,
                    dtype=e.dtype,
                    shape=e.shape,
                    nbytes=e.nbytes,
                    file=f,
                    raw_offset=header.data_start + e.start,
                )
                for e in header.entries.values()
            ]
        for info in new:
            if info.name in infos:
                raise FormatError(
                    f"{f}: tensor {info.name!r} also appears in {infos[info.name].file.name}",
                    "two shards hold the same tensor; the checkpoint is inconsistent",
                )
            infos[info.name] = info
    fmt = kinds.pop() if len(kinds) == 1 else "mixed"
    return make(root, fmt, files, infos, file_metadata=metadata, skipped=skipped, readers=readers)


def _is_torch_file(path: Path) -> bool:
    if path.suffix in TORCH_SUFFIXES:
        return True
    if path.suffix == ".safetensors":
        return False
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def _torch_infos(path: Path, readers: dict[Path, Any], skipped: list[str]) -> list[TensorInfo]:
    from lora_cli.io.torch_zip import TorchZipFile

    z = TorchZipFile(path)
    readers[path] = z
    skipped.extend(z.skipped)
    out = []
    for rec in z.records.values():
        raw = None
        if rec.contiguous and not z.big_endian:
            raw = rec.data_offset + rec.byte_span[0]
        out.append(
            TensorInfo(
                name=rec.name,
                dtype=rec.dtype,
                shape=rec.shape,
                nbytes=rec.nbytes,
                file=path,
                raw_offset=raw,
                storage=f"{path}:{rec.storage_key}",
                byte_span=rec.byte_span,
                complete=rec.complete,
            )
        )
    return out
