"""Which kind of training checkpoint a path is, opened as one tensor source.

Kinds, in the order they are recognised: an FSDP / torch.distributed.checkpoint folder,
a DeepSpeed ZeRO folder (also inside an HF Trainer ``checkpoint-N/``: its fp32 master
weights hold the trained base parameters the adapter file lacks, so they win), and a
full state dict (file, folder, or sharded with an index). Out-of-scope layouts are
refused here with one line naming what they are.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_cli.errors import FormatError
from lora_cli.io.adapter_files import has_adapter_weights, is_peft_adapter
from lora_cli.io.dtypes import FLOAT_DTYPES
from lora_cli.io.reader import TensorSource, open_source

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass
class TrainingCheckpoint:
    path: Path
    kind: str  # state-dict | deepspeed-zero{1,2,3} | deepspeed-bf16-optimizer | fsdp-dcp
    source: TensorSource  # tensors under their training names
    training_dtype: str | None
    trainable: list[str] | None = None  # known for DeepSpeed (its param groups)
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        """Where an adapter_config.json or config.json would sit."""
        return self.path if self.path.is_dir() else self.path.parent

    def close(self) -> None:
        self.source.close()


def _dominant_float(source: TensorSource) -> str | None:
    counts = Counter(i.dtype for i in source.infos.values() if i.dtype in FLOAT_DTYPES)
    return counts.most_common(1)[0][0] if counts else None


def refuse_per_rank_fsdp(folder: Path) -> None:
    per_rank = [p for p in folder.rglob("*_rank*.bin") if "fsdp" in p.name]
    if per_rank:
        raise FormatError(
            f"{per_rank[0]}: per-rank FSDP files (use_dcp=False; DTensor/ShardedTensor pickles) "
            "are not supported",
            "save with the default SHARDED_STATE_DICT through torch.distributed.checkpoint, "
            "or FULL_STATE_DICT",
        )


def open_training_checkpoint(path: Path) -> TrainingCheckpoint:
    from lora_cli.sources import dcp, zero, zero_layout

    path = Path(path)
    if not path.exists():
        raise FormatError(f"{path}: no such file or directory")
    if path.is_dir():
        dcp_folder = dcp.find_dcp_folder(path)
        if dcp_folder is not None:
            source, info = dcp.open_dcp(dcp_folder)
            ckpt = TrainingCheckpoint(path, "fsdp-dcp", source, _dominant_float(source))
            ckpt.details = info
            ckpt.notes.append(f"weights from the FSDP checkpoint {dcp_folder.name}/")
            return _note_adapter_file(ckpt)
        refuse_per_rank_fsdp(path)
        if zero_layout.is_zero_checkpoint(path):
            source, z = zero.open_zero(path)
            dtype = "BF16" if z.bf16 else "F32"
            ckpt = TrainingCheckpoint(path, z.kind, source, dtype, trainable=z.trainable)
            ckpt.notes += z.notes
            ckpt.details = {
                "tag": z.tag.name,
                "zero_stage": z.stage,
                "world_size": z.world_size,
                "bf16": z.bf16,
                "param_groups": z.groups,
                "trainable": len(z.trainable),
                "frozen": len(z.frozen),
                "frozen_excluded": z.frozen_excluded,
                "shared_params": z.shared,
            }
            master = "fp32 master weights" if z.stage is not None else "16-bit weights"
            ckpt.notes.insert(0, f"weights from DeepSpeed {z.tag.name}/ ({master})")
            return _note_adapter_file(ckpt)
    source = open_source(path)
    return TrainingCheckpoint(path, "state-dict", source, _dominant_float(source))


def _note_adapter_file(ckpt: TrainingCheckpoint) -> TrainingCheckpoint:
    """An HF Trainer folder also has the adapter file; say why it was not the source."""
    present = [n for n in ADAPTER_FILES if (ckpt.path / n).is_file()]
    if present:
        ckpt.notes.append(
            f"{present[0]} is beside it but not used: the training checkpoint also holds the "
            "trained base parameters (the adapter file may lack them)"
        )
    return ckpt


# PeftModel in-memory names; ``modules_to_save`` and LoRA factors carry an adapter name
_IN_MEMORY_PEFT = re.compile(
    r"\.(base_layer|original_module|token_adapter)\.|\.modules_to_save\.[^.]+\.[^.]+"
    r"|\.lora_[AB]\.[^.]+\.weight$"
)


def is_training_checkpoint(path: Path) -> bool:
    """A DeepSpeed or FSDP folder, or a state dict with in-memory PeftModel names."""
    from lora_cli.sources import dcp, zero_layout

    path = Path(path)
    if path.is_dir():
        if dcp.find_dcp_folder(path) is not None or zero_layout.is_zero_checkpoint(path):
            return True
        if any("fsdp" in p.name for p in path.rglob("*_rank*.bin")):
            return True
    if not path.exists() or (is_peft_adapter(path) and has_adapter_weights(path)):
        return False
    try:
        with open_source(path) as source:
            return any(_IN_MEMORY_PEFT.search(n) for n in source.names())
    except FormatError:
        return False
