"""Training checkpoints (PeftModel state dicts, DeepSpeed ZeRO, FSDP/DCP) for ``merge``,
``convert`` and ``inspect``: open, split into base + adapter, then reuse the ordinary
plan, math and writer."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from lora_cli.adapters.checkpoint import SplitCheckpoint, split_checkpoint
from lora_cli.errors import MergeError, UsageError
from lora_cli.io.checkpoint_detect import open_training_checkpoint
from lora_cli.io.dtypes import FLOAT_DTYPES, parse_dtype_option
from lora_cli.io.layout import parse_size
from lora_cli.io.writer import check_destination

DEFAULT_SHARD = "5GB"


def default_dtype(split: SplitCheckpoint, base: Path | None, training: str | None) -> str | None:
    """The base's dtype where a base is known, else the training dtype."""
    if base is not None:
        counts = Counter(
            i.dtype
            for n, i in split.base.infos.items()
            if i.dtype in FLOAT_DTYPES and n in split.from_base
        )
        if not counts:  # every tensor came from the checkpoint: ask the base itself
            from lora_cli.io.reader import open_source

            with open_source(base) as src:
                counts = Counter(i.dtype for i in src.infos.values() if i.dtype in FLOAT_DTYPES)
        if counts:
            return counts.most_common(1)[0][0]
    return training


def merge_checkpoint(
    ckpt_path: Path,
    output: Path | None,
    *,
    base: Path | None = None,
    adapter_config: Path | None = None,
    dtype: str = "keep",
    max_shard_size: str | None = None,
    device: str = "auto",
    dry_run: bool = False,
    overwrite: bool = False,
    progress_factory: Any = None,
) -> Any:
    from lora_cli.merge.plan import build_plan
    from lora_cli.merge.run import resolve_device, run_merge
    from lora_cli.stages.merge import DryRun, _nbytes

    out_dtype = parse_dtype_option(dtype)
    shard_limit = parse_size(max_shard_size or DEFAULT_SHARD)
    if not dry_run:
        if output is None:
            raise UsageError("no output folder given", "pass -o OUTPUT")
        check_destination(output, overwrite, [Path(ckpt_path)] + ([Path(base)] if base else []))
    dev = resolve_device(device)
    ckpt = open_training_checkpoint(Path(ckpt_path))
    try:
        split = split_checkpoint(ckpt, base=base, adapter_config=adapter_config)
    except BaseException:
        ckpt.close()
        raise
    try:
        if split.adapter is None:
            raise MergeError(
                f"{ckpt_path}: the checkpoint holds no LoRA tensors; there is nothing to merge",
                "use `lora convert` to turn it into a safetensors model",
            )
        out_dtype = out_dtype or default_dtype(split, base, ckpt.training_dtype)
        plan = build_plan(
            split.base, split.adapter, out_dtype=out_dtype, max_shard_size=shard_limit
        )
        plan.warnings = ckpt.notes + split.notes + plan.warnings
        if dry_run:
            return DryRun(plan)
        total = sum(_nbytes(a) for a in plan.actions())
        progress = progress_factory(total) if progress_factory else None
        return run_merge(plan, Path(output), device=dev, overwrite=overwrite, progress=progress)
    finally:
        split.close()
