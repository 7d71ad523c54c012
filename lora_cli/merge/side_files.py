"""Whose tokenizer and chat template the merged model gets.

Trainers add tokens and templates while fine-tuning (a pad token, ChatML's
``<|im_start|>``, a ``chat_template.jinja``) and save them beside the adapter, so that
whoever loads the adapter gets them: PEFT users save them there for the merged model. An
adapter folder that holds tokenizer files therefore replaces the base's whole tokenizer
(never a mix of two tokenizers' files); one that holds only a chat template replaces the
base's template. The summary and ``--json`` (``tokenizer_from``) say so.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_cli.errors import MergeError
from lora_cli.io.layout import side_files

if TYPE_CHECKING:
    from lora_cli.adapters.peft import Adapter

TOKENIZER_FILES = frozenset(
    {
        "tokenizer.json",
        "tokenizer_config.json",
        "tokenizer.model",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "spiece.model",
        "sentencepiece.bpe.model",
        "tokenizer.tiktoken",
    }
)
TEMPLATE_FILES = frozenset({"chat_template.jinja", "chat_template.json"})


@dataclass(frozen=True)
class AdapterSideFiles:
    folder: Path  # the adapter folder they come from
    files: list[Path]
    replaces: frozenset[str]  # the base's side files left out for them

    def to_json(self) -> dict[str, Any]:
        return {"adapter": str(self.folder), "files": [p.name for p in self.files]}


def adapter_side_files(adapters: list[Adapter]) -> AdapterSideFiles | None:
    """The tokenizer/template files the output takes from an adapter folder, or None (the
    base's). Two adapters with different ones are refused: no merged tokenizer fits both."""
    found: list[AdapterSideFiles] = []
    for ad in adapters:
        folder = Path(ad.root)
        if not (folder / "adapter_config.json").is_file():
            continue  # a loose .gguf or weights file: its folder is not the adapter's own
        names = {p.name: p for p in side_files(folder)}
        tokenizer = sorted(n for n in names if n in TOKENIZER_FILES)
        template = sorted(n for n in names if n in TEMPLATE_FILES)
        if tokenizer:
            replaces = TOKENIZER_FILES | TEMPLATE_FILES
        elif template:
            replaces = TEMPLATE_FILES
        else:
            continue
        found.append(AdapterSideFiles(folder, [names[n] for n in tokenizer + template], replaces))
    if not found:
        return None
    first = found[0]
    for other in found[1:]:
        if _digest(other) != _digest(first):
            raise MergeError(
                f"adapters {first.folder} and {other.folder} carry different tokenizer or chat "
                "template files; the merged model can have only one",
                "remove them from all adapters but one (or merge them one after another)",
            )
    return first


def _digest(side: AdapterSideFiles) -> str:
    h = hashlib.sha256()
    for p in side.files:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()
