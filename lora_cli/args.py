"""Checks of the command line that need neither torch nor a file's contents.

A typo in a path, a ``--weights`` list of the wrong length or an unknown ``--device`` is
answered before the stages (and torch, about two seconds) are imported: a user fixing a
command line should not wait for the machinery that would run it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from lora_cli.errors import FormatError, UsageError
from lora_cli.output import plural

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def parse_weights(spec: str | Sequence[float] | None, count: int) -> list[float]:
    """``"0.7,0.3"`` → ``[0.7, 0.3]``, one finite number per adapter; default all 1."""
    if spec is None:
        return [1.0] * count
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    try:
        weights = [float(w) for w in items]
    except ValueError:
        raise UsageError(
            f"--weights {spec!r}: not a comma-separated list of numbers", "e.g. --weights 0.7,0.3"
        ) from None
    if len(weights) != count:
        raise UsageError(
            f"--weights gives {plural(len(weights), 'number')} for {plural(count, 'adapter')}",
            "one weight per adapter",
        )
    bad = [w for w in weights if not math.isfinite(w)]
    if bad:
        raise UsageError(f"--weights {spec!r}: {bad[0]} is not a finite number")
    return weights


def check_device(spec: str) -> None:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (whether that GPU exists needs torch)."""
    if not _DEVICE.match(spec.strip().lower()):
        raise UsageError(f"unknown device {spec!r}", "use auto, cpu or cuda[:N]")


def check_inputs(named: Iterable[tuple[str, Path | str | None]]) -> None:
    """Every ``(what, ref)`` is an existing path or could be a Hub id (``org/name[@rev]``)."""
    from lora_cli.sources.hub import parse_repo_ref

    for what, ref in named:
        if ref is None or Path(ref).exists() or parse_repo_ref(str(ref)) is not None:
            continue
        raise FormatError(
            f"{ref}: no such file or directory",
            f"{what} must be a local path or a Hugging Face Hub id (org/name)",
            file=str(ref),
        )
