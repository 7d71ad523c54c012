"""``lora merge``: plan the whole merge, then stream it into a new folder."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_cli.adapters.findings import (
    config_findings,
    refuse_or_warn,
    refuse_repeated,
    value_findings,
)
from lora_cli.adapters.formats import is_adapter, load_adapter
from lora_cli.adapters.peft import Adapter
from lora_cli.args import parse_weights
from lora_cli.errors import MergeError, UsageError
from lora_cli.io.destination import check_destination
from lora_cli.io.dtypes import parse_dtype_option
from lora_cli.io.layout import parse_size, read_json
from lora_cli.merge.combine import build_combined_plan
from lora_cli.merge.inputs import Notice, merge_card, resolve_inputs
from lora_cli.merge.parts import parse_part, part_actions, part_shards, run_join, run_part
from lora_cli.merge.plan import MergePlan, build_plan
from lora_cli.merge.publish import (
    Push,
    ShardSink,
    commit_message,
    join_to_hub,
)
from lora_cli.merge.quantized import fidelity, plan_merge, refuse_quantized_base
from lora_cli.merge.run import MergeResult, Progress, resolve_device, run_merge
from lora_cli.merge.side_files import adapter_side_files
from lora_cli.preload import start_torch_import


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
        "renames": plan.renames(),
        "counts": plan.counts(),
        "untie_embeddings": plan.untied,
        "config_updates": plan.config_updates,
        "shards": [s.filename for s in plan.shards],
        "tensors": {
            kind: sorted(a.name for a in acts if a.kind == kind)
            for kind in ("merge", "replace", "rows")
        },
        "warnings": plan.warnings,
        "tokenizer_from": plan.side_files.to_json() if plan.side_files is not None else None,
        **combined_json(plan),
    }


def combined_json(plan: MergePlan) -> dict[str, Any]:
    """``adapters``: path and weight of each adapter, for a merge of several (else nothing)."""
    if not plan.combined:
        return {}
    return {"adapters": [{"path": str(a.root), "weight": w} for a, w in plan.combined]}


def merge(
    base: Path | str | None,
    adapter: Path | str | Sequence[Path | str],
    output: Path | None,
    *,
    weights: str | Sequence[float] | None = None,
    dtype: str = "keep",
    max_shard_size: str | None = None,
    device: str = "auto",
    dry_run: bool = False,
    overwrite: bool = False,
    progress_factory: Any = None,
    quantize: str = "bf16",
    part: str | None = None,
    join: bool = False,
    checksums: bool = True,
    notice: Notice | None = None,
    hub_progress: bool = True,
    evict: bool = False,
    push_to_hub: str | None = None,
    revision: str | None = None,
    private: bool = False,
    create_pr: bool = False,
) -> MergeResult | DryRun:
    """Check everything, then merge; ``progress_factory(total_bytes)`` returns a callback.

    ``base`` and each adapter are paths or Hugging Face Hub ids (``sources/hub.py``); ``base``
    None takes the (first) adapter's ``base_model_name_or_path``. ``notice`` hears where
    inputs came from. Several adapters (or ``weights``) merge their weighted sum in one pass
    (``merge.combine``); one adapter without weights takes the single-adapter plan.
    ``part="I/N"`` writes only part I of a split merge, ``join`` publishes the parts
    (``merge/parts.py``). ``evict`` deletes each base shard fetched from the Hub once read,
    ``push_to_hub`` publishes the output to that repo in one commit (``merge/publish.py``).
    """
    refs = [adapter] if isinstance(adapter, str | Path) else list(adapter)
    out_dtype = parse_dtype_option(dtype)
    shard_limit = parse_size(max_shard_size) if max_shard_size else None
    split = parse_part(part) if part is not None else None
    if split and (join or dry_run):
        raise UsageError("--part goes without --join and --dry-run", "run parts, then one join")
    push = _push_target(push_to_hub, revision, private, create_pr)
    if not dry_run:
        if output is None:
            raise UsageError("no output folder given", "pass -o OUTPUT")
        local = [Path(p) for p in (base, *refs) if p is not None and Path(p).exists()]
        check_destination(output, overwrite, local, parts=bool(split or join))  # before downloads
    # "auto" asks torch whether there is a GPU: write_shards does, after the early copies
    dev = device if device.strip().lower() == "auto" else resolve_device(device)
    inputs = resolve_inputs(base, refs, notice=notice, progress=hub_progress, remote_base=True)
    refuse_repeated(inputs.adapters)
    if not dry_run:
        check_destination(
            Path(output), overwrite, [inputs.base, *inputs.adapters], parts=bool(split or join)
        )
    writes_math = not (dry_run or join)
    if writes_math:
        start_torch_import()  # planning and the untouched tensors' copies need no torch
    base_src = inputs.open_base()  # (a broken file is named first, whatever its slot)
    try:
        _refuse_swapped(inputs.base, inputs.adapters)
        opened: list[Adapter] = []
        try:
            for path in inputs.adapters:
                opened.append(load_adapter(path, base_src))
                opened[-1].values_pending = writes_math  # scanned by write_shards
            findings = [f for ad in opened for f in config_findings(ad)]
            if not writes_math:  # else write_shards reads them, after torch has loaded
                findings += [f for ad in opened for f in value_findings(ad)]
            warnings = refuse_or_warn(findings)  # what validate finds, merge refuses
            if len(opened) == 1 and weights is None:
                plan = plan_merge(
                    base_src,
                    opened[0],
                    out_dtype=out_dtype,
                    max_shard_size=shard_limit,
                    quantize=quantize,
                )
            else:
                refuse_quantized_base(base_src, "several adapters in one pass")
                plan = build_combined_plan(
                    base_src,
                    opened,
                    parse_weights(weights, len(opened)),
                    out_dtype=out_dtype,
                    max_shard_size=shard_limit,
                )
            plan.warnings += warnings
            plan.side_files = adapter_side_files(opened)
            if dry_run:
                return DryRun(plan)
            options = {
                "dtype": out_dtype,
                "max_shard_size": shard_limit,
                "quantize": quantize,
                "weights": [w for _, w in plan.combined],
                "checksums": checksums,
            }
            card = merge_card(
                inputs,
                base,
                [(str(ref), ad) for ref, ad in zip(refs, opened, strict=True)],
                _card_options(dtype, max_shard_size, quantize, weights),
            )
            message = commit_message(
                f"{inputs.base_ref}@{inputs.remote.commit}" if inputs.remote else inputs.base_ref,
                [str(r) for r in refs],
            )
            if join and push:
                result = join_to_hub(plan, Path(output), options, push, message,
                                     overwrite=overwrite, model_card=card)  # fmt: skip
                return _remote_records(result, inputs, push)
            if join:
                result = run_join(plan, Path(output), options, overwrite=overwrite, model_card=card)
                return _remote_records(result, inputs, push)
            acts = plan.actions() if split is None else part_actions(plan, split)
            total = sum(_nbytes(a) for a in acts)
            progress: Progress | None = progress_factory(total) if progress_factory else None
            shards = plan.shards if split is None else part_shards(plan, split)
            sink = ShardSink(plan, shards, evict=evict, push=push) if evict or push else None
            if push:
                push.prepare()
            if split is not None:
                result = run_part(plan, Path(output), split, options, device=dev,
                                  progress=progress, on_shard=sink)  # fmt: skip
                return _remote_records(result, inputs, push)
            result = run_merge(
                plan,
                Path(output),
                device=dev,
                overwrite=overwrite,
                progress=progress,
                checksums=checksums,
                model_card=card,
                on_shard=sink,
                before_publish=(lambda folder, files: push.commit(folder, files, message))
                if push
                else None,
            )
            _remote_records(result, inputs, push)
            result.adapters = combined_json(plan).get("adapters", [])
            result.quantized, low = fidelity(plan)
            result.warnings = result.warnings + low
            return result
        finally:
            for ad in opened:
                ad.close()
    finally:
        base_src.close()


def _refuse_swapped(base: Path, adapters: Sequence[Path]) -> None:
    """BASE that is an adapter: the arguments were swapped, or BASE was left out of a merge
    of several adapters. Said before planning, whose errors would blame the files."""
    if not is_adapter(base):
        return
    models = [a for a in adapters if not is_adapter(a)]
    if models:
        raise UsageError(
            f"BASE {base} is an adapter and ADAPTER {models[0]} is not: swapped?",
            f"the base comes first: lora merge {models[0]} {base} -o OUT",
        )
    raise UsageError(
        f"BASE {base} is an adapter, not a model",
        "lora merge BASE ADAPTER… -o OUT (or lora merge ADAPTER -o OUT: the base from its "
        "adapter_config.json)",
    )


# what --adapter-config may say about the scale, compared with the folder's own config
_SCALE_KEYS = ("peft_type", "r", "lora_alpha", "use_rslora", "use_dora", "rank_pattern",
               "alpha_pattern", "fan_in_fan_out", "lora_bias")  # fmt: skip


def trainer_adapter_folder(
    ckpt: Path, adapters: Sequence[Path] | None, adapter_config: Path | None
) -> Path:
    """``lora merge CKPT -o OUT --base BASE`` where CKPT is an HF Trainer ``checkpoint-N/``
    trained without DeepSpeed or FSDP: an adapter folder (``adapter_model.safetensors`` and
    ``adapter_config.json`` beside ``optimizer.pt``, ``scheduler.pt``, ``trainer_state.json``),
    merged as ``lora merge BASE CKPT``. A redundant ``--adapter-config`` must agree with the
    folder's own config on everything that sets the scale."""
    if adapters:
        raise UsageError(
            "--base and --adapter-config go with a single training checkpoint, not with "
            "BASE ADAPTER…",
            "lora merge BASE ADAPTER… -o OUT, or lora merge CKPT -o OUT --base BASE",
        )
    if not is_adapter(ckpt):
        raise UsageError(
            f"{ckpt}: neither a training checkpoint (PeftModel state dict, DeepSpeed, FSDP, "
            "HF Trainer checkpoint-N/) nor an adapter folder",
            "lora merge CKPT -o OUT --base BASE",
        )
    if adapter_config is not None:
        from lora_cli.adapters.peft import find_adapter_files

        own_path, _ = find_adapter_files(ckpt)
        own = read_json(own_path, "adapter config")
        given = read_json(adapter_config, "adapter config")
        for key in _SCALE_KEYS:
            if (own.get(key) or None) != (given.get(key) or None):
                raise UsageError(
                    f"{adapter_config}: {key} {given.get(key)!r} disagrees with "
                    f"{own_path} ({own.get(key)!r})",
                    "leave out --adapter-config: the folder's own config is used",
                )
    return Path(ckpt)


def _push_target(
    repo: str | None, revision: str | None, private: bool, create_pr: bool
) -> Push | None:
    if repo is None:
        if revision or private or create_pr:
            from lora_cli.errors import UsageError

            raise UsageError(
                "--revision, --private and --create-pr go with --push-to-hub",
                "lora merge BASE ADAPTER -o OUT --push-to-hub org/name [--revision BRANCH]",
            )
        return None
    return Push(repo, revision, private, create_pr)


def _remote_records(result: MergeResult, inputs: Any, push: Push | None) -> MergeResult:
    """``--json``'s ``fetched`` (a Hub base) and ``pushed`` (``--push-to-hub``)."""
    if inputs.remote is not None:
        result.fetched = {"repo": inputs.remote.ref.repo_id, "commit": inputs.remote.commit,
                          **inputs.remote.fetched.to_json()}  # fmt: skip
    if push is not None and result.pushed is None:
        result.pushed = push.to_json()
    return result


def _card_options(
    dtype: str,
    max_shard_size: str | None,
    quantize: str,
    weights: str | Sequence[float] | None,
) -> list[str]:
    """The options that shape the output's bytes, as typed on the command line."""
    options = [] if dtype == "keep" else ["--dtype", dtype]
    if max_shard_size:
        options += ["--max-shard-size", max_shard_size]
    if quantize != "bf16":
        options += ["--quantize", quantize]
    if weights is not None:
        text = weights if isinstance(weights, str) else ",".join(f"{w:g}" for w in weights)
        options += ["--weights", text]
    return options


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
    from lora_cli.sources.checkpoint_detect import open_training_checkpoint

    out_dtype = parse_dtype_option(dtype)
    shard_limit = parse_size(max_shard_size or "5GB")  # the view has no shard layout to keep
    if not dry_run:
        if output is None:
            raise UsageError("no output folder given", "pass -o OUTPUT")
        read = [ckpt_path, base, adapter_config]
        check_destination(output, overwrite, [Path(p) for p in read if p is not None])
    dev = resolve_device(device)
    from lora_cli.sources.checkpoint_detect import is_training_checkpoint

    if Path(ckpt_path).exists() and not is_training_checkpoint(Path(ckpt_path)):
        raise UsageError(
            f"{ckpt_path}: not a training checkpoint (PeftModel state dict, DeepSpeed or FSDP)",
            "to merge an adapter into a base: lora merge BASE ADAPTER -o OUT",
        )
    ckpt = open_training_checkpoint(Path(ckpt_path))
    try:
        if base is None and ckpt.details.get("frozen_excluded"):
            raise MergeError(
                f"{ckpt_path}: frozen weights are not in this checkpoint (a DeepSpeed "
                "exclude_frozen_parameters save holds only the trained ones)",
                "pass --base BASE",
            )
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
        findings = config_findings(split.adapter) + value_findings(split.adapter)
        plan.warnings += refuse_or_warn(findings)  # what validate finds, merge refuses
        plan.side_files = adapter_side_files([split.adapter])
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
