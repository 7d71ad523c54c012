"""``target_parameters`` LoRAs (MoE expert tensors): which base tensors they land in.

PEFT wraps ``nn.Parameter``s such as ``experts.gate_up_proj`` (E, 2I, H) and
``experts.down_proj`` (E, H, I). The saved keys name the owning module, not the
parameter (``…experts.lora_A.weight`` is the last-registered parameter,
``…experts.base_layer.lora_A.weight`` the one before), so the parameter is told
apart by shapes, with registration order as the fallback. transformers v5 fuses
experts only in memory and writes them per expert on disk
(``experts.{e}.w1/w3/w2``, ``experts.{e}.gate_proj/up_proj/down_proj``, or Nemotron-H's
gateless ``experts.{e}.up_proj/down_proj`` under ``backbone.``, found through transformers'
own renamings), so a fused delta is split per expert (and gate/up halves) into those tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lora_cli.adapters.peft import Adapter, LoraModule, module_scale
from lora_cli.io.reader import TensorSource

# Per-expert on-disk names: (fused parameter → [(leaf, row half)]) per naming scheme.
SPLIT_SCHEMES = [
    {
        "gate_up_proj": [("gate_proj", 0), ("up_proj", 1)],
        "up_proj": [("up_proj", None)],  # experts without a gate (Nemotron-H)
        "down_proj": [("down_proj", None)],
    },
    {"gate_up_proj": [("w1", 0), ("w3", 1)], "down_proj": [("w2", None)]},
]
REGISTRATION_ORDER = ["gate_up_proj", "up_proj", "down_proj"]  # transformers v5 MoE experts


@dataclass
class ExpertOp:
    """One adapter module's contribution to one base tensor."""

    module: LoraModule
    scale: float
    experts: int
    expert: int | None = None  # None: the whole fused tensor
    rows: tuple[int, int] | None = None
    layout: str | None = None


@dataclass
class ExpertParam:
    """A fused expert parameter of the base, stored fused or as per-expert pieces on disk."""

    leaf: str
    shape: tuple[int, ...]  # the (possibly virtual) fused shape
    pieces: list[tuple[str, int | None, tuple[int, int] | None]]  # (tensor, expert, rows)


def owner_of(path: str) -> tuple[str, int]:
    depth = 0
    while path.endswith(".base_layer"):
        path, depth = path[: -len(".base_layer")], depth + 1
    return path, depth


def _disk_experts(owner: str, leaf: str, base: TensorSource | _RenamedNames) -> ExpertParam | None:
    prefixes = [owner, owner.replace(".mlp.experts", ".block_sparse_moe.experts")]
    for prefix in prefixes:
        for scheme in SPLIT_SCHEMES:
            parts = scheme.get(leaf)
            if not parts or f"{prefix}.0.{parts[0][0]}.weight" not in base:
                continue
            experts = 0
            while all(f"{prefix}.{experts}.{p}.weight" in base for p, _ in parts):
                experts += 1
            first = base.info(f"{prefix}.0.{parts[0][0]}.weight").shape
            if len(first) != 2:
                continue
            rows = first[0]
            pieces = [
                (
                    f"{prefix}.{e}.{p}.weight",
                    e,
                    (half * rows, (half + 1) * rows) if half is not None else None,
                )
                for e in range(experts)
                for p, half in parts
            ]
            return ExpertParam(leaf, (experts, rows * len(parts), first[1]), pieces)
    return None


def find_expert_param(
    owner: str, leaf: str, base: TensorSource | _RenamedNames
) -> ExpertParam | None:
    """``owner.leaf`` (e.g. ``….mlp.experts`` + ``gate_up_proj``) as ``base`` stores it:
    one fused tensor, or the per-expert tensors transformers v5 writes; None if neither.
    Merge and extract both find experts this way, so they agree on every layout."""
    name = f"{owner}.{leaf}"
    if name in base:
        return ExpertParam(leaf, base.info(name).shape, [(name, None, None)])
    return _disk_experts(owner, leaf, base)


def _fits(param: ExpertParam, a: tuple[int, ...], b: tuple[int, ...]) -> str | None:
    shape = param.shape
    if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
        return None
    experts = shape[0] if len(shape) == 3 else 1
    if a[0] % experts:
        return None
    dims = shape[1:] if len(shape) == 3 else shape
    if dims == (b[0], a[1]):
        return "out_in"
    if dims == (a[1], b[0]) and len(param.pieces) == 1:
        return "in_out"
    return None


class _RenamedNames:
    """The base as transformers' renamings name it (Nemotron-H's ``backbone.`` as ``model.``),
    for finding the tensors a ``target_parameters`` module (named at runtime) lands in;
    ``checkpoint`` takes a found name back to the base's own."""

    def __init__(self, base: TensorSource, config: dict[str, Any] | None) -> None:
        from lora_cli.names.transformers_rules import transformers_rules

        self.base = base
        self.names: dict[str, str] = {}  # renamed → checkpoint name, where they differ
        rules = transformers_rules(config, len(base.names())) if config else None
        if rules is not None:
            for name in base.names():
                renamed = rules.renamed(name)
                if renamed != name and renamed not in base:
                    self.names[renamed] = name

    def checkpoint(self, name: str) -> str:
        return self.names.get(name, name)

    def __contains__(self, name: str) -> bool:
        return name in self.base or name in self.names

    def info(self, name: str) -> Any:
        return self.base.info(self.checkpoint(name))


def _targeted_leaves(owner: str, entries: list[str]) -> list[str]:
    """Parameter names of module ``owner`` that ``target_parameters`` entries select."""
    leaves = []
    for entry in entries:
        leaf = entry.rsplit(".", 1)[-1]
        if f"{owner}.{leaf}" == entry or f"{owner}.{leaf}".endswith("." + entry):
            leaves.append(leaf)
    return leaves


def plan_parameters(
    adapter: Adapter, base: TensorSource, config: dict[str, Any] | None
) -> tuple[dict[str, list[ExpertOp]], set[str], list[str]]:
    """Ops per base tensor, the adapter modules consumed, and problems found."""
    entries = adapter.config.get("target_parameters") or []
    if not entries:
        return {}, set(), []
    model_type = (config or {}).get("model_type")
    renamed = _RenamedNames(base, config)
    groups: dict[str, list[tuple[int, LoraModule]]] = {}
    for path, module in adapter.modules.items():
        owner, depth = owner_of(path)
        # a 2-D parameter target (``lin.weight``) has a ``.weight`` like a Linear target:
        # only the config tells them apart, and PEFT rounds them differently
        if "lora_A.weight" in module.parts and (
            depth or f"{owner}.weight" not in renamed or _targeted_leaves(owner, entries)
        ):
            groups.setdefault(owner, []).append((depth, module))
    ops: dict[str, list[ExpertOp]] = {}
    used: set[str] = set()
    problems: list[str] = []
    for owner, modules in groups.items():
        leaves = _targeted_leaves(owner, entries)
        params = [p for p in (find_expert_param(owner, leaf, renamed) for leaf in leaves) if p]
        params.sort(
            key=lambda p: REGISTRATION_ORDER.index(p.leaf) if p.leaf in REGISTRATION_ORDER else 99
        )
        for depth, module in modules:
            a = adapter.source.info(module.parts["lora_A.weight"]).shape
            b = (
                adapter.source.info(module.parts.get("lora_B.weight", "")).shape
                if "lora_B.weight" in module.parts
                else ()
            )
            fitting = [p for p in params if _fits(p, a, b)]
            if len(fitting) > 1 and len(params) > depth:
                by_order = params[len(params) - 1 - depth]
                fitting = [by_order] if by_order in fitting else fitting
            if len(fitting) != 1:
                problems.append(
                    f"{module.parts['lora_A.weight']}: no target parameter of {owner} fits "
                    f"A {list(a)} / B {list(b)}"
                )
                continue
            param = fitting[0]
            layout = _fits(param, a, b)
            if (
                model_type == "gpt_oss"
                and len(param.pieces) == 1
                and param.shape[1] == param.shape[2]
            ):
                layout = "in_out"
            r, _, scale = module_scale(adapter.config, f"{owner}.{param.leaf}", adapter.patterns)
            experts = param.shape[0] if len(param.shape) == 3 else 1
            if a[0] != r * experts:
                problems.append(
                    f"{module.parts['lora_A.weight']}: {a[0]} rows but rank {r} × {experts} experts"
                )
                continue
            used.add(module.path)
            for tensor, expert, rows in param.pieces:
                ops.setdefault(renamed.checkpoint(tensor), []).append(
                    ExpertOp(module, scale, experts, expert, rows, layout)
                )
    return ops, used, problems
