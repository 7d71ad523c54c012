"""``lora merge``: plan the whole merge, then stream it into a new folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_cli.adapters.peft import load_adapter
from lora_cli.io.dtypes import parse_dtype_option
from lora_cli.io.layout import parse_size
from lora_cli.io.reader import open_source
from lora_cli.io.writer import check_destination
from lora_cli.merge.plan import MergePlan, build_plan
from lora_cli.merge.run import MergeResult, Progress, resolve_device, run_merge


@dataclass
class DryRun:
    plan: MergePlan

    def to_json(self) -> dict[str, Any]:
        return plan_json(self.plan)


def plan_json(plan: MergePlan) -> dict[str, Any]:
    acts = plan.actions()
    return {
        "base": str(plan.base.root),
        "adapter": str(plan.adapter.root),
        "rule": plan.rule,
        "counts": plan.counts(),
        "untie_embeddings": plan.untied,
        "config_updates": plan.config_updates,
        "shards": [s.filename for s in plan.shards],
        "tensors": {
            kind: sorted(a.name for a in acts if a.kind == kind)
            for kind in ("merge", "replace", "rows")
        },
        "warnings": plan.warnings,
    }


def merge(
    base: Path,
    adapter: Path,
    output: Path | None,
    *,
    dtype: str = "keep",
    max_shard_size: str | None = None,
    device: str = "auto",
    dry_run: bool = False,
    overwrite: bool = False,
    progress_factory: Any = None,
) -> MergeResult | DryRun:
    """Check everything, then merge; ``progress_factory(total_bytes)`` returns a callback."""
    out_dtype = parse_dtype_option(dtype)
    shard_limit = parse_size(max_shard_size) if max_shard_size else None
    if not dry_run:
        if output is None:
            from lora_cli.errors import UsageError

            raise UsageError("no output folder given", "pass -o OUTPUT")
        check_destination(output, overwrite, [Path(base), Path(adapter)])
    dev = resolve_device(device)
    base_src = open_source(Path(base))
    try:
        ad = load_adapter(Path(adapter))
        try:
            plan = build_plan(base_src, ad, out_dtype=out_dtype, max_shard_size=shard_limit)
            if dry_run:
                return DryRun(plan)
            total = sum(_nbytes(a) for a in plan.actions())
            progress: Progress | None = progress_factory(total) if progress_factory else None
            return run_merge(plan, Path(output), device=dev, overwrite=overwrite, progress=progress)
        finally:
            ad.close()
    finally:
        base_src.close()


def _nbytes(action: Any) -> int:
    from lora_cli.io.dtypes import nbytes_of

    return nbytes_of(action.dtype, action.shape)


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
    """``lora merge CKPT``: a training checkpoint (PeftModel state dict, DeepSpeed, FSDP)
    split into base view + adapter, then the ordinary plan and merge."""
    from lora_cli.adapters.checkpoint import default_dtype, split_checkpoint
    from lora_cli.errors import MergeError
    from lora_cli.io.checkpoint_detect import open_training_checkpoint

    out_dtype = parse_dtype_option(dtype)
    shard_limit = parse_size(max_shard_size or "5GB")  # the view has no shard layout to keep
    if not dry_run:
        if output is None:
            from lora_cli.errors import UsageError

            raise UsageError("no output folder given", "pass -o OUTPUT")
        check_destination(output, overwrite, [Path(ckpt_path)] + ([Path(base)] if base else []))
    dev = resolve_device(device)
    from lora_cli.io.checkpoint_detect import is_training_checkpoint

    if Path(ckpt_path).exists() and not is_training_checkpoint(Path(ckpt_path)):
        from lora_cli.errors import UsageError

        raise UsageError(
            f"{ckpt_path}: not a training checkpoint (PeftModel state dict, DeepSpeed or FSDP)",
            "to merge an adapter into a base: lora merge BASE ADAPTER -o OUT",
        )
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
        if split.config is None:
            plan.warnings.append("no config.json known: the output has none (pass --base BASE "
                                 "to take the base's config and tokenizer files)")  # fmt: skip
        if dry_run:
            return DryRun(plan)
        total = sum(_nbytes(a) for a in plan.actions())
        progress = progress_factory(total) if progress_factory else None
        return run_merge(plan, Path(output), device=dev, overwrite=overwrite, progress=progress)
    finally:
        split.close()
