"""A tensor source whose tensors are computed from another one's, one at a time.

Adapters from other ecosystems (mlx-lm, GGUF LoRA) store the same factors as PEFT in
another orientation, stacking or row order. Presenting them as PEFT-form tensors keeps
every consumer (merge, convert, validate) on one code path: a derived tensor is a
recipe (read these source tensors, transpose / slice / permute them) evaluated only
when the tensor is read, so memory stays at one tensor as with any other source.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_cli.io.dtypes import nbytes_of
from lora_cli.io.reader import TensorInfo, TensorSource

if TYPE_CHECKING:
    import torch

Compute = Callable[[Callable[[str], "torch.Tensor"]], "torch.Tensor"]


@dataclass(frozen=True)
class Derived:
    """One output tensor: its declared dtype/shape and how to compute it from the source."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    compute: Compute  # called with ``read(source_key)``; returns a tensor of dtype/shape


class _Reader:
    def __init__(self, source: Any, recipes: dict[str, Derived]) -> None:
        self.source = source
        self.recipes = recipes

    def read(self, name: str) -> torch.Tensor:
        from lora_cli.io.dtypes import to_torch

        recipe = self.recipes[name]
        value = recipe.compute(self.source.read)
        want = to_torch(recipe.dtype)
        if tuple(value.shape) != recipe.shape:  # a recipe bug, never bad input
            raise AssertionError(f"{name}: computed {tuple(value.shape)}, declared {recipe.shape}")
        return value.to(want).contiguous()

    def close(self) -> None:
        self.source.close()


def derived_source(
    source: Any, recipes: list[Derived], *, root: Path, file: Path, fmt: str
) -> TensorSource:
    """A ``TensorSource`` over ``recipes`` that owns (and closes) ``source``.

    ``source`` needs ``read(key) -> tensor`` and ``close()``; ``file`` is the file the
    tensors come from, named in messages.
    """
    table = {r.name: r for r in recipes}
    infos = {
        r.name: TensorInfo(
            name=r.name, dtype=r.dtype, shape=r.shape, nbytes=nbytes_of(r.dtype, r.shape), file=file
        )
        for r in recipes
    }
    return TensorSource(root, fmt, [file], infos, readers={file: _Reader(source, table)})


def plain(key: str) -> Compute:
    return lambda read: read(key)


def transposed(key: str) -> Compute:
    return lambda read: read(key).T
