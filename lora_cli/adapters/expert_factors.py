"""Tinker-style 3-D MoE expert factors as ordinary per-expert LoRA modules.

Tinker (tinker-cookbook ``weights/``) saves routed-expert LoRAs as one module per projection,
``…mlp.experts.w1|w2|w3.lora_A.weight`` of shape ``(E or 1, r, in)`` and ``lora_B``
``(E or 1, out, r)``: a leading dimension of 1 is a factor shared by every expert (Kimi's
layout shares A for gate/up and B for down). On disk the base holds one tensor per expert,
``experts.{e}.gate_proj|up_proj|down_proj.weight`` (``w1→gate_proj``, ``w3→up_proj``,
``w2→down_proj``, kept as ``w1/w2/w3`` when the base uses those names). Expanding the
factors into per-expert 2-D modules lets the planner and the merge math treat them like
any per-expert PEFT LoRA: ``W_e + s·B_e@A_e`` with one rounding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lora_cli.adapters.peft import Adapter, LoraModule
from lora_cli.errors import FormatError
from lora_cli.io.reader import TensorInfo, TensorSource

if TYPE_CHECKING:
    import torch

RENAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


class ExpertFactorSource(TensorSource):
    """The adapter's tensors plus virtual 2-D slices ``key@e`` of its 3-D factors."""

    def __init__(self, raw: TensorSource, slices: dict[str, tuple[str, int]]) -> None:
        self.raw = raw
        self.slices = slices
        infos = dict(raw.infos)
        for name, (key, _) in slices.items():
            info = raw.info(key)
            nbytes = info.nbytes // info.shape[0]
            infos[name] = TensorInfo(name, info.dtype, info.shape[1:], nbytes, info.file)
        super().__init__(raw.root, raw.format, raw.files, infos, index_path=raw.index_path)

    def read(
        self,
        name: str,
        *,
        pin: bool = False,
        out: torch.Tensor | None = None,
        rows: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        if name not in self.slices:
            return self.raw.read(name, pin=pin, out=out, rows=rows)
        key, index = self.slices[name]
        value = self.raw.read(key, rows=(index, index + 1))[0]
        return value[rows[0] : rows[1]].contiguous() if rows else value.contiguous()

    def fd(self, path: Any) -> int:
        return self.raw.fd(path)

    def close(self) -> None:
        self.raw.close()


def expand_expert_factors(adapter: Adapter, base: TensorSource) -> None:
    """Replace every module with 3-D factors by per-expert modules (in place)."""
    src = adapter.source
    modules_in_base = {n.rsplit(".", 1)[0] for n in base.names()}
    slices: dict[str, tuple[str, int]] = {}
    for path, module in list(adapter.modules.items()):
        a_key, b_key = module.parts.get("lora_A.weight"), module.parts.get("lora_B.weight")
        if not a_key or not b_key:
            continue
        a, b = src.info(a_key).shape, src.info(b_key).shape
        owner, leaf = path.rsplit(".", 1) if "." in path else ("", path)
        if len(a) != 3 or len(b) != 3 or not owner.endswith("experts"):
            continue  # (3-D factors elsewhere are Conv1d LoRAs)
        experts = max(a[0], b[0])
        if a[0] not in (1, experts) or b[0] not in (1, experts) or a[1] != b[2]:
            raise FormatError(
                f"{a_key}: 3-D expert factors A {list(a)} / B {list(b)} do not pair up",
                "expected A (E or 1, r, in) and B (E or 1, out, r)",
            )
        if f"{owner}.0.{leaf}" not in modules_in_base:
            leaf = RENAMES.get(leaf, leaf)
        del adapter.modules[path]
        for e in range(experts):
            parts = {}
            for part, key, shape in (("lora_A.weight", a_key, a), ("lora_B.weight", b_key, b)):
                virtual = f"{key}@{e if shape[0] > 1 else 0}"
                slices[virtual] = (key, e if shape[0] > 1 else 0)
                parts[part] = virtual
            name = f"{owner}.{e}.{leaf}"
            adapter.modules[name] = LoraModule(name, parts, module.r, module.alpha, module.scale)
    if slices:
        adapter.source = ExpertFactorSource(src, slices)
