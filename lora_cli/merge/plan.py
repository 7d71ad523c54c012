"""Adapter × checkpoint → one action per output tensor, with every check done up front.

Nothing is written until the whole plan resolves: a target missing from the
base, a shape from another model size or an unknown key stops the merge here,
listing the offenders, so a failed merge never leaves a half-written model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_cli.adapters.peft import Adapter, LoraModule, unmergeable_reasons
from lora_cli.errors import MergeError
from lora_cli.io.dtypes import FLOAT_DTYPES
from lora_cli.io.layout import (
    ShardPlan,
    config_dtype_update,
    plan_shards,
    read_json,
    tie_setting,
)
from lora_cli.io.reader import TensorInfo, TensorSource
from lora_cli.merge.experts import ExpertOp, plan_parameters

# transformers models whose projections are GPT-2 ``Conv1D`` (weight stored (in, out)).
CONV1D_MODEL_TYPES = {"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp"}
CONV1D_LEAVES = {"c_attn", "c_proj", "c_fc", "q_attn"}
OUTPUT_EMBEDDING = "lm_head.weight"
INPUT_EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")

# Ordered name-resolution rules: (label, [(adapter prefix, base prefix), ...]).
# A rule rewrites each name with its first matching pair whose result exists in the base.
RESOLUTION_RULES: list[tuple[str, list[tuple[str, str]]]] = [
    ("identity", []),
    ("strip 'transformer.' (GPT-2 style checkpoint)", [("transformer.", "")]),
    ("add 'transformer.'", [("", "transformer.")]),
    ("strip 'model.' (bare base model)", [("model.", "")]),
    ("add 'model.'", [("", "model.")]),
    (
        "VLM: model. → model.language_model.",
        [("model.language_model.", "model.language_model."), ("model.", "model.language_model.")],
    ),
    (
        "VLM: model.language_model. → model.",
        [("model.language_model.", "model."), ("model.visual.", "visual.")],
    ),
    (
        "VLM: model.language_model. → language_model.model.",
        [
            ("model.language_model.", "language_model.model."),
            ("lm_head.", "language_model.lm_head."),
            ("model.vision_tower.", "vision_tower."),
            ("model.multi_modal_projector.", "multi_modal_projector."),
        ],
    ),
    (
        "VLM: language_model.model. → model.language_model.",
        [
            ("language_model.model.", "model.language_model."),
            ("language_model.lm_head.", "lm_head."),
        ],
    ),
    ("VLM: model. → language_model.model.", [("model.", "language_model.model.")]),
    ("drop doubled 'model.'", [("model.model.", "model.")]),
]


@dataclass
class LoraOp:
    module: LoraModule
    kind: str  # linear | conv | embedding | expert
    fan_in_fan_out: bool = False


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

    def actions(self) -> list[TensorAction]:
        return [a for s in self.shards for a in s.actions]

    def counts(self) -> dict[str, int]:
        out = {"merge": 0, "replace": 0, "rows": 0, "copy": 0}
        for a in self.actions():
            out[a.kind] += 1
        return out


@dataclass
class _Target:
    """A base tensor an adapter entry wants, before name resolution."""

    name: str
    key: str  # adapter key, for error messages
    what: str  # lora | bias | replace | rows


def load_base_config(base: TensorSource) -> dict[str, Any] | None:
    path = base.root / "config.json"
    return read_json(path, "model config") if path.is_file() else None


def _targets(adapter: Adapter, skip: set[str]) -> list[_Target]:
    out = []
    for module in adapter.modules.values():
        if module.path in skip:
            continue
        for part, key in module.parts.items():
            if part == "lora_B.bias":
                out.append(_Target(module.path + ".bias", key, "bias"))
            elif part in ("lora_A.weight", "lora_embedding_A"):
                out.append(_Target(module.path + ".weight", key, "lora"))
    for name, key in adapter.replacements.items():
        out.append(_Target(name, key, "replace"))
    for module, (key, _) in adapter.token_rows.items():
        out.append(_Target(module + ".weight", key, "rows"))
    return out


def _resolve(name: str, rule: list[tuple[str, str]], base: TensorSource, tied_head: bool) -> str:
    if name in base or (tied_head and name == OUTPUT_EMBEDDING):
        return name
    for src, dst in rule:
        if name.startswith(src):
            candidate = dst + name[len(src) :]
            if candidate in base or (tied_head and candidate == OUTPUT_EMBEDDING):
                return candidate
    return name


def _input_embedding(base: TensorSource) -> str | None:
    names = [n for n in base.names() if n.endswith(INPUT_EMBEDDING_SUFFIXES)]
    return names[0] if len(names) == 1 else None


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
    _check_adapter_tensors(adapter)
    config = load_base_config(base)
    tied = bool(tie_setting(config)) and OUTPUT_EMBEDDING not in base
    embed = _input_embedding(base) if tied else None
    tied_head = tied and embed is not None

    model_type = (config or {}).get("model_type")
    expert_ops, expert_modules, expert_problems = plan_parameters(adapter, base, model_type)
    if expert_problems:
        raise MergeError(_problem_message(adapter, expert_problems, base))
    targets = _targets(adapter, expert_modules)
    if not targets and not expert_ops:
        raise MergeError(
            f"{adapter.weights_file}: the adapter holds no LoRA or replacement tensors",
            "an empty adapter (often a DeepSpeed ZeRO-3 save without gathering) merges to "
            "nothing; re-export it",
        )
    best: tuple[int, str, dict[str, str], list[str]] | None = None
    for label, rule in RESOLUTION_RULES:
        mapping = {t.name: _resolve(t.name, rule, base, tied_head) for t in targets}
        problems = _check_targets(targets, mapping, base, adapter, config, tied_head, embed)
        if not problems:
            best = (0, label, mapping, [])
            break
        if best is None or len(problems) < best[0]:
            best = (len(problems), label, mapping, problems)
    assert best is not None
    _, rule_label, mapping, problems = best
    if problems:
        raise MergeError(_problem_message(adapter, problems, base))

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
            act = action_for(mapping[module.path + ".weight"])
            act.loras.append(_lora_op(module, act, adapter, model_type))
        if "lora_B.bias" in module.parts:
            action_for(mapping[module.path + ".bias"]).bias = module
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

    shards = _layout(base, actions, embed, out_dtype, max_shard_size)
    warnings = list(adapter.warnings)
    return MergePlan(
        base=base,
        adapter=adapter,
        shards=shards,
        rule=rule_label,
        config=config,
        config_updates=config_updates,
        untied=untied,
        warnings=warnings,
    )


def _check_adapter_tensors(adapter: Adapter) -> None:
    zero = [k for k, i in adapter.source.infos.items() if i.numel == 0]
    if zero:
        raise MergeError(
            f"{adapter.weights_file}: tensor {zero[0]!r} is empty"
            + (f" (and {len(zero) - 1} more)" if len(zero) > 1 else ""),
            "a DeepSpeed ZeRO-3 placeholder save; re-export the adapter with gathered weights",
        )
    import torch

    for key in adapter.source.names():
        info = adapter.source.info(key)
        if info.dtype not in FLOAT_DTYPES:
            continue
        t = adapter.source.read(key)
        if not bool(torch.isfinite(t.float()).all()):
            bad = int((~torch.isfinite(t.float())).sum())
            raise MergeError(
                f"{adapter.weights_file}: tensor {key!r} has {bad} NaN/Inf values",
                "the training run diverged; use an earlier checkpoint",
            )


def _lora_kind(module: LoraModule, w: TensorInfo) -> str:
    if module.is_embedding:
        return "embedding"
    if len(w.shape) == 3 and module.parts.get("lora_A.weight"):
        return "conv"
    if len(w.shape) in (4, 5):
        return "conv"
    return "linear"


def _fan_in_fan_out(
    module: LoraModule, w: TensorInfo, a: TensorInfo, b: TensorInfo, adapter: Adapter, mt: Any
) -> bool | None:
    """Orientation of a 2-D weight: from the architecture, else from shapes; None = no fit."""
    out_in = (b.shape[0], a.shape[1])
    in_out = (a.shape[1], b.shape[0])
    if mt in CONV1D_MODEL_TYPES:
        ffo = module.path.rsplit(".", 1)[-1] in CONV1D_LEAVES
        return ffo if w.shape == (in_out if ffo else out_in) else None
    if out_in != in_out:
        if w.shape == out_in:
            return False
        return True if w.shape == in_out else None
    return bool(adapter.config.get("fan_in_fan_out", False)) if w.shape == out_in else None


def _lora_op(module: LoraModule, act: TensorAction, adapter: Adapter, mt: Any) -> LoraOp:
    src = adapter.source
    w = TensorInfo(act.name, act.dtype, act.shape, 0, Path())
    a_key = module.parts.get("lora_A.weight") or module.parts["lora_embedding_A"]
    a = src.info(a_key)
    kind = _lora_kind(module, w)
    if kind == "linear":
        b = src.info(module.parts["lora_B.weight"])
        ffo = _fan_in_fan_out(module, w, a, b, adapter, mt)
        return LoraOp(module, kind, bool(ffo))
    return LoraOp(module, kind)


def _check_targets(
    targets: list[_Target],
    mapping: dict[str, str],
    base: TensorSource,
    adapter: Adapter,
    config: dict[str, Any] | None,
    tied_head: bool,
    embed: str | None,
) -> list[str]:
    problems = []
    src = adapter.source
    mt = (config or {}).get("model_type")
    for t in targets:
        name = mapping[t.name]
        if name not in base:
            if tied_head and name == OUTPUT_EMBEDDING and embed:
                w = base.info(embed)
            else:
                problems.append(f"{t.key}: base has no tensor {name!r}")
                continue
        else:
            w = base.info(name)
        if t.what == "replace":
            r = src.info(t.key)
            if r.shape != w.shape and not (
                len(r.shape) == 2
                and len(w.shape) == 2
                and r.shape[1] == w.shape[1]
                and (name.endswith(INPUT_EMBEDDING_SUFFIXES) or name == OUTPUT_EMBEDDING)
            ):
                problems.append(
                    f"{t.key}: shape {list(r.shape)} but base {name} is {list(w.shape)}"
                )
        elif t.what == "rows":
            key, idx = adapter.token_rows[t.name[: -len(".weight")]]
            d = src.info(key)
            if len(w.shape) != 2 or d.shape != (len(idx), w.shape[1]) or max(idx) >= w.shape[0]:
                problems.append(
                    f"{key}: {len(idx)} token rows of shape {list(d.shape)} do not fit "
                    f"{name} {list(w.shape)}"
                )
        elif t.what == "bias":
            module = adapter.modules[t.name[: -len(".bias")]]
            d = src.info(module.parts["lora_B.bias"])
            if d.shape != w.shape:
                problems.append(
                    f"{t.key}: shape {list(d.shape)} but base {name} is {list(w.shape)}"
                )
        else:
            module = adapter.modules[t.name[: -len(".weight")]]
            msg = _check_lora_shapes(module, w, adapter, mt)
            if msg:
                problems.append(f"{t.key}: {msg} (base {name} is {list(w.shape)})")
    return problems


def _check_lora_shapes(module: LoraModule, w: TensorInfo, adapter: Adapter, mt: Any) -> str:
    src = adapter.source
    parts = module.parts
    if module.is_embedding:
        if "lora_embedding_B" not in parts:
            return "lora_embedding_A without lora_embedding_B"
        a, b = src.info(parts["lora_embedding_A"]), src.info(parts["lora_embedding_B"])
        if len(w.shape) != 2 or w.shape != (a.shape[1], b.shape[0]) or a.shape[0] != b.shape[1]:
            return f"embedding LoRA A {list(a.shape)} B {list(b.shape)} does not fit"
        out = w.shape[1]
    else:
        if "lora_B.weight" not in parts:
            return "lora_A without lora_B"
        a, b = src.info(parts["lora_A.weight"]), src.info(parts["lora_B.weight"])
        if a.shape[0] != b.shape[1]:
            return f"lora_A has rank {a.shape[0]} but lora_B has {b.shape[1]}"
        if len(w.shape) >= 3:
            if len(a.shape) != len(w.shape):
                return f"conv LoRA A {list(a.shape)} does not fit"
            if a.shape[1] != w.shape[1]:
                return "grouped convolutions (groups > 1) cannot be merged"
            if b.shape[0] != w.shape[0] or a.shape[2:] != w.shape[2:]:
                return f"conv LoRA A {list(a.shape)} B {list(b.shape)} does not fit"
            out = w.shape[0]
        elif len(w.shape) == 2:
            if _fan_in_fan_out(module, w, a, b, adapter, mt) is None:
                return f"LoRA A {list(a.shape)} B {list(b.shape)} does not fit"
            out = b.shape[0]
        else:
            return "LoRA target is not a matrix or kernel"
    if module.r != a.shape[0]:
        return f"lora_A has {a.shape[0]} rows but adapter_config.json gives rank {module.r}"
    mag = parts.get("lora_magnitude_vector")
    if mag and src.info(mag).numel != out:
        return f"DoRA magnitude has {src.info(mag).numel} values for {out} outputs"
    return ""


def _problem_message(adapter: Adapter, problems: list[str], base: TensorSource) -> str:
    shown = "; ".join(problems[:3])
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    missing = sum("base has no tensor" in p for p in problems)
    if missing == len(problems):
        cause = (
            "likely cause: the adapter was trained on a different model or layer count "
            f"than {base.root}"
        )
    elif missing == 0:
        cause = "likely cause: the adapter was trained for a different model size"
    else:
        cause = "likely cause: the adapter does not belong to this base model"
    return (
        f"{adapter.root}: {len(problems)} adapter tensors do not fit the base: "
        f"{shown}{more}; {cause}"
    )


def _layout(
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
