"""Merging into a quantized base (FP8 block, compressed-tensors INT4/FP8, MXFP4).

The plan is built twice from headers: once on a view where every quantized weight looks
like its bf16 self, to learn which ones the adapter touches (name resolution and expert
splitting then need no quantization knowledge), and once on a view where only those are
dequantized. Untouched tensors, quantized or not, are then plain copies of their bytes.

A touched weight is written as bf16 by default (its scales and packing tensors dropped,
``quantization_config`` updated; the other experts of a touched expert module too, since
loaders fuse them into one module that is quantized or not as a whole), or with
``--quantize keep`` re-encoded into the base's own format by ``QuantGroup``: the merged
bf16 value is computed once, encoded, and its parts (weight, scale, …) handed to the writer
one by one. Re-quantizing can erase a small
delta, so each group records the cosine between the intended change (merged − base) and
the change that survives (decode(encode(merged)) − base).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from lora_cli.adapters.expert_factors import expand_expert_factors
from lora_cli.adapters.peft import Adapter
from lora_cli.errors import MergeError, UsageError
from lora_cli.io.quantized import DequantizedSource, QuantizedTensor, QuantScheme, detect
from lora_cli.io.reader import TensorSource
from lora_cli.merge.plan import MergePlan, TensorAction, build_plan, load_base_config

if TYPE_CHECKING:
    import torch

QUANTIZE_MODES = ("bf16", "keep")
# Below this cosine between intended and re-quantized change, --quantize keep warns: the
# format's step swamps the delta (docs/quantized-bases.md §5: FP8 reaches ~0.9 only when
# ‖Δ‖ is ~5 % of ‖W‖; 4-bit formats usually fall far below).
COSINE_WARN = 0.9


def plan_merge(
    base: TensorSource,
    adapter: Adapter,
    *,
    out_dtype: str | None = None,
    max_shard_size: int | None = None,
    quantize: str = "bf16",
) -> MergePlan:
    """``build_plan``, aware of quantized bases (a plain base gets exactly ``build_plan``)."""
    if quantize not in QUANTIZE_MODES:
        raise UsageError(f"unknown --quantize {quantize!r}", "use bf16 or keep")
    expand_expert_factors(adapter, base)  # Tinker's 3-D expert factors → per-expert modules
    scheme = detect(base, load_base_config(base))
    if scheme.whole is not None:
        fmt, key = scheme.whole
        raise MergeError(
            f"{base.root}: {fmt}-serialized base ({key}) cannot be merged into",
            "merge into the original bf16/fp16 checkpoint instead",
        )
    if not scheme.tensors and not scheme.unsupported:
        return build_plan(base, adapter, out_dtype=out_dtype, max_shard_size=max_shard_size)
    if out_dtype is not None:
        raise UsageError(
            "--dtype does not apply to a quantized base",
            "merged weights are written as bf16, or re-quantized with --quantize keep",
        )
    everything = DequantizedSource(base, scheme, set(scheme.tensors))
    try:
        first = build_plan(everything, adapter, max_shard_size=max_shard_size)
    except MergeError:
        _refuse_unsupported(scheme, adapter)
        raise
    touched = {a.name for a in first.actions() if a.kind != "copy" and a.name in scheme.tensors}
    _refuse_unsupported(scheme, adapter)
    if quantize == "bf16":
        touched |= _same_module(scheme, touched)
    view = DequantizedSource(base, scheme, touched)
    plan = build_plan(view, adapter, max_shard_size=max_shard_size)
    if quantize == "keep":
        _requantize_actions(plan, view)
    else:
        plan.config_updates.update(_config_update(plan, scheme, touched))
    return plan


def refuse_quantized_base(base: TensorSource, what: str) -> None:
    """Paths that only know plain bases (several adapters at once) refuse a quantized one."""
    scheme = detect(base, load_base_config(base))
    if scheme.tensors or scheme.unsupported or scheme.whole:
        raise MergeError(
            f"{base.root}: quantized base ({scheme.method or 'quantized tensors'}): {what} "
            "into a quantized base is not supported",
            "merge the adapters one at a time, or into the bf16 checkpoint",
        )


def expert_unit(name: str) -> str | None:
    """The expert module a weight loads into: transformers v5 fuses ``experts.{e}.*`` (and
    gpt-oss ``experts.gate_up_proj``/``down_proj``) into one ``…experts`` module, which is
    quantized or not as a whole."""
    parts = name.split(".")
    return ".".join(parts[: parts.index("experts") + 1]) if "experts" in parts[:-1] else None


def _same_module(scheme: QuantScheme, touched: set[str]) -> set[str]:
    """Quantized weights that must be written as bf16 along with the touched ones: every
    tensor of a touched expert module (a half-quantized fused module would not load)."""
    units = {u for u in map(expert_unit, touched) if u}
    return {n for n in scheme.tensors if expert_unit(n) in units}


def _refuse_unsupported(scheme: QuantScheme, adapter: Adapter) -> None:
    for path in adapter.modules:
        for module, (fmt, key) in scheme.unsupported.items():
            if module == path or module.endswith("." + path) or path.endswith("." + module):
                raise MergeError(
                    f"{key}: the adapter changes {module}, stored as {fmt}, which lora cannot "
                    "decode yet",
                    "merge into a bf16, FP8-block, compressed-tensors INT4/FP8 or MXFP4 base",
                )


def _config_update(plan: MergePlan, scheme: QuantScheme, touched: set[str]) -> dict[str, Any]:
    """``quantization_config`` after writing the touched weights as bf16: gone when nothing
    quantized remains, else the merged modules join its skip-list (so loaders keep them as
    plain Linear/experts)."""
    config = plan.config or {}
    qc = config.get("quantization_config")
    if not isinstance(qc, dict) or not touched:
        return {}
    if set(scheme.tensors) <= touched and not scheme.unsupported:
        return {"quantization_config": None}
    modules = {scheme.tensors[n].module for n in touched}
    modules = sorted(modules | {u for u in map(expert_unit, touched) if u})
    qc = dict(qc)
    if qc.get("quant_method") == "compressed-tensors":
        key = "ignore"
    elif "ignored_layers" in qc and "modules_to_not_convert" not in qc:
        key = "ignored_layers"
    else:
        key = "modules_to_not_convert"
    qc[key] = list(qc.get(key) or []) + [m for m in modules if m not in (qc.get(key) or [])]
    return {"quantization_config": qc}


@dataclass
class QuantGroup:
    """One re-quantized weight: computed once, handed out part by part."""

    tensor: QuantizedTensor
    merge: TensorAction  # the bf16 merge of the dequantized weight
    source: DequantizedSource
    cosine: float | None = None
    _parts: dict[str, torch.Tensor] = field(default_factory=dict)
    _done: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, role: str, compute: Callable[[TensorAction], torch.Tensor]) -> torch.Tensor:
        with self._lock:
            if not self._done:
                merged = compute(self.merge)
                base = self.source.read(self.tensor.name)
                self._parts = self.tensor.encode(merged, self.source.raw)
                self.cosine = _change_cosine(self, merged, base)
                self._done = True
            return self._parts.pop(role)

    def report(self) -> dict[str, Any]:
        return {
            "tensor": self.tensor.name,
            "scheme": self.tensor.scheme,
            "parts": sorted(self.tensor.parts.values()),
            "cosine": None if self.cosine is None else round(self.cosine, 6),
        }


def _change_cosine(group: QuantGroup, merged: torch.Tensor, base: torch.Tensor) -> float:

    raw = group.source.raw
    qt = group.tensor

    class Parts:  # decode the fresh parts through the same codec as the base
        def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
            role = next(r for r, n in qt.parts.items() if n == name)
            t = group._parts[role] if role in group._parts else raw.read(name)
            return t[rows[0] : rows[1]] if rows else t

    achieved = qt.decode(Parts()).float() - base.float()  # type: ignore[arg-type]
    intended = merged.float() - base.float()
    norm = intended.norm() * achieved.norm()
    if intended.norm() == 0:
        return 1.0
    return float((intended * achieved).sum() / norm) if norm > 0 else 0.0


@dataclass
class QuantPart:
    """On a ``TensorAction``: this output tensor is part ``role`` of a re-quantized group."""

    group: QuantGroup
    role: str

    def take(self, compute: Callable[[TensorAction], torch.Tensor]) -> torch.Tensor:
        return self.group.take(self.role, compute)


def _requantize_actions(plan: MergePlan, view: DequantizedSource) -> None:
    """Replace each merged quantized weight by its parts, in the weight's shard."""
    groups = []
    for shard in plan.shards:
        actions = []
        for act in shard.actions:
            qt = view.exposed.get(act.name)
            if qt is None:
                actions.append(act)
                continue
            problem = qt.requant_problem(view.raw)
            if problem:
                raise MergeError(
                    f"{qt.primary}: --quantize keep cannot re-quantize {problem} yet",
                    "merge without --quantize keep (writes bf16)",
                )
            group = QuantGroup(qt, replace(act), view)
            groups.append(group)
            for role, raw_name in qt.parts.items():
                info = view.raw.info(raw_name)
                part = TensorAction(raw_name, info.dtype, info.shape, base=None)
                if role == "weight":  # keeps the merge ops so the plan counts it as merged
                    part = replace(act, name=raw_name, dtype=info.dtype, shape=info.shape)
                part.quant = QuantPart(group, role)
                actions.append(part)
        shard.actions = actions
    plan.quantized = groups


def fidelity(plan: MergePlan) -> tuple[list[dict[str, Any]], list[str]]:
    """Per re-quantized tensor: the change's cosine; and warnings for those below the bound."""
    reports = [g.report() for g in getattr(plan, "quantized", [])]
    warnings = [
        f"{r['tensor']}: re-quantized as {r['scheme']}, the merged change survives with cosine "
        f"{r['cosine']:.3f} (< {COSINE_WARN}); write bf16 (the default) to keep it"
        for r in reports
        if r["cosine"] is not None and r["cosine"] < COSINE_WARN
    ]
    return reports, warnings


def quantize_mode_of(base: TensorSource, merged: dict[str, Any]) -> str:
    """How a merged folder was written (for ``validate``): ``bf16`` when some quantized
    weight of the base appears there as a bf16 tensor, else ``keep`` (when nothing
    quantized was touched the two modes write the same thing)."""
    scheme = detect(base, load_base_config(base))
    for qt in scheme.tensors.values():
        info = merged.get(qt.name)
        if info is not None and info.dtype == "BF16":
            return "bf16"
    return "keep" if scheme.tensors else "bf16"
