"""Tensors of one or more sources under new names, without copying anything.

A training checkpoint holds a model under in-memory PEFT names
(``…q_proj.base_layer.weight``) and, when frozen weights were left out, needs the rest
from ``--base``. The merge reads it through a view whose names are the model's own, so
the planner and the writer see an ordinary checkpoint.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from lora_cli.io.reader import TensorInfo, TensorSource

if TYPE_CHECKING:
    import torch


class ViewSource(TensorSource):
    """``members``: new name → (source, name there, storage id or None to keep the source's)."""

    def __init__(
        self,
        root: Path,
        fmt: str,
        members: dict[str, tuple[TensorSource, str, str | None]],
        owned: list[TensorSource],
    ) -> None:
        infos: dict[str, TensorInfo] = {}
        owners: dict[Path, TensorSource] = {}
        for new, (src, old, storage) in members.items():
            info = replace(src.info(old), name=new)
            if storage is not None:
                info = replace(info, storage=storage, byte_span=(0, info.nbytes), complete=True)
            infos[new] = info
            owners.setdefault(info.file, src)
        super().__init__(root, fmt, list(owners), infos)
        self._members = members
        self._owners = owners
        self._owned = owned

    def origin(self, name: str) -> tuple[TensorSource, str]:
        src, old, _ = self._members[name]
        return src, old

    def read(
        self,
        name: str,
        *,
        pin: bool = False,
        out: torch.Tensor | None = None,
        rows: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        src, old, _ = self._members[name]
        return src.read(old, pin=pin, out=out, rows=rows)

    def fd(self, path: Path) -> int:
        return self._owners[path].fd(path)

    def close(self) -> None:
        for src in self._owned:
            src.close()
        self._owned = []
