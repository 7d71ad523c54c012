"""Merging into a quantized base (FP8 block, compressed-tensors INT4/FP8, MXFP4).

The plan is built twice from headers: once on a view where every quantized weight looks
like its bf16 self, to learn which ones the adapter touches (name resolution and expert
splitting then need no quantization knowledge), and once on a view where only those are
dequantized. Untouched tensors, quantized or not, are then plain copies of their bytes.

A touched weight is written as bf16 by default (its scales and packing tensors dropped,
``quantization_config`` updated; the other experts of a touched expert module too, since
loaders fuse them into one module that is quantized or not as a whole), or with
``--quantize keep`` re-encoded into the base's own format (``merge/requant.py``: row block
by row block where the format allows, with the fidelity of the change measured).
"""

from __future__ import annotations

from typing import Any

from lora_cli.adapters.expert_factors import expand_expert_factors
from lora_cli.adapters.peft import Adapter
from lora_cli.errors import MergeError, UsageError
from lora_cli.io.reader import TensorSource
from lora_cli.merge.plan import MergePlan, build_plan, load_base_config
from lora_cli.merge.requant import fidelity, requantize_actions
from lora_cli.sources.quantized import DequantizedSource, QuantScheme, detect

__all__ = [
    "fidelity",
    "is_quantized_base",
    "plan_merge",
    "quantize_mode_of",
    "refuse_quantized_base",
]

QUANTIZE_MODES = ("bf16", "keep")


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
        requantize_actions(plan, view)
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


def is_quantized_base(base: TensorSource) -> bool:
    """Whether ``base`` holds quantized weights (headers only)."""
    scheme = detect(base, load_base_config(base), values=False)
    return bool(scheme.tensors or scheme.unsupported or scheme.whole)


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
