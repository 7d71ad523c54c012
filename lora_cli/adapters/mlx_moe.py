"""mlx-lm MoE ``SwitchLinear`` LoRAs against HF expert tensors.

mlx stacks experts (``<prefix>.switch_mlp.<leaf>``, factors ``(E, r, in)`` /
``(E, out, r)``); HF checkpoints hold them one tensor per expert
(``<prefix>.experts.{e}.<leaf>``, Mixtral ``w1/w2/w3``) or, in transformers v5's
layout, fused (``<prefix>.experts.gate_up_proj`` (E, 2I, H), ``.down_proj`` (E, H, I)).
Per-expert bases get one plain LoRA module per expert (``adapters.mlx``); fused bases
get PEFT's ``target_parameters`` form, which the merge planner already applies.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from lora_cli.adapters.peft import PREFIX, LoraModule

# mlx-lm's sanitize stacks Mixtral's w1/w2/w3 as switch_mlp gate/down/up.
MIXTRAL_LEAVES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


def expert_paths(path: str, experts: int, base_names: Iterable[str] | None) -> list[str]:
    """HF per-expert module paths for the mlx ``<prefix>.switch_mlp.<leaf>`` module."""
    prefix, leaf = path.rsplit(".switch_mlp.", 1)
    candidates = [f"{prefix}.experts.{{e}}.{leaf}"]
    if leaf in MIXTRAL_LEAVES:
        mixtral = f"{prefix}.experts.{{e}}.{MIXTRAL_LEAVES[leaf]}"
        candidates.insert(0 if prefix.endswith("block_sparse_moe") else 1, mixtral)
    chosen = candidates[0]
    if base_names is not None:
        names = list(base_names)
        for cand in candidates:
            first = cand.format(e=0) + ".weight"
            if any(n == first or n.endswith("." + first) for n in names):
                chosen = cand
                break
    return [chosen.format(e=e) for e in range(experts)]


GATE_UP = ("gate_proj", "up_proj")


def fused_switches(
    grouped: dict[str, dict[str, str]], source: Any, base_names: list[str] | None
) -> dict[str, dict[str, str]]:
    """``<prefix>`` → {leaf: mlx module path} for SwitchLinear modules whose base stores
    the experts fused (``<prefix>.experts.gate_up_proj`` (E, 2I, H), ``.down_proj``
    (E, H, I)) rather than one tensor per expert."""
    if base_names is None:
        return {}
    names = set(base_names)

    def present(name: str) -> bool:
        return name in names or any(n.endswith("." + name) for n in names)

    out: dict[str, dict[str, str]] = {}
    for path, parts in grouped.items():
        if ".switch_mlp." not in path or "lora_a" not in parts:
            continue
        if len(source.info(parts["lora_a"]).shape) != 3:
            continue
        prefix, leaf = path.rsplit(".switch_mlp.", 1)
        per_expert = expert_paths(path, 1, base_names)[0]
        if present(per_expert + ".weight"):
            continue
        fused = "gate_up_proj" if leaf in GATE_UP else leaf
        if present(f"{prefix}.experts.{fused}"):
            out.setdefault(prefix, {})[leaf] = path
    return out


def fused_modules(
    prefix: str, leaves: dict[str, str], source: Any, scale: float, add: Any, modules: dict
) -> list[tuple[str, int]]:
    """PEFT ``target_parameters`` modules for one MoE block's fused expert parameters.

    PEFT's layout: ``A (r·E, in)`` expert-major, ``B (out, r·E)`` expert-minor. Gate and
    up LoRAs share the fused ``gate_up_proj`` as one LoRA of rank ``2r`` whose B is
    block-diagonal (gate rows use the first r columns, up rows the last r): exact.
    PEFT names the last-registered parameter's LoRA ``experts.lora_A`` and the one
    before it ``experts.base_layer.lora_A``.
    """
    owner = f"{prefix}.experts"
    params: list[tuple[str, list[str]]] = []
    gate_up = [leaf for leaf in GATE_UP if leaf in leaves]
    if gate_up:
        params.append(("gate_up_proj", gate_up))
    if "down_proj" in leaves:
        params.append(("down_proj", ["down_proj"]))
    out = []
    for depth, (param, parts) in enumerate(reversed(params)):
        path = owner + ".base_layer" * depth
        keys = [(leaf, leaves[leaf]) for leaf in parts]
        a0 = source.info(keys[0][1] + ".lora_a")
        b0 = source.info(keys[0][1] + ".lora_b")
        experts, r, inner = a0.shape
        rows = b0.shape[1]
        out_rows = rows * (2 if param == "gate_up_proj" else 1)
        rank = r * len(keys)
        m = LoraModule(path, r=rank, alpha=scale * rank, scale=scale)
        m.parts["lora_A.weight"] = add(
            f"{PREFIX}{path}.lora_A.weight", a0.dtype, (experts * rank, inner), _fused_a(keys)
        )
        m.parts["lora_B.weight"] = add(
            f"{PREFIX}{path}.lora_B.weight",
            b0.dtype,
            (out_rows, rank * experts),
            _fused_b(keys, param == "gate_up_proj"),
        )
        modules[path] = m
        out.append((f"{owner}.{param}", rank))
    return out


def _fused_a(keys: list[tuple[str, str]]) -> Any:
    def compute(read: Any) -> Any:
        import torch

        a = torch.cat([read(k + ".lora_a") for _, k in keys], dim=1)  # (E, k·r, in)
        return a.reshape(-1, a.shape[-1])

    return compute


def _fused_b(keys: list[tuple[str, str]], gate_up: bool) -> Any:
    def compute(read: Any) -> Any:

        bs = {leaf: read(k + ".lora_b") for leaf, k in keys}  # (E, rows, r) each
        first = next(iter(bs.values()))
        experts, rows, r = first.shape
        k = len(bs)
        halves = GATE_UP if gate_up else tuple(bs)
        full = first.new_zeros(experts, rows * len(halves), r * k)
        for col, leaf in enumerate(bs):
            row = halves.index(leaf)
            full[:, row * rows : (row + 1) * rows, col * r : (col + 1) * r] = bs[leaf]
        return (
            full.reshape(experts, rows * len(halves), r * k)
            .permute(1, 2, 0)
            .reshape(rows * len(halves), r * k * experts)
        )

    return compute


def add_target_parameters(
    config: dict[str, Any], params: list[tuple[str, int]], scale: float, rank: int
) -> None:
    config["target_parameters"] = sorted({".".join(p.split(".")[-3:]) for p, _ in params})
    for path, r in params:
        if r != rank:
            leaf = re.escape(".".join(path.split(".")[-2:]))
            config.setdefault("rank_pattern", {})[leaf] = r
            config.setdefault("alpha_pattern", {})[leaf] = scale * r
