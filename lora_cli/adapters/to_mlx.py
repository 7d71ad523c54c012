"""``convert --to mlx``: a canonical Adapter → an mlx-lm adapter folder.

mlx-lm has one rank and one ``scale`` for the whole adapter and wraps the same module
keys in each of the last ``num_layers`` blocks. Per-module ranks are zero-padded to the
largest (exact: zero rows of A meet zero columns of B), a module's own scale is folded
into its ``lora_b`` (as ``s_module / scale``, in fp32), and factors are transposed to
mlx's ``lora_a (in, r)`` / ``lora_b (r, out)``. Modules the adapter lacks inside the
wrapped blocks load with mlx's zero ``lora_b``, so they add nothing. What mlx cannot
express is refused with the reason.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

from lora_cli.adapters.export import Exported, Progress, common_checks, refuse, write_safetensors
from lora_cli.adapters.mlx import layer_index
from lora_cli.adapters.peft import Adapter
from lora_cli.io.layout import read_json, write_json
from lora_cli.io.reader import TensorSource
from lora_cli.sources.view import Derived, plain

_BLOCK_RE = re.compile(r"^(.*?\blayers\.\d+)\.(.+)$")


def _problems(adapter: Adapter, base: TensorSource | None) -> list[str]:
    out = []
    if adapter.replacements:
        out.append(
            f"full tensors ({next(iter(adapter.replacements))}: modules_to_save or a resized "
            "vocabulary) have no mlx-lm LoRA form"
        )
    if adapter.token_rows:
        out.append("trainable tokens have no mlx-lm form")
    if adapter.config.get("target_parameters") and base is None:
        out.append("target_parameters (MoE expert) LoRAs need --base to find their experts")
    for m in adapter.modules.values():
        if "lora_B.bias" in m.parts:
            out.append(f"{m.path}: lora_bias has no mlx-lm form")
        elif m.is_embedding and m.has_dora:
            out.append(f"{m.path}: embedding DoRA (mlx-lm normalises per token row, PEFT per dim)")
        elif (
            len(
                adapter.source.info(
                    m.parts.get("lora_A.weight") or m.parts["lora_embedding_A"]
                ).shape
            )
            != 2
        ):
            out.append(f"{m.path}: convolution LoRA has no mlx-lm form")
        elif m.has_dora and ".experts." in m.path:
            out.append(f"{m.path}: MoE DoRA (mlx-lm SwitchLinear has no DoRA)")
    if adapter.config.get("fan_in_fan_out"):
        out.append("fan_in_fan_out (GPT-2 Conv1D) LoRAs are not supported for mlx-lm")
    if len({m.has_dora for m in adapter.modules.values()}) > 1:
        out.append("a mix of DoRA and plain LoRA modules (mlx-lm has one fine_tune_type)")
    return out


MLX_EXPERT_LEAVES = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
_EXPERT_RE = re.compile(r"^(.*)\.experts\.(\d+)\.(\w+)\.weight$")


def _module_names(
    adapter: Adapter, base: TensorSource | None
) -> tuple[dict[str, str], dict[str, tuple[Any, tuple[int, int] | None]]]:
    """(adapter module path → the base's (mlx's) module path, mlx SwitchLinear path →
    (the ``target_parameters`` expert op feeding it, its rows of the fused B))."""
    if base is None:
        return {p: p for p in adapter.modules}, {}
    from lora_cli.merge.plan import build_plan

    plan = build_plan(base, adapter)  # the merge preflight: every target must fit
    names = {}
    switches: dict[str, tuple[Any, tuple[int, int] | None]] = {}
    for act in plan.actions():
        for op in act.loras:
            names[op.module.path] = act.name.rsplit(".", 1)[0]
        for ex in act.experts:
            if ex.layout not in (None, "out_in"):
                refuse(adapter, "mlx-lm", [f"{act.name}: (E, in, out) expert layout"])
            per_expert = _EXPERT_RE.match(act.name)
            if per_expert:  # one HF tensor per expert (and gate/up half of the fused B)
                prefix, leaf = per_expert.group(1), per_expert.group(3)
                leaf = MLX_EXPERT_LEAVES.get(leaf, leaf)
                switches[f"{prefix}.switch_mlp.{leaf}"] = (ex, ex.rows)
            elif act.name.endswith(".gate_up_proj"):  # fused on disk: halves of its rows
                prefix = act.name[: -len(".experts.gate_up_proj")]
                half = act.shape[1] // 2
                switches[f"{prefix}.switch_mlp.gate_proj"] = (ex, (0, half))
                switches[f"{prefix}.switch_mlp.up_proj"] = (ex, (half, 2 * half))
            else:
                prefix, leaf = act.name.rsplit(".experts.", 1)
                switches[f"{prefix}.switch_mlp.{leaf}"] = (ex, None)
    return names, switches


def _num_blocks(adapter: Adapter, base: TensorSource | None) -> int | None:
    config = None
    if base is not None and (base.root / "config.json").is_file():
        config = read_json(base.root / "config.json", "model config")
    else:
        hint = adapter.config.get("base_model_name_or_path")
        if isinstance(hint, str) and (Path(hint) / "config.json").is_file():
            config = read_json(Path(hint) / "config.json", "model config")
    if not config:
        return None
    config = config.get("text_config") or config
    n = config.get("num_hidden_layers") or config.get("n_layer")
    return int(n) if n else None


def write_mlx(
    adapter: Adapter, base: TensorSource | None, out: Path, progress: Progress | None
) -> Exported:
    common_checks(adapter, "mlx-lm")
    refuse(adapter, "mlx-lm", _problems(adapter, base))
    names, switches = _module_names(adapter, base)
    modules = sorted(
        (m for m in adapter.modules.values() if m.path in names), key=lambda m: names[m.path]
    )
    ex_ranks = [ex.module.r // ex.experts for ex, _ in switches.values()]
    rank = max([m.r for m in modules] + ex_ranks)
    scales = [m.scale for m in modules] + [ex.scale for ex, _ in switches.values()]
    scale = Counter(scales).most_common(1)[0][0]
    recipes: list[Derived] = []
    keys: set[str] = set()
    layers: set[int] = set()
    src = adapter.source
    for m in modules:
        path = names[m.path]
        block = _BLOCK_RE.match(path)
        if block:
            keys.add(block.group(2))
            layers.add(int(layer_index(path) or 0))
        else:
            keys.add(path)
        a_key = m.parts.get("lora_A.weight") or m.parts["lora_embedding_A"]
        b_key = m.parts.get("lora_B.weight") or m.parts["lora_embedding_B"]
        a, b = src.info(a_key), src.info(b_key)
        fold = m.scale / scale
        b_dtype = b.dtype if fold == 1.0 else "F32"
        recipes.append(Derived(f"{path}.lora_a", a.dtype, (a.shape[1], rank), _mlx_a(a_key, rank)))
        recipes.append(
            Derived(f"{path}.lora_b", b_dtype, (rank, b.shape[0]), _mlx_b(b_key, rank, fold))
        )
        if m.has_dora:
            mag = src.info(m.parts["lora_magnitude_vector"])
            recipes.append(
                Derived(f"{path}.m", mag.dtype, mag.shape, plain(m.parts["lora_magnitude_vector"]))
            )
    for path, (ex, rows) in sorted(switches.items()):
        keys.add(_BLOCK_RE.match(path).group(2) if _BLOCK_RE.match(path) else path)
        index = layer_index(path)
        if index is not None:
            layers.add(index)
        a_key, b_key = ex.module.parts["lora_A.weight"], ex.module.parts["lora_B.weight"]
        a, b = src.info(a_key), src.info(b_key)
        experts, fold = ex.experts, ex.scale / scale
        out_rows = (rows[1] - rows[0]) if rows else b.shape[0]
        recipes.append(
            Derived(
                f"{path}.lora_a",
                a.dtype,
                (experts, rank, a.shape[1]),
                _switch_a(a_key, experts, rank),
            )
        )
        recipes.append(
            Derived(
                f"{path}.lora_b",
                b.dtype if fold == 1.0 else "F32",
                (experts, out_rows, rank),
                _switch_b(b_key, experts, rank, rows, fold),
            )
        )
    num_layers = -1
    if layers and min(layers) > 0:
        blocks = _num_blocks(adapter, base)
        if blocks is None:
            refuse(
                adapter,
                "mlx-lm",
                [
                    f"the first adapted block is {min(layers)}, and mlx-lm counts num_layers from "
                    "the last block: pass --base BASE so the block count is known"
                ],
            )
        num_layers = blocks - min(layers)
    total = write_safetensors(
        out / "adapters.safetensors", recipes, src.read, {"format": "mlx"}, progress
    )
    config: dict[str, Any] = {
        "fine_tune_type": "dora" if modules[0].has_dora else "lora",
        "num_layers": num_layers,
        "lora_parameters": {"rank": rank, "scale": scale, "dropout": 0.0, "keys": sorted(keys)},
        "model": adapter.config.get("base_model_name_or_path") or adapter.native.get("model"),
    }
    write_json(out / "adapter_config.json", dict(sorted(config.items())))
    notes = [f"mlx rank {rank}, scale {scale:g}, num_layers {num_layers}"]
    folded = sum(1 for m in modules if m.scale != scale)
    padded = sum(1 for m in modules if m.r != rank)
    if folded or padded:
        notes.append(
            f"{padded} modules zero-padded to rank {rank}; "
            f"{folded} scales folded into lora_b (fp32)"
        )
    return Exported([], len(recipes), total, notes)


def _switch_a(key: str, experts: int, rank: int) -> Any:
    """PEFT fused A ``(r·E, in)`` (expert-major) → mlx SwitchLinear ``(E, R, in)``."""

    def compute(read: Any) -> Any:
        import torch

        a = read(key)
        a = a.reshape(experts, -1, a.shape[-1])
        return torch.nn.functional.pad(a, (0, 0, 0, rank - a.shape[1]))

    return compute


def _switch_b(key: str, experts: int, rank: int, rows: Any, factor: float) -> Any:
    """PEFT fused B ``(out, r·E)`` (expert-minor), rows ``rows`` → mlx ``(E, out, R)``."""

    def compute(read: Any) -> Any:
        import torch

        b = read(key)
        b = b.reshape(b.shape[0], -1, experts)
        if rows:
            b = b[rows[0] : rows[1]]
        b = b.permute(2, 0, 1)
        if factor != 1.0:
            b = b.to(torch.float32) * factor
        return torch.nn.functional.pad(b, (0, rank - b.shape[2]))

    return compute


def _mlx_a(key: str, rank: int) -> Any:
    """PEFT A ``(r, in)`` → mlx ``lora_a (in, R)``, zero rows added up to rank R."""

    def compute(read: Any) -> Any:
        import torch

        t = read(key)
        return torch.nn.functional.pad(t, (0, 0, 0, rank - t.shape[0])).T

    return compute


def _mlx_b(key: str, rank: int, factor: float) -> Any:
    """PEFT B ``(out, r)`` → mlx ``lora_b (R, out)`` times ``factor``, zero-padded."""

    def compute(read: Any) -> Any:
        import torch

        t = read(key)
        if factor != 1.0:
            t = t.to(torch.float32) * factor
        return torch.nn.functional.pad(t, (0, rank - t.shape[1])).T

    return compute
