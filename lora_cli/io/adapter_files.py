"""The files that make a PEFT adapter folder: ``adapter_config.json`` beside
``adapter_model.safetensors`` (or ``.bin``, ``.pt``).

Kept below every layer that asks: the adapter readers load such a folder, and the
checkpoint detector (``sources``) must tell it apart from a training checkpoint that holds
the same LoRA tensors, without importing the readers above it.
"""

from __future__ import annotations

from pathlib import Path

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin", "adapter_model.pt")


def is_peft_adapter(path: Path) -> bool:
    """A folder with ``adapter_config.json``, or an ``adapter_model*`` file beside one."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    return (folder / CONFIG_NAME).is_file() and (
        path.is_dir() or path.name.startswith("adapter_model")
    )


def has_adapter_weights(path: Path) -> bool:
    """An ``adapter_model*`` file, or a folder holding one (with or without its config)."""
    path = Path(path)
    return path.name.startswith("adapter_model") or any((path / n).is_file() for n in WEIGHT_NAMES)
