"""What the extracted adapter holds, as PEFT loads it, and writing it through the one writer.

PEFT 0.21.2 loads, unmodified: LoRA factors under saved-form names
(``base_model.model.<module>.lora_A.weight`` …, ``lora_embedding_A/B`` for embeddings), an
explicit ``target_modules`` list, ``lora_alpha = r`` per module (scale 1: no rsLoRA
ambiguity), ``rank_pattern``/``alpha_pattern`` for modules whose rank differs from ``r``
(fully qualified, escaped keys: PEFT's ``re.match(rf"(.*\\.)?({key})$", name)``), a changed
bias of a LoRA target as ``<module>.base_layer.bias`` (``bias="lora_only"``), fused MoE
expert parameters as ``target_parameters`` (``extract/experts.py``), and any other changed
module whole, under ``modules_to_save``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_cli.extract.experts import saved_modules
from lora_cli.extract.walk import Extracted, WalkResult
from lora_cli.io.adapter_files import CONFIG_NAME
from lora_cli.io.dtypes import from_torch
from lora_cli.io.layout import write_manifest
from lora_cli.io.reader import TensorSource
from lora_cli.io.writer import OutputDir, ShardWriter, write_small_file
from lora_cli.merge.card import CARD_NAME

PREFIX = "base_model.model."
WEIGHTS_NAME = "adapter_model.safetensors"


@dataclass
class AdapterLayout:
    lora: dict[str, Extracted]  # module → factors written as LoRA
    full_modules: list[str] = field(default_factory=list)  # modules_to_save
    full_tensors: list[str] = field(default_factory=list)  # TUNED tensors written whole
    lora_biases: list[str] = field(default_factory=list)  # TUNED biases of LoRA targets
    dropped: list[str] = field(default_factory=list)  # changed, not shipped

    @property
    def r(self) -> int:
        ranks = Counter(e.factors.rank for e in self.lora.values())
        return max(ranks.items(), key=lambda kv: (kv[1], kv[0]))[0] if ranks else 0

    def rank_pattern(self) -> dict[str, int]:
        r = self.r
        return {
            re.escape(m): e.factors.rank
            for m, e in sorted(self.lora.items())
            if e.factors.rank != r
        }


def layout(walk: WalkResult, tuned: TensorSource, include_full: bool) -> AdapterLayout:
    """Decide how each changed tensor ships; a module with a changed non-bias parameter is
    shipped whole (PEFT excludes a ``modules_to_save`` module from LoRA)."""
    out = AdapterLayout(dict(walk.extracted))
    modules: set[str] = set()
    for c in walk.changed_full:
        if not include_full or not c.module:
            out.dropped.append(c.tuned)
        elif c.leaf == "bias" and c.module in out.lora:
            out.lora_biases.append(c.tuned)
        else:
            modules.add(c.module)

    def inside(name: str) -> bool:  # PEFT wraps a modules_to_save module with its children
        return any(name == m or name.startswith(m + ".") for m in modules)

    out.lora = {m: e for m, e in out.lora.items() if not inside(m)}
    out.lora_biases = [b for b in out.lora_biases if not inside(b.rpartition(".")[0])]
    out.full_modules = sorted(modules)
    out.full_tensors = [n for n in tuned.names() if inside(n.rpartition(".")[0])]
    return out


def _keys(e: Extracted, saved: dict[str, str]) -> tuple[str, str]:
    if e.kind == "embedding":
        return f"{PREFIX}{e.module}.lora_embedding_A", f"{PREFIX}{e.module}.lora_embedding_B"
    module = saved.get(e.module, e.module)
    return f"{PREFIX}{module}.lora_A.weight", f"{PREFIX}{module}.lora_B.weight"


def _saved(plan: AdapterLayout) -> dict[str, str]:
    return saved_modules([e.param for e in plan.lora.values() if e.param is not None])


def tensor_specs(plan: AdapterLayout, tuned: TensorSource) -> list[tuple[str, str, tuple]]:
    specs: list[tuple[str, str, tuple]] = []
    saved = _saved(plan)
    for _, e in sorted(plan.lora.items()):
        a_key, b_key = _keys(e, saved)
        specs.append((a_key, from_torch(e.factors.a.dtype), tuple(e.factors.a.shape)))
        specs.append((b_key, from_torch(e.factors.b.dtype), tuple(e.factors.b.shape)))
    for name in plan.lora_biases:
        info = tuned.info(name)
        specs.append((f"{PREFIX}{name[: -len('.bias')]}.base_layer.bias", info.dtype, info.shape))
    for name in plan.full_tensors:
        info = tuned.info(name)
        specs.append((PREFIX + name, info.dtype, info.shape))
    return specs


def adapter_config(plan: AdapterLayout, base_model: str | None) -> dict[str, Any]:
    """A LoraConfig PEFT 0.17–0.21 reads without warnings about unknown keys."""
    r = plan.r or 1
    pattern = plan.rank_pattern()
    parameters = sorted(m for m, e in plan.lora.items() if e.kind == "expert")
    extra = {"target_parameters": parameters} if parameters else {}
    return extra | {
        "alpha_pattern": {k: float(v) for k, v in pattern.items()},
        "base_model_name_or_path": base_model,
        "bias": "lora_only" if plan.lora_biases else "none",
        "fan_in_fan_out": any(e.kind == "conv1d" for e in plan.lora.values()),
        "inference_mode": True,
        "init_lora_weights": True,
        "lora_alpha": r,
        "lora_dropout": 0.0,
        "modules_to_save": plan.full_modules or None,
        "peft_type": "LORA",
        "r": r,
        "rank_pattern": pattern,
        "revision": None,
        "target_modules": sorted(m for m, e in plan.lora.items() if e.kind != "expert"),
        "task_type": None,
        "use_dora": False,
        "use_rslora": False,
    }


def write_adapter(
    output: Path,
    plan: AdapterLayout,
    tuned: TensorSource,
    config: dict[str, Any],
    card: str,
    *,
    overwrite: bool,
) -> tuple[list[str], int]:
    """Write the folder into a temporary sibling and rename it into place; returns
    (file names, bytes of the weights file)."""
    specs = tensor_specs(plan, tuned)
    with OutputDir(output, overwrite) as out:
        weights = out.path / WEIGHTS_NAME
        writer = ShardWriter(weights, specs, {"format": "pt"}, hashed=True)
        saved = _saved(plan)
        try:
            for _, e in sorted(plan.lora.items()):
                a_key, b_key = _keys(e, saved)
                writer.write(a_key, e.factors.a.contiguous())
                writer.write(b_key, e.factors.b.contiguous())
            for name in plan.lora_biases:
                writer.write(f"{PREFIX}{name[: -len('.bias')]}.base_layer.bias", tuned.read(name))
            for name in plan.full_tensors:
                writer.write(PREFIX + name, tuned.read(name))
            writer.close()
        except BaseException:
            writer.abort()
            raise
        size = writer.size
        text = json.dumps(config, indent=2, sort_keys=True) + "\n"
        write_small_file(out.path / CONFIG_NAME, text.encode())
        write_small_file(out.path / CARD_NAME, card.encode())
        digest = writer.digest()
        write_manifest(out.path, {WEIGHTS_NAME: digest} if digest else None)
        files = sorted(p.name for p in out.path.iterdir())
    return files, size
