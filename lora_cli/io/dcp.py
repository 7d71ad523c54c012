"""FSDP / torch.distributed.checkpoint folders as ordinary named tensors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lora_cli.io.reader import TensorSource


def find_dcp_folder(path: Path) -> Path | None:
    """The folder holding ``.metadata`` and ``*.distcp`` (``pytorch_model_fsdp_0/`` in an
    accelerate or Trainer checkpoint), or None."""
    return None


def open_dcp(folder: Path) -> tuple[TensorSource, dict[str, Any]]:
    raise NotImplementedError
