"""An FSDP / torch.distributed.checkpoint folder as ordinary named tensors.

``.metadata`` (a plain pickle, parsed into inert records with the ``dcp`` allowlist)
lists every tensor's global shape, dtype and chunks (offsets and sizes, FSDP1 or FSDP2,
any world size), and where each chunk is stored: a byte range of a ``.distcp`` file
holding one complete torch zip archive. A tensor is assembled on request from its
chunks' ranges alone, so memory stays at one tensor. Accelerate saves ``{"model":
state_dict}``, so every name starts with ``model.``; that level is stripped.

The oracle is torch's ``dcp_to_torch_save``; ``training-checkpoints.md`` §3 has the layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_cli.errors import FormatError
from lora_cli.io.dtypes import nbytes_of, to_torch
from lora_cli.io.reader import TensorInfo, TensorSource
from lora_cli.io.safe_pickle import Inert, PickledTensor, Tag, safe_loads
from lora_cli.io.torch_zip import TorchZipFile

if TYPE_CHECKING:
    import torch

_MAX_METADATA = 1 << 30


def _is_dcp(folder: Path) -> bool:
    return (folder / ".metadata").is_file() and any(folder.glob("*.distcp"))


def find_dcp_folder(path: Path) -> Path | None:
    """The folder holding ``.metadata`` and ``*.distcp`` (``pytorch_model_fsdp_0/`` in an
    accelerate or Trainer checkpoint; optimizer folders are not models), or None."""
    path = Path(path)
    if _is_dcp(path):
        return path
    found = sorted(p for p in path.iterdir() if p.is_dir() and _is_dcp(p)
                   and not p.name.startswith("optimizer"))  # fmt: skip
    if len(found) > 1:
        preferred = [p for p in found if p.name == "pytorch_model_fsdp_0"]
        if not preferred:
            raise FormatError(f"{path}: several DCP model folders "
                              f"({', '.join(p.name for p in found)})",
                              "point at the one you mean")  # fmt: skip
        return preferred[0]
    return found[0] if found else None


@dataclass(frozen=True)
class _Chunk:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    start: int
    length: int


@dataclass(frozen=True)
class _Entry:
    fqn: str
    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[_Chunk, ...]


class DcpReader:
    def __init__(self, folder: Path, entries: dict[str, _Entry]) -> None:
        self.folder = folder
        self.entries = entries

    def read(self, name: str) -> torch.Tensor:
        import torch

        e = self.entries[name]
        out = torch.empty(e.shape, dtype=to_torch(e.dtype))
        for c in e.chunks:
            with TorchZipFile(self.folder / c.file, profile="dcp",
                              window=(c.start, c.length), tree_only=True) as zf:  # fmt: skip
                t = zf.tree
                if not isinstance(t, PickledTensor):
                    raise FormatError(f"{self.folder / c.file}: chunk of {e.fqn} at "
                                      f"{list(c.offsets)} is not one tensor")  # fmt: skip
                if t.shape != c.sizes or t.tag.dtype != e.dtype:
                    raise FormatError(f"{self.folder / c.file}: chunk of {e.fqn} is "
                                      f"{t.tag.dtype}{list(t.shape)}, .metadata says "
                                      f"{e.dtype}{list(c.sizes)}")  # fmt: skip
                value = zf.read_elements(e.fqn, t, 0, t.numel).reshape(c.sizes)
            index = tuple(slice(o, o + s) for o, s in zip(c.offsets, c.sizes, strict=True))
            out[index] = value
        return out

    def close(self) -> None:
        pass


def _field(record: Any, name: str) -> Any:
    return record.get(name) if isinstance(record, Inert) else None


def _dtype(props: Any) -> str | None:
    state = props.state if isinstance(props, Inert) else None
    tag = state[0] if isinstance(state, tuple) and state else _field(props, "dtype")
    return tag.dtype if isinstance(tag, Tag) else None


def open_dcp(folder: Path) -> tuple[TensorSource, dict[str, Any]]:
    folder = Path(folder)
    meta_path = folder / ".metadata"
    if meta_path.stat().st_size > _MAX_METADATA:
        raise FormatError(f"{meta_path}: {meta_path.stat().st_size} bytes; too large")
    meta = safe_loads(meta_path.read_bytes(), str(meta_path), "dcp")
    tensors = _field(meta, "state_dict_metadata")
    storage = _field(meta, "storage_data")
    if not isinstance(tensors, dict) or not isinstance(storage, dict):
        raise FormatError(f"{meta_path}: not torch.distributed.checkpoint metadata")
    where: dict[tuple[str, tuple[int, ...]], tuple[str, int, int]] = {}
    for index, info in storage.items():
        fqn, offset = _field(index, "fqn"), _field(index, "offset")
        rel, start, length = (_field(info, k) for k in ("relative_path", "offset", "length"))
        if not (isinstance(rel, str) and "/" not in rel and not rel.startswith(".")
                and type(start) is int and type(length) is int):  # fmt: skip
            raise FormatError(f"{meta_path}: malformed storage record for {fqn!r}")
        where[fqn, tuple(offset or ())] = (rel, start, length)
    fqns = [f for f, md in tensors.items() if _field(md, "chunks") is not None]
    strip = "model." if fqns and all(f.startswith("model.") for f in fqns) else ""
    entries: dict[str, _Entry] = {}
    skipped = [f for f in tensors if f not in fqns]
    for fqn in fqns:
        md = tensors[fqn]
        shape, dtype = tuple(_field(md, "size") or ()), _dtype(_field(md, "properties"))
        if dtype is None:
            raise FormatError(f"{meta_path}: {fqn} has a dtype safetensors cannot store")
        chunks = []
        for c in _field(md, "chunks"):
            offsets, sizes = tuple(_field(c, "offsets")), tuple(_field(c, "sizes"))
            if (fqn, offsets) not in where:
                raise FormatError(f"{meta_path}: chunk {list(offsets)} of {fqn} has no storage "
                                  "record", "the checkpoint is incomplete")  # fmt: skip
            rel, start, length = where[fqn, offsets]
            if not (folder / rel).is_file():
                raise FormatError(f"{folder}: {rel} (holding {fqn}) is missing",
                                  "copy every rank's .distcp file")  # fmt: skip
            chunks.append(_Chunk(offsets, sizes, rel, start, length))
        if sum(math.prod(c.sizes) for c in chunks) != math.prod(shape):
            raise FormatError(f"{meta_path}: the chunks of {fqn} do not cover its shape "
                              f"{list(shape)}")  # fmt: skip
        entries[fqn[len(strip) :]] = _Entry(fqn, dtype, shape, tuple(chunks))
    infos = {
        name: TensorInfo(name, e.dtype, e.shape, nbytes_of(e.dtype, e.shape), folder)
        for name, e in entries.items()
    }
    reader = DcpReader(folder, entries)
    source = TensorSource(folder, "dcp", [folder], infos, skipped=skipped,
                          readers={folder: reader})  # fmt: skip
    files = sorted({c.file for e in entries.values() for c in e.chunks})
    details = {
        "folder": folder.name,
        "files": files,
        "prefix_stripped": strip or None,
        "chunks": sum(len(e.chunks) for e in entries.values()),
    }
    return source, details
