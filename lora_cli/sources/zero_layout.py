"""The files of a DeepSpeed checkpoint folder: which tag ``latest`` names, which rank files
exist, and one-line refusals for the layouts ``zero.py`` does not consolidate."""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

from lora_cli.errors import FormatError
from lora_cli.io import sysio

_RANK_FILE = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_(optim|model)_states\.pt$")
_GLOBAL_STEP = re.compile(r"^global_step\d+$")


def natural_key(text: str) -> list[Any]:
    """``rank_10`` after ``rank_2`` (a lexical sort would scramble the reconstruction)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def is_zero_checkpoint(path: Path) -> bool:
    """A DeepSpeed checkpoint folder, its tag folder, or a folder with a ``latest`` file."""
    path = Path(path)
    if not path.is_dir():
        return False
    if any(path.glob("*_model_states.pt")):
        return True
    if (path / "latest").is_file():
        return True
    return any(_GLOBAL_STEP.match(p.name) and any(p.glob("*_model_states.pt"))
               for p in path.iterdir() if p.is_dir())  # fmt: skip


def find_tag_folder(path: Path) -> Path:
    """The ``global_stepN`` folder to read: ``latest`` decides, as in DeepSpeed."""
    path = Path(path)
    if any(path.glob("*_model_states.pt")):
        return path
    latest = path / "latest"
    if latest.is_file():
        return path / _read_latest(latest)
    steps = sorted((p for p in path.iterdir() if _GLOBAL_STEP.match(p.name)),
                   key=lambda p: natural_key(p.name))  # fmt: skip
    if len(steps) == 1:
        return steps[0]
    raise FormatError(
        f"{path}: {len(steps)} global_step folders and no 'latest' file",
        "point at the global_stepN folder you want",
    )


MAX_LATEST = 4096
"""Bytes of a ``latest`` file: DeepSpeed writes one tag name (``global_step123``); a
name longer than a path component (255 on every common filesystem) is not a tag."""


def _read_latest(latest: Path) -> str:
    """The tag ``latest`` names: one plain child folder name (never ``..``, ``.``, a
    path, or a name with control characters), as an existing folder beside it."""
    raw = sysio.read_file(latest, MAX_LATEST, "'latest' file")
    try:
        tag = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise FormatError(f"{latest}: not UTF-8 text (DeepSpeed writes a tag name)",
                          "point at the global_stepN folder you want") from None  # fmt: skip
    plain = (tag not in ("", ".", "..") and not any(c in tag for c in "/\\")
             and tag.isprintable())  # fmt: skip
    if not plain or not (latest.parent / tag).is_dir():
        raise FormatError(
            f"{latest}: names tag {tag[:80]!r}, which is not a folder here",
            "the checkpoint is incomplete; point at an existing global_stepN folder",
        )
    return tag


def refuse_unsupported(tag: Path) -> None:
    """One-line refusals for the DeepSpeed layouts this reader does not consolidate."""
    names = [p.name for p in tag.iterdir()]
    if any(n.startswith("layer_") and n.endswith("model_states.pt") for n in names):
        raise FormatError(f"{tag}: pipeline-parallel layer files (layer_XX-model_states.pt) "
                          "are not supported", "save without pipeline parallelism")  # fmt: skip
    if any(n.startswith("expp_rank_") or "expert" in n for n in names):
        raise FormatError(f"{tag}: MoE expert files are not supported",
                          "consolidate the experts with DeepSpeed's own tools")  # fmt: skip
    if "offloaded_tensors" in names:
        raise FormatError(f"{tag}: ZeRO-Infinity NVMe-offloaded optimizer state "
                          "(offloaded_tensors/) is not supported",
                          "save the checkpoint without NVMe offload")  # fmt: skip
    if "zero" in names and (tag / "zero").is_dir():
        raise FormatError(f"{tag}: a DeepSpeed universal checkpoint (zero/<param>/ folders) "
                          "is not supported", "point at the original ZeRO checkpoint")  # fmt: skip
    mp = {m.group(3) for n in names if (m := _RANK_FILE.match(n))}
    mp |= {n.split("_")[2] for n in names if n.startswith("mp_rank_")}
    if mp - {"00"}:
        raise FormatError(f"{tag}: tensor-parallel rank files (mp_rank_{sorted(mp)[-1]}) are "
                          "not supported", "save with tensor-parallel size 1")  # fmt: skip


def rank_files(tag: Path, kind: str) -> dict[int, str]:
    out = {}
    for p in tag.iterdir():
        m = _RANK_FILE.match(p.name)
        if m and m.group(4) == kind:
            out[int(m.group(2))] = p.name
    return out


def check_ranks(tag: Path, found: dict[int, str], world: int, kind: str) -> list[str]:
    # the first few missing ranks: a world size read from a file may be 2**40, so
    # this stops after len(found) + 3 steps instead of walking every rank
    missing = list(itertools.islice((r for r in range(world) if r not in found), 3))
    extra = sorted(r for r in found if r >= world)
    if missing or extra:
        more = ", ..." if world - len(found) > len(missing) else ""
        what = f"missing rank {', '.join(map(str, missing))}{more}" if missing else (
            f"extra rank {', '.join(map(str, extra))}")  # fmt: skip
        raise FormatError(
            f"{tag}: checkpoint has {len(found)} of {world} {kind} rank files ({what})",
            "copy every rank's file (or an old checkpoint was partly overwritten)",
        )
    return [found[r] for r in range(world)]
