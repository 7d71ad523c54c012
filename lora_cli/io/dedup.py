"""Aliased tensors in pickles: which names to write, which to drop, which to copy.

safetensors forbids two names over the same bytes ("Some tensors share memory").
Identical views collapse to one name (recorded as ``alias → kept`` metadata, the
convention ``safetensors.torch.load_model`` understands); partial or overlapping
views become independent contiguous copies.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lora_cli.io.layout import OUTPUT_EMBEDDING
from lora_cli.io.reader import TensorInfo


@dataclass
class Dedup:
    keep: list[str]
    aliases: dict[str, str] = field(default_factory=dict)  # dropped name → kept name
    notes: list[str] = field(default_factory=list)


def deduplicate(infos: list[TensorInfo], tie_word_embeddings: bool | None) -> Dedup:
    groups: dict[str, list[TensorInfo]] = {}
    for info in infos:
        if info.storage is not None and info.nbytes:
            groups.setdefault(info.storage, []).append(info)
    dropped: dict[str, str] = {}
    notes: list[str] = []
    for members in groups.values():
        if len(members) < 2:
            continue
        views: dict[tuple, list[str]] = {}
        for m in members:
            views.setdefault((m.byte_span, m.dtype, m.shape), []).append(m.name)
        if len(views) > 1:
            names = sorted(m.name for m in members)
            notes.append(
                f"{', '.join(names)} are different views of one storage (partial, overlapping "
                "or reshaped): written as separate contiguous copies"
            )
        for names in views.values():
            if len(names) < 2:
                continue
            names = sorted(names)
            if OUTPUT_EMBEDDING in names and len(names) == 2:
                other = next(n for n in names if n != OUTPUT_EMBEDDING)
                if tie_word_embeddings:
                    dropped[OUTPUT_EMBEDDING] = other
                    notes.append(f"{OUTPUT_EMBEDDING} is tied to {other}: stored once")
                else:
                    notes.append(
                        f"{OUTPUT_EMBEDDING} shares storage with {other} but config.json does "
                        "not tie them: both written as separate copies"
                    )
                continue
            kept = names[0]
            for alias in names[1:]:
                dropped[alias] = kept
            notes.append(f"{', '.join(names[1:])} alias {kept}: stored once")
    keep = [i.name for i in infos if i.name not in dropped]
    return Dedup(keep=keep, aliases=dropped, notes=notes)
