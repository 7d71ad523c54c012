"""``lora validate``: integrity checks on a checkpoint, adapter or weights file, and a
recomputation of a merged checkpoint from its BASE and ADAPTER.

Nothing here prints. ``validate`` returns a ``ValidateReport`` whose findings are records
(file, tensor, check, message) that render as one line each; its exit code is 0 without
findings and 1 with any. What makes the check impossible (a path that does not exist,
options that do not go together, inputs that cannot be merged) is raised as a
``LoraError`` instead, which the CLI turns into exit code 2. A corrupt file *inside* what
is being validated is a finding, found per file, so one bad shard does not hide the rest.

Memory stays at about one tensor: every tensor of PATH is read once, scanned for NaN/Inf
and, in recompute mode, compared right away with the base's bytes (untouched tensors) or
with the value ``merge`` computes for it (``merge.run.compute_tensor``, the one shared
code path), in chunks.

This module checks the options and picks the checks; they live in ``lora_cli.validate``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lora_cli.adapters.findings import refuse_repeated
from lora_cli.adapters.formats import is_adapter
from lora_cli.args import parse_weights
from lora_cli.errors import FormatError, UsageError
from lora_cli.io.reader import INDEX_SUFFIXES
from lora_cli.sources.hub import Notice, resolve_input
from lora_cli.validate.adapter import validate_adapter
from lora_cli.validate.report import ValidateReport
from lora_cli.validate.weights import WeightsCheck


def validate(
    path: Path | str,
    *,
    base: Path | str | None = None,
    adapter: Path | str | Sequence[Path | str] | None = None,
    weights: str | Sequence[float] | None = None,
    atol: float = 0.0,
    rtol: float = 0.0,
    sample: int | None = None,
    device: str = "auto",
    part: str | None = None,
    notice: Notice | None = None,
    hub_progress: bool = True,
    progress_factory: Any = None,
) -> ValidateReport:
    """Validate ``path`` (an adapter, a checkpoint or a weights file); with ``base`` and
    ``adapter``, also recompute it as their merge. Raises ``LoraError`` when impossible.

    ``adapter`` may list several adapters, merged with ``weights`` as ``merge A1 A2 …``.
    ``path``, ``base`` and each adapter may be Hub ids, resolved as ``merge`` resolves them
    (``sources/hub.py``), once the options are known to go together. ``progress_factory(total
    bytes)`` returns a callback told of each tensor read (a checkpoint's scan)."""
    refs = [] if adapter is None else [adapter] if isinstance(adapter, str | Path) else adapter
    if weights is not None and not refs:
        raise UsageError("--weights applies to --base with --adapter")
    weight_list = parse_weights(weights, len(refs)) if weights is not None else None
    for name, value in (("--atol", atol), ("--rtol", rtol)):
        if not math.isfinite(value) or value < 0:
            raise UsageError(f"{name} {value} must be a finite number ≥ 0")
    split = None
    if part is not None:
        from lora_cli.merge.parts import parse_part

        split = parse_part(part)
    if sample is not None and sample < 0:
        raise UsageError(f"--sample {sample} must be ≥ 0")

    def resolve(ref: Path | str, what: str) -> Path:
        return resolve_input(ref, what, notice=notice, progress=hub_progress)

    path = resolve(path, "path")
    if not path.exists():
        raise FormatError(f"{path}: no such file or directory")
    recompute_options = sample is not None or atol or rtol
    if is_adapter(path):
        if refs:
            raise UsageError(
                f"{path} is an adapter; --adapter is for checking a merged checkpoint",
                "to check an adapter against a base model, pass only --base BASE",
            )
        if recompute_options:
            raise UsageError("--sample, --atol and --rtol apply to --base with --adapter")
        if split is not None:
            raise UsageError("--part splits a checkpoint's weight files; an adapter is one")
        from lora_cli.sources.hub_remote import remote_base

        # a Hub base is checked from its shards' headers alone: nothing is downloaded
        remote = remote_base(base, "base", notice, hub_progress) if base is not None else None
        base_path = remote.folder if remote else resolve(base, "base") if base else None
        report = ValidateReport(path, "adapter", base=base_path)
        validate_adapter(report, path, remote.open() if remote else base_path)
        return report
    if (base is None) != (not refs):
        raise UsageError(
            "--base and --adapter go together",
            "pass both to recompute a merged checkpoint, or neither for structural checks",
        )
    if base is None and recompute_options:
        raise UsageError("--sample, --atol and --rtol apply to --base with --adapter")
    base_path = resolve(base, "base") if base is not None else None
    adapters = [resolve(a, "adapter") for a in refs]
    refuse_repeated(adapters)  # as merge refuses them
    report = ValidateReport(
        path,
        "file" if path.is_file() and not path.name.endswith(INDEX_SUFFIXES) else "checkpoint",
        base=base_path,
        adapter=adapters[0] if adapters else None,
        adapters=adapters,
        weights=weight_list,
        atol=atol,
        rtol=rtol,
        sample=sample,
        part=split.label if split else None,
    )
    WeightsCheck(report, path, device, split, progress_factory).run()
    return report
