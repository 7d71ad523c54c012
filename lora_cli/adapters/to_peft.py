"""``convert --to peft``: any canonical Adapter → a PEFT adapter folder.

The tensors are the Adapter's own PEFT-form tensors (already transposed, un-stacked
and un-permuted by the reader), so this writes them as they are; the config is the
reader's synthesized PEFT config, with ``rank_pattern``/``alpha_pattern`` for modules
whose rank or scale differ from the most common one (GGUF files carry one alpha but
may hold several ranks).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

from lora_cli.adapters.export import Exported, Progress, common_checks, refuse, write_safetensors
from lora_cli.adapters.peft import PREFIX, Adapter
from lora_cli.io.layout import write_json
from lora_cli.sources.view import Derived, plain

WEIGHTS = "adapter_model.safetensors"


def peft_recipes(adapter: Adapter) -> list[Derived]:
    """The adapter's tensors under PEFT's saved names, in module order."""
    src = adapter.source
    out = []
    for path in sorted(adapter.modules):
        for part, key in sorted(adapter.modules[path].parts.items()):
            info = src.info(key)
            out.append(Derived(f"{PREFIX}{path}.{part}", info.dtype, info.shape, plain(key)))
    return out


def peft_config(adapter: Adapter) -> dict[str, Any]:
    """The config PEFT needs to give every module the reader's rank and scale."""
    config = dict(adapter.config)
    if adapter.format == "peft" or not adapter.modules:
        return config
    ranks = Counter(m.r for m in adapter.modules.values())
    r = ranks.most_common(1)[0][0]
    alphas = Counter(m.scale * m.r for m in adapter.modules.values())
    alpha = alphas.most_common(1)[0][0]
    config["r"] = r
    config["lora_alpha"] = alpha
    config["rank_pattern"] = {
        re.escape(p): m.r for p, m in sorted(adapter.modules.items()) if m.r != r
    }
    config["alpha_pattern"] = {
        re.escape(p): m.scale * m.r
        for p, m in sorted(adapter.modules.items())
        if m.scale * m.r != alpha
    }
    return config


def write_peft(adapter: Adapter, out: Path, progress: Progress | None) -> Exported:
    """Write ``adapter`` as ``adapter_config.json`` + ``adapter_model.safetensors`` in ``out``."""
    common_checks(adapter, "PEFT")
    problems = []
    if adapter.replacements and adapter.format != "peft":
        problems.append(
            f"{len(adapter.replacements)} full-weight tensors (e.g. "
            f"{next(iter(adapter.replacements))}; mlx-lm fine_tune_type 'full') have no PEFT "
            "form; merge them into the base with `lora merge` instead"
        )
    refuse(adapter, "PEFT", problems)
    recipes = peft_recipes(adapter)
    if adapter.format == "peft":  # replacements and token rows keep their saved names
        src = adapter.source
        for key in list(adapter.replacements.values()) + [
            k for k, _ in adapter.token_rows.values()
        ]:
            info = src.info(key)
            name = adapter.key_renames.get(key, key)
            recipes.append(Derived(name, info.dtype, info.shape, plain(key)))
    total = write_safetensors(
        out / WEIGHTS, recipes, adapter.source.read, {"format": "pt"}, progress
    )
    write_json(out / "adapter_config.json", peft_config(adapter))
    notes = []
    if adapter.format == "mlx-lm":
        scale = adapter.native.get("scale")
        notes.append(
            f"mlx scale {scale} at rank {adapter.config['r']} → lora_alpha "
            f"{adapter.config['lora_alpha']}; factors transposed to PEFT orientation"
        )
    return Exported(sorted(p.name for p in out.iterdir()), len(recipes), total, notes)
