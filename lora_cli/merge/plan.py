"""Adapter × checkpoint → one action per output tensor, with every check done up front.

Nothing is written until the whole plan resolves: a target missing from the
base, a shape from another model size or an unknown key stops the merge here,
listing the offenders, so a failed merge never leaves a half-written model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_cli.adapters.peft import (
    Adapter,
    LoraModule,
    check_adapter_tensors,
    unmergeable_reasons,
)
from lora_cli.errors import MergeError
from lora_cli.io.dtypes import FLOAT_DTYPES
from lora_cli.io.layout import (
    ShardPlan,
    config_dtype_update,
    plan_shards,
    read_json,
)
from lora_cli.io.reader import TensorInfo, TensorSource
from lora_cli.merge.experts import ExpertOp, plan_parameters
from lora_cli.merge.resolve import (
    INPUT_EMBEDDING_SUFFIXES,
    OUTPUT_EMBEDDING,
    factor_infos,
    fan_in_fan_out,
    input_embedding,
    lora_kind,
    problem_message,
    resolve_targets,
)
from lora_cli.names import Resolution
from lora_cli.sources.model_config import tie_word_embeddings


@dataclass
class LoraOp:
    module: LoraModule
    kind: str  # linear | conv | embedding | expert
    fan_in_fan_out: bool = False
    weight: float | None = None  # set: one of several adapters, merged as a weighted sum
    rounding: str = "once"  # merge/math.py Rounding: once | delta | mha_out
    block: str | None = None  # BD-LoRA: "A" or "B" is stored block-diagonal (compact)
    nblocks: int = 0


@dataclass
class TensorAction:
    """How one output tensor is produced."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    base: str | None  # base tensor to start from
    replacement: str | None = None  # adapter key that replaces the base value
    loras: list[LoraOp] = field(default_factory=list)
    bias: LoraModule | None = None  # lora_B.bias added to this bias
    rows: tuple[str, list[int]] | None = None
    experts: list[ExpertOp] = field(default_factory=list)  # target_parameters deltas
    quant: Any = None  # a part of a re-quantized weight (merge/requant.py QuantPart)

    @property
    def kind(self) -> str:
        if self.loras or self.bias or self.experts:
            return "merge"
        if self.replacement:
            return "replace"
        if self.rows:
            return "rows"
        return "copy"


@dataclass
class ShardOut:
    filename: str
    actions: list[TensorAction]
    metadata: dict[str, str]


@dataclass
class MergePlan:
    base: TensorSource
    adapter: Adapter
    shards: list[ShardOut]
    rule: str
    config: dict[str, Any] | None
    config_updates: dict[str, Any]
    untied: bool
    warnings: list[str]
    combined: list[tuple[Adapter, float]] = field(default_factory=list)  # several adapters
    quantized: list[Any] = field(default_factory=list)  # QuantGroups of --quantize keep
    side_files: Any = None  # AdapterSideFiles: the adapter's tokenizer/template (side_files.py)
    resolution: Resolution | None = None  # how adapter names met checkpoint names

    def renames(self) -> list[dict[str, Any]]:
        """Each adapter name the checkpoint spells differently: ``{adapter, checkpoint,
        rules}`` (the ``renames`` of ``--json``; empty when every name matched as it is)."""
        return [r.to_json() for r in self.resolution.renamed] if self.resolution else []

    def actions(self) -> list[TensorAction]:
        return [a for s in self.shards for a in s.actions]

    def counts(self) -> dict[str, int]:
        out = {"merge": 0, "replace": 0, "rows": 0, "copy": 0}
        for a in self.actions():
            out[a.kind] += 1
        return out


def load_base_config(base: TensorSource) -> dict[str, Any] | None:
    path = base.root / "config.json"
    return read_json(path, "model config") if path.is_file() else None


def build_plan(
    base: TensorSource,
    adapter: Adapter,
    *,
    out_dtype: str | None = None,
    max_shard_size: int | None = None,
) -> MergePlan:
    reasons = unmergeable_reasons(adapter)
    if reasons:
        raise MergeError(
            f"{adapter.config_path}: cannot merge: {reasons[0]}"
            + (f" (and {len(reasons) - 1} more problems)" if len(reasons) > 1 else "")
        )
    check_adapter_tensors(adapter)
    _check_mha_writer(adapter)
    config = load_base_config(base)
    tied = bool(tie_word_embeddings(config)) and OUTPUT_EMBEDDING not in base
    embed = input_embedding(base) if tied else None
    tied_head = tied and embed is not None

    model_type = (config or {}).get("model_type")
    expert_ops, expert_modules, expert_problems = plan_parameters(adapter, base, config)
    if expert_problems:
        raise MergeError(problem_message(adapter, expert_problems, base))
    resolution, any_targets = resolve_targets(
        adapter, base, config, skip=expert_modules, tied_head=tied_head, embed=embed
    )
    mapping = resolution.mapping
    if not any_targets and not expert_ops:
        raise MergeError(
            f"{adapter.weights_file}: the adapter holds no LoRA or replacement tensors",
            "an empty adapter (often a DeepSpeed ZeRO-3 save without gathering) merges to "
            "nothing; re-export it",
        )

    actions: dict[str, TensorAction] = {}

    def action_for(name: str) -> TensorAction:
        if name not in actions:
            source_name = name
            if name == OUTPUT_EMBEDDING and name not in base:
                source_name = embed  # untie: lm_head starts as a copy of the embedding
            info = base.info(source_name)
            actions[name] = TensorAction(name, info.dtype, info.shape, base=source_name)
        return actions[name]

    for name, key in adapter.replacements.items():
        target = mapping[name]
        act = action_for(target)
        act.replacement = key
        act.shape = adapter.source.info(key).shape
    for name, ops in expert_ops.items():
        action_for(name).experts.extend(ops)
    for module in adapter.modules.values():
        if module.path in expert_modules:
            continue
        if "lora_A.weight" in module.parts or "lora_embedding_A" in module.parts:
            act = action_for(mapping[module.weight])
            act.loras.append(_lora_op(module, act, adapter, model_type))
        if "lora_B.bias" in module.parts:
            action_for(mapping[module.bias]).bias = module
    for module, rows in adapter.token_rows.items():
        action_for(mapping[module + ".weight"]).rows = rows

    untied = False
    config_updates: dict[str, Any] = {}
    if tied_head and embed is not None:
        changed_head = OUTPUT_EMBEDDING in actions and actions[OUTPUT_EMBEDDING].kind != "copy"
        changed_embed = embed in actions and (actions[embed].loras or actions[embed].replacement)
        if changed_head or changed_embed:
            untied = True
            action_for(OUTPUT_EMBEDDING)
            config_updates["tie_word_embeddings"] = False
        elif OUTPUT_EMBEDDING in actions:
            del actions[OUTPUT_EMBEDDING]
    if out_dtype:
        config_updates.update(config_dtype_update(config, out_dtype))
    for act in actions.values():
        resized = act.replacement and act.base and act.shape != base.info(act.base).shape
        if resized and (
            act.name.endswith(INPUT_EMBEDDING_SUFFIXES) or act.name == OUTPUT_EMBEDDING
        ):
            config_updates["vocab_size"] = act.shape[0]

    shards = layout_shards(base, actions, embed, out_dtype, max_shard_size)
    warnings = list(adapter.warnings)
    if any(m.role == "mha_out" for m in adapter.modules.values()):
        warnings.append(
            "nn.MultiheadAttention out_proj: its LoRA delta is added twice, as PEFT <= 0.21.2 "
            "does in both its merge and its unmerged forward pass (the model you trained)"
        )
    return MergePlan(
        base=base,
        adapter=adapter,
        shards=shards,
        rule=resolution.rule,
        resolution=resolution,
        config=config,
        config_updates=config_updates,
        untied=untied,
        warnings=warnings,
    )


MHA_DOUBLED_UNTIL = (0, 21, 2)  # the newest PEFT known to add the out_proj delta twice


def _check_mha_writer(adapter: Adapter) -> None:
    """An ``nn.MultiheadAttention`` LoRA is merged as PEFT <= 0.21.2 computes it (out_proj
    delta twice, in training too); a newer PEFT may have dropped that (PR #3774)."""
    if not any(m.role == "mha_out" for m in adapter.modules.values()):
        return
    found = re.match(r"(\d+)\.(\d+)\.(\d+)", str(adapter.config.get("peft_version") or ""))
    if found and tuple(int(g) for g in found.groups()) > MHA_DOUBLED_UNTIL:
        raise MergeError(
            f"{adapter.config_path}: cannot merge the nn.MultiheadAttention LoRA written by "
            f"PEFT {adapter.config['peft_version']}: PEFT <= 0.21.2 applies its out_proj delta "
            "twice (in training and merging alike) and newer releases may apply it once, so the "
            "model it trained is not known",
            "merge it with that PEFT version's merge_and_unload()",
        )


def _lora_op(module: LoraModule, act: TensorAction, adapter: Adapter, mt: Any) -> LoraOp:
    """How one module's LoRA merges into its base tensor: layer kind, orientation, and
    PEFT's rounding order for the variant (see merge/math.py)."""
    w = TensorInfo(act.name, act.dtype, act.shape, 0, Path())
    variant = adapter.variant
    kind = lora_kind(module, w)
    rounding = "delta" if variant.round_delta else "once"
    if module.role == "mha_in":
        rounding = "delta"  # PEFT: in_proj_weight + round(Δ)
    elif module.role == "mha_out":
        rounding = "mha_out"
    ffo = False
    if kind == "linear":
        a, b = factor_infos(module, adapter)
        ffo = bool(fan_in_fan_out(module, w, a, b, adapter, mt))
    block = variant.block_factor(module.path)
    nblocks = variant.bd_nblocks if block else 0
    return LoraOp(module, kind, ffo, rounding=rounding, block=block, nblocks=nblocks)


def layout_shards(
    base: TensorSource,
    actions: dict[str, TensorAction],
    embed: str | None,
    out_dtype: str | None,
    max_shard_size: int | None,
) -> list[ShardOut]:
    """Same shard files as the base by default; re-planned with ``--max-shard-size``."""

    def make(name: str) -> TensorAction:
        act = actions.get(name)
        if act is None:
            info = base.info(name)
            act = TensorAction(name, info.dtype, info.shape, base=name)
        if out_dtype and act.dtype in FLOAT_DTYPES:
            act.dtype = out_dtype
        return act

    extra = [n for n in actions if n not in base]  # an untied lm_head
    groups: list[tuple[Path, list[TensorAction]]] = []
    for f, infos in base.by_file().items():
        acts = [make(i.name) for i in infos]
        for n in extra:
            if embed and any(i.name == embed for i in infos):
                acts.append(make(n))
        groups.append((f, acts))
    if max_shard_size is not None:
        flat = {a.name: a for _, acts in groups for a in acts}
        planned = plan_shards(((a.name, a.dtype, a.shape) for a in flat.values()), max_shard_size)
        return [
            ShardOut(p.filename, [flat[n] for n, _, _ in p.specs], {"format": "pt"})
            for p in planned
        ]
    out = []
    total = len(groups)
    for i, (f, acts) in enumerate(groups, 1):
        meta = dict(base.file_metadata.get(f) or {})
        meta["format"] = "pt"
        out.append(ShardOut(_output_name(f, i, total), acts, meta))
    return out


def _output_name(path: Path, i: int, total: int) -> str:
    if path.suffix == ".safetensors":
        return path.name
    if total == 1:
        return "model.safetensors"
    return f"model-{i:05d}-of-{total:05d}.safetensors"


def shard_plans(plan: MergePlan) -> list[ShardPlan]:
    return [
        ShardPlan(s.filename, [(a.name, a.dtype, a.shape) for a in s.actions], s.metadata)
        for s in plan.shards
    ]
