"""Which adapter format a path holds, and the one loader every stage calls.

Every format becomes the same canonical ``Adapter`` (PEFT's saved key form), so the
stages never branch on the format: PEFT-family folders (``adapters.peft``), mlx-lm
adapters (``adapters.mlx``) and GGUF LoRA files (``adapters.gguf``).
"""

from __future__ import annotations

from pathlib import Path

from lora_cli.adapters import peft
from lora_cli.adapters.peft import Adapter
from lora_cli.io.adapter_files import is_peft_adapter
from lora_cli.io.reader import TensorSource


def adapter_format(path: Path) -> str | None:
    """``"peft"``, ``"mlx-lm"``, ``"gguf"`` or None (not an adapter) for ``path``."""
    from lora_cli.adapters import gguf, mlx

    path = Path(path)
    if gguf.is_gguf_adapter(path):
        return "gguf"
    if mlx.find_mlx_files(path) is not None:
        return "mlx-lm"
    if is_peft_adapter(path):
        return "peft"
    return None


def is_adapter(path: Path) -> bool:
    return adapter_format(path) is not None


def load_adapter(path: Path, base: TensorSource | None = None) -> Adapter:
    """The canonical Adapter for any supported format.

    ``base``: the checkpoint the adapter will be applied to. GGUF LoRA names and row
    order, and mlx-lm MoE expert names, are resolved against it; without it they get
    the architecture's usual HF spelling.
    """
    from lora_cli.adapters import gguf, mlx

    fmt = adapter_format(path)
    if fmt == "gguf":
        return gguf.load_gguf_adapter(Path(path), base)
    if fmt == "mlx-lm":
        return mlx.load_mlx_adapter(Path(path), base.names() if base is not None else None)
    return peft.load_adapter(path)
