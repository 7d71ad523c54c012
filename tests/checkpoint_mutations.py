"""Edit the records of real training checkpoints (made by DeepSpeed and torch.distributed in
``tests/ckpt_workers/``), re-serialized the way their producers write them: the unpickled
DeepSpeed state dicts saved again with ``torch.save``, the DCP ``Metadata`` object pickled
again. Shared by the hostile-input suite and the checkpoint fuzzer.
"""

from __future__ import annotations

import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")

DCP_FOLDER = "pytorch_model_fsdp_0"
TAG = "global_step2"


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# -- DeepSpeed ---------------------------------------------------------------------------------
def rank_file(folder: Path, rank: int, kind: str) -> Path:
    """``kind`` optim or model; ZeRO-1/2 has one ``mp_rank_00_model_states.pt``."""
    tag = folder / TAG
    if kind == "model" and (tag / "mp_rank_00_model_states.pt").is_file():
        return tag / "mp_rank_00_model_states.pt"
    return next(tag.glob(f"*zero_pp_rank_{rank}_mp_rank_00_{kind}_states.pt"))


def load_states(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def edit_states(path: Path, fn: Callable[[dict], Any]) -> None:
    """Unpickle a DeepSpeed rank file (trusted: our own fixture), edit it, save it again."""
    states = load_states(path)
    fn(states)
    torch.save(states, path)


class Reduced:
    """Pickles as ``factory(*args)``: a record the real class could never hold
    (``ZeroStageEnum('abc')``)."""

    def __init__(self, factory: Any, *args: Any) -> None:
        self.factory, self.args = factory, args

    def __reduce__(self) -> tuple:
        return self.factory, self.args


def zero_stage_enum(value: Any) -> Reduced:
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return Reduced(ZeroStageEnum, value)


# -- torch.distributed.checkpoint ----------------------------------------------------------------
def metadata_path(folder: Path) -> Path:
    return folder / DCP_FOLDER / ".metadata"


def load_metadata(folder: Path) -> Any:
    with open(metadata_path(folder), "rb") as f:
        return pickle.load(f)  # our own fixture


def save_metadata(folder: Path, meta: Any) -> None:
    with open(metadata_path(folder), "wb") as f:
        pickle.dump(meta, f)


def edit_metadata(folder: Path, fn: Callable[[Any], Any]) -> None:
    meta = load_metadata(folder)
    fn(meta)
    save_metadata(folder, meta)


def first_tensor(meta: Any, rows: int = 3) -> str:
    """The first tensor split into ``rows`` chunks along dimension 0 (one per rank)."""
    return next(
        fqn
        for fqn, md in meta.state_dict_metadata.items()
        if hasattr(md, "chunks") and len(md.chunks) == rows and len(md.size) == 2
    )


def move_chunk(meta: Any, fqn: str, index: int, offsets: tuple, sizes: tuple | None = None) -> None:
    """Give chunk ``index`` of ``fqn`` new offsets (and sizes), moving its storage record."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

    md = meta.state_dict_metadata[fqn]
    old = md.chunks[index]
    new = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes or old.sizes))
    md.chunks[index] = new
    key = next(
        k for k in meta.storage_data if k.fqn == fqn and tuple(k.offset) == tuple(old.offsets)
    )
    info = meta.storage_data.pop(key)
    meta.storage_data[MetadataIndex(fqn, torch.Size(offsets))] = info


def make_fifo(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.mkfifo(path)
