"""GGUF LoRA (llama.cpp) adapters: read back into HF names, and written from any adapter."""

from __future__ import annotations

from pathlib import Path

GGUF_MAGIC = b"GGUF"


def is_gguf_adapter(path: Path) -> bool:
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def load_gguf_adapter(path: Path, base: object = None):  # filled in below
    raise NotImplementedError
