"""Writing a canonical Adapter out in another ecosystem's format (``convert --to``).

Each target format has its own module (``to_peft``, ``to_mlx``, ``to_gguf``) that turns
the Adapter into a list of output tensors (recipes, computed one at a time) plus its
config; this module holds what they share: the refusals every target makes, and
writing a recipe list to one safetensors file that is read back and compared bit for
bit before the output folder is renamed into place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lora_cli.adapters.peft import Adapter, check_adapter_tensors, unmergeable_reasons
from lora_cli.errors import FormatError
from lora_cli.io.dtypes import to_torch
from lora_cli.sources.view import Derived

if TYPE_CHECKING:
    import torch

Progress = Callable[[int, str], None]


@dataclass
class Exported:
    """What a writer produced, for ``ConvertResult``."""

    files: list[str]
    tensors: int
    bytes: int
    notes: list[str] = field(default_factory=list)


def refuse(adapter: Adapter, target: str, problems: list[str]) -> None:
    """One line naming the first problem (and how many more) when ``problems`` is not empty."""
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise FormatError(f"{adapter.root}: cannot convert to {target}: {problems[0]}{more}")


def common_checks(adapter: Adapter, target: str) -> None:
    """What no target can carry: unmergeable configs, broken or empty adapters."""
    refuse(adapter, target, unmergeable_reasons(adapter))
    check_adapter_tensors(adapter)
    if not adapter.modules and not adapter.replacements and not adapter.token_rows:
        raise FormatError(f"{adapter.weights_file}: the adapter holds no LoRA tensors")


def scaled(read_key: str, factor: float) -> Callable[..., torch.Tensor]:
    """``key`` times ``factor`` in fp32 (a fold of a per-module scale into lora_B)."""
    import torch

    return lambda read: read(read_key).to(torch.float32) * factor


def write_safetensors(
    path: Path,
    recipes: list[Derived],
    read: Callable[[str], torch.Tensor],
    metadata: dict[str, str],
    progress: Progress | None,
) -> int:
    """Write ``recipes`` to ``path``, read the file back and compare; return bytes."""
    import torch

    from lora_cli.io.reader import open_source
    from lora_cli.io.writer import ShardWriter

    writer = ShardWriter(path, [(r.name, r.dtype, r.shape) for r in recipes], metadata)
    total = 0
    try:
        for r in recipes:
            value = r.compute(read).to(to_torch(r.dtype)).contiguous()
            writer.write(r.name, value)
            total += writer.entries[r.name].nbytes
            if progress:
                progress(writer.entries[r.name].nbytes, r.name)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    with open_source(path) as written:
        for r in recipes:
            want = r.compute(read).to(to_torch(r.dtype)).contiguous()
            got = written.read(r.name)
            if got.shape != want.shape or not torch.equal(
                got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)
            ):
                raise FormatError(
                    f"{path}: tensor {r.name!r} does not match its source after writing",
                    "the disk or the source file changed during conversion; rerun",
                )
    return total
