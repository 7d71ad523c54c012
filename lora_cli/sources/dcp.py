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

from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_cli.errors import FormatError
from lora_cli.io import sysio
from lora_cli.io.dtypes import nbytes_of, to_torch
from lora_cli.io.reader import TensorInfo, TensorSource
from lora_cli.io.safe_pickle import PickledTensor, safe_loads
from lora_cli.io.torch_zip import TorchZipFile
from lora_cli.sources.dcp_records import MAX_METADATA, Entry, MetadataRecords

if TYPE_CHECKING:
    import torch


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


class DcpReader:
    def __init__(self, folder: Path, entries: dict[str, Entry]) -> None:
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


def open_dcp(folder: Path) -> tuple[TensorSource, dict[str, Any]]:
    folder = Path(folder)
    meta_path = folder / ".metadata"
    meta = safe_loads(sysio.read_file(meta_path, MAX_METADATA, ".metadata"), str(meta_path), "dcp")
    records = MetadataRecords(meta_path, meta)
    entries: dict[str, Entry] = {}
    skipped: list[str] = []
    for fqn, md in records.tensors.items():
        if md.qualname.endswith(".BytesStorageMetadata"):
            skipped.append(fqn)
        else:
            entries[fqn] = records.entry(fqn, md)
    strip = "model." if entries and all(f.startswith("model.") for f in entries) else ""
    entries = {fqn[len(strip) :]: e for fqn, e in entries.items()}
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
