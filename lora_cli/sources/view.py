"""A tensor source whose tensors are other sources' under new names, or computed from them.

A training checkpoint holds a model under in-memory PEFT names (``…q_proj.base_layer.weight``)
and, when frozen weights were left out, needs the rest from ``--base``; adapters from other
ecosystems (mlx-lm, GGUF LoRA) store the same factors as PEFT in another orientation,
stacking or row order. Presenting both as ordinary PEFT-form tensors keeps every consumer
(planner, merge, convert, validate, writer) on one code path. A renamed tensor keeps its
source's bytes and identity (raw offsets, storages: copied as bytes, aliases still
detected); a computed one is a recipe (read these source tensors, transpose / slice /
permute them) evaluated only when the tensor is read, so memory stays at one tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_cli.io.dtypes import nbytes_of, to_torch
from lora_cli.io.reader import TensorInfo, TensorSource

if TYPE_CHECKING:
    import torch

Read = Callable[[str], "torch.Tensor"]
Compute = Callable[[Read], "torch.Tensor"]
Member = tuple[TensorSource, str, str | None]  # source, name there, storage id (None: the source's)


@dataclass(frozen=True)
class Derived:
    """One computed tensor: its declared dtype/shape and how to compute it from a source."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    compute: Compute  # called with ``read(source_key)``; returns a tensor of dtype/shape


class ViewSource(TensorSource):
    """``members``: new name → a ``Member`` (renamed) or a ``Derived`` recipe (computed with
    ``read``, named in messages as coming from ``file``). Closes the sources in ``owned``."""

    def __init__(
        self,
        root: Path,
        fmt: str,
        members: Mapping[str, Member | Derived],
        owned: Sequence[Any],
        *,
        read: Read | None = None,
        file: Path | None = None,
    ) -> None:
        infos: dict[str, TensorInfo] = {}
        owners: dict[Path, TensorSource] = {}
        for new, member in members.items():
            if isinstance(member, Derived):
                assert read is not None and file is not None
                nbytes = nbytes_of(member.dtype, member.shape)
                infos[new] = TensorInfo(new, member.dtype, member.shape, nbytes, file)
                continue
            src, old, storage = member
            info = replace(src.info(old), name=new)
            if storage is not None:
                info = replace(info, storage=storage, byte_span=(0, info.nbytes), complete=True)
            infos[new] = info
            owners.setdefault(info.file, src)
        files = list(owners) + ([file] if file is not None and file not in owners else [])
        super().__init__(root, fmt, files, infos)
        self._members = members
        self._owners = owners
        self._owned = list(owned)
        self._read = read

    @classmethod
    def derived(
        cls, source: Any, recipes: Sequence[Derived], *, root: Path, file: Path, fmt: str
    ) -> ViewSource:
        """``recipes`` computed from ``source`` (``read(key) -> tensor`` and ``close()``),
        which the view owns; ``file`` is the file the tensors come from."""
        members = {r.name: r for r in recipes}
        return cls(root, fmt, members, [source], read=source.read, file=file)

    def origin(self, name: str) -> tuple[TensorSource, str]:
        """The source and name a renamed tensor is read from."""
        member = self._members[name]
        assert not isinstance(member, Derived)
        return member[0], member[1]

    def read(
        self,
        name: str,
        *,
        pin: bool = False,
        out: torch.Tensor | None = None,
        rows: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        member = self._members[name]
        if not isinstance(member, Derived):
            src, old, _ = member
            return src.read(old, pin=pin, out=out, rows=rows)
        assert self._read is not None
        value = member.compute(self._read)
        if tuple(value.shape) != member.shape:  # a recipe bug, never bad input
            raise AssertionError(f"{name}: computed {tuple(value.shape)}, declared {member.shape}")
        value = value.to(to_torch(member.dtype)).contiguous()
        return value[rows[0] : rows[1]].contiguous() if rows else value

    def fd(self, path: Path) -> int:
        return self._owners[path].fd(path)

    def close(self) -> None:
        for src in self._owned:
            src.close()
        self._owned = []


def plain(key: str) -> Compute:
    return lambda read: read(key)


def transposed(key: str) -> Compute:
    return lambda read: read(key).T
