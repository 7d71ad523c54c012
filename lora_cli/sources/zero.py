"""A DeepSpeed ZeRO checkpoint folder as ordinary named tensors, gathered one at a time.

``engine.save_checkpoint`` leaves per-rank pickles: trainable parameters live only in
the optimizer files' fp32 flat partitions (ZeRO-1/2: one partition of each param group
per rank; ZeRO-3: every parameter split into ``ceil(n/W)``-element slices at the same
offset on every rank), frozen ones in ``module`` (ZeRO-1/2) or in per-rank
``frozen_param_fragments`` (ZeRO-3). Here each parameter is assembled on request from
exactly the byte ranges that hold it, so memory stays at one parameter; the Adam
moments beside the partitions are never read. The pickles are parsed with the
``deepspeed`` allowlist of ``safe_pickle`` (inert records, no DeepSpeed import).

The reconstruction follows DeepSpeed 0.19.8 ``zero_to_fp32`` (the test oracle);
``lora-formats.md`` §5 and ``training-checkpoints.md`` §2 describe the layouts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lora_cli.errors import FormatError
from lora_cli.io.dtypes import nbytes_of
from lora_cli.io.reader import TensorInfo, TensorSource
from lora_cli.io.safe_pickle import PickledTensor
from lora_cli.io.torch_zip import TorchZipFile
from lora_cli.sources.zero_layout import (
    check_ranks,
    find_tag_folder,
    rank_files,
    refuse_unsupported,
)
from lora_cli.sources.zero_records import Fields

if TYPE_CHECKING:
    import torch


@dataclass
class _Piece:
    """A contiguous 1-D run of elements in one rank file."""

    zf: TorchZipFile
    tensor: PickledTensor
    label: str

    @property
    def numel(self) -> int:
        return self.tensor.numel


def _read_span(pieces: list[_Piece], start: int, count: int) -> torch.Tensor:
    """Elements ``[start, start+count)`` of the concatenation of ``pieces`` (none is read
    whole; only the overlapping part of each)."""
    import torch

    out, base = [], 0
    for p in pieces:
        lo, hi = max(start, base), min(start + count, base + p.numel)
        if lo < hi:
            out.append(p.zf.read_elements(p.label, p.tensor, lo - base, hi - lo))
        base += p.numel
        if base >= start + count:
            break
    got = sum(t.numel() for t in out)
    if got != count:
        raise FormatError(
            f"{pieces[0].zf.path.parent}: flat partitions hold {got} of the {count} elements "
            "needed (truncated or mismatched rank files)"
        )
    return out[0] if len(out) == 1 else torch.cat(out)


@dataclass
class _Param:
    shape: tuple[int, ...]
    dtype: str
    how: str  # flat | sliced | whole
    pieces: list[list[_Piece]] = field(default_factory=list)  # flat: [all]; sliced: per rank
    start: int = 0  # element offset (flat: in the concatenation; sliced: on each rank)
    whole: _Piece | None = None


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


class ZeroReader:
    """Gathers one parameter at a time; ``TensorSource.read`` calls ``read(name)``."""

    def __init__(self, params: dict[str, _Param], files: list[TorchZipFile]) -> None:
        self.params = params
        self.files = files

    def read(self, name: str) -> torch.Tensor:
        import torch

        p = self.params[name]
        n = _numel(p.shape)
        if p.how == "whole":
            assert p.whole is not None
            t = p.whole.zf.read_elements(p.whole.label, p.whole.tensor, 0, p.whole.numel)
        elif p.how == "flat":
            t = _read_span(p.pieces[0], p.start, n)
        else:  # ZeRO-3: the same slice on every rank, concatenated, padding trimmed
            per_rank = math.ceil(n / len(p.pieces))
            t = torch.cat([_read_span(r, p.start, per_rank) for r in p.pieces])[:n]
        return t.reshape(p.shape)

    def close(self) -> None:
        for f in self.files:
            f.close()


@dataclass
class ZeroCheckpoint:
    """What ``inspect`` reports about a DeepSpeed checkpoint."""

    tag: Path
    stage: int | None  # None: BF16_Optimizer (no zero_stage)
    world_size: int
    bf16: bool
    trainable: list[str]
    frozen: list[str]
    shared: dict[str, str]
    groups: int
    frozen_excluded: bool
    notes: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return "deepspeed-bf16-optimizer" if self.stage is None else f"deepspeed-zero{self.stage}"


def open_zero(path: Path) -> tuple[TensorSource, ZeroCheckpoint]:
    """The checkpoint's parameters under their training names (in-memory PEFT names for a
    PeftModel run), fp32 master values for trainables, the saved 16-bit ones for frozen."""
    tag = find_tag_folder(Path(path))
    refuse_unsupported(tag)
    files: list[TorchZipFile] = []
    try:
        return _open(tag, files)
    except BaseException:
        for f in files:
            f.close()
        raise


class _RankFile(Fields):
    """A parsed rank file: its checked fields, and the zip its tensors are read from."""

    def __init__(self, zf: TorchZipFile) -> None:
        super().__init__(zf.path, zf.tree)
        self.zf = zf


def _load(tag: Path, name: str, files: list[TorchZipFile]) -> _RankFile:
    zf = TorchZipFile(tag / name, profile="deepspeed", tree_only=True)
    files.append(zf)
    return _RankFile(zf)


def _open(tag: Path, files: list[TorchZipFile]) -> tuple[TensorSource, ZeroCheckpoint]:
    optim_names = rank_files(tag, "optim")
    if not optim_names:
        raise FormatError(f"{tag}: no *_optim_states.pt files", "not a DeepSpeed ZeRO checkpoint")
    first = _load(tag, optim_names[min(optim_names)], files)
    osd = first.sub("optimizer_state_dict")
    stage = osd.zero_stage()
    world = osd.partition_count()
    optim = [first] + [
        _load(tag, n, files) for n in check_ranks(tag, optim_names, world, "optimizer")[1:]
    ]
    if stage == 3:
        model_names = check_ranks(tag, rank_files(tag, "model"), world, "model")
    else:
        if not (tag / "mp_rank_00_model_states.pt").is_file():
            raise FormatError(f"{tag}: mp_rank_00_model_states.pt is missing")
        model_names = ["mp_rank_00_model_states.pt"]
    models = [_load(tag, n, files) for n in model_names]
    states = models[0]
    dp = states.optional_int("dp_world_size")
    if dp is not None and dp != world:
        raise FormatError(f"{tag}: model states say {dp} data-parallel ranks but the optimizer "
                          f"was partitioned {world} ways", "mismatched rank files")  # fmt: skip
    module = states.tensors("module", required=True)
    bf16 = "bf16_" in next(iter(optim_names.values()))
    params: dict[str, _Param] = {}
    notes: list[str] = []
    shapes = states.shape_groups("param_shapes")
    trainable = [n for g in shapes for n in g]
    if stage is None:
        if not osd.has("single_partition_of_fp32_groups"):
            raise osd.bad("single_partition_of_fp32_groups", "missing: neither a ZeRO nor a "
                          "BF16_Optimizer state")  # fmt: skip
        notes.append("BF16_Optimizer checkpoint (no zero_stage): the 16-bit weights saved in "
                     "'module' are used; its fp32 master partitions are not read")  # fmt: skip
    elif stage in (1, 2):
        _flat_params(params, shapes, optim, world)
    else:
        _sliced_params(params, shapes, optim, world)
    frozen_shapes = states.shapes("frozen_param_shapes")
    frozen_excluded = frozen_shapes is None and stage in (2, 3)
    frozen = _frozen_params(params, module, states, models, stage, frozen_shapes or {})
    for name in states.names("buffer_names"):
        t = module.get(name)
        if t is not None and name not in params:
            params[name] = _Param(t.shape, t.tag.dtype, "whole", whole=_Piece(states.zf, t, name))
    if frozen_excluded:
        notes.append("saved with exclude_frozen_parameters: frozen weights are not in the "
                     "checkpoint and come from --base")  # fmt: skip
    aliases = states.name_map("shared_params")
    shared = {a: s for a, s in aliases.items() if s in params}
    infos: dict[str, TensorInfo] = {}
    for name, p in params.items():
        infos[name] = _info(name, p, tag, name, shared)
    for alias, src in shared.items():
        if alias not in params:
            params[alias] = params[src]
            infos[alias] = _info(alias, params[src], tag, src, shared)
    reader = ZeroReader(params, files)
    source = TensorSource(tag, "deepspeed", [tag], infos, readers={tag: reader})
    info = ZeroCheckpoint(
        tag=tag,
        stage=stage,
        world_size=world,
        bf16=bf16,
        trainable=trainable if stage is not None else [],
        frozen=frozen,
        shared=shared,
        groups=len(shapes),
        frozen_excluded=frozen_excluded,
        notes=notes,
    )
    return source, info


def _frozen_params(
    params: dict[str, _Param],
    module: dict[str, PickledTensor],
    states: _RankFile,
    models: list[_RankFile],
    stage: int | None,
    frozen_shapes: dict[str, tuple[int, ...]],
) -> list[str]:
    """Frozen parameters: ZeRO-3 slices them over every rank's ``frozen_param_fragments``
    (each ``ceil(n/W)`` elements); ZeRO-1/2 saves them whole in ``module`` (or in
    ``frozen_param_fragments``, same size)."""
    frozen: list[str] = []
    aliases = states.name_map("shared_params")
    fragments = [m.tensors("frozen_param_fragments") for m in models]
    for name, t in module.items():
        if name in params or name in aliases:
            continue
        if stage == 3:
            if name not in frozen_shapes:
                continue  # a trainable placeholder without a partition, or a buffer (below)
            shape = frozen_shapes[name]
            per_rank = math.ceil(_numel(shape) / len(models))
            pieces = []
            for m, frags in zip(models, fragments, strict=True):
                frag = frags.get(name)
                if frag is None or frag.numel < per_rank:
                    raise m.bad(f"frozen_param_fragments[{name!r}]",
                                f"{'missing' if frag is None else f'{frag.numel} elements'}; "
                                f"shape {list(shape)} needs {per_rank} on each of "
                                f"{len(models)} ranks")  # fmt: skip
                pieces.append([_Piece(m.zf, frag, name)])
            params[name] = _Param(shape, pieces[0][0].tensor.tag.dtype, "sliced", pieces)
        else:
            src = fragments[0].get(name, t)
            if src.numel != t.numel:
                field = f"frozen_param_fragments[{name!r}]"
                raise states.bad(field, f"{src.numel} elements; module's tensor has {t.numel}")
            params[name] = _Param(t.shape, t.tag.dtype, "whole", whole=_Piece(states.zf, src, name))
        frozen.append(name)
    return frozen


def _info(name: str, p: _Param, tag: Path, storage: str, shared: dict[str, str]) -> TensorInfo:
    nbytes = nbytes_of(p.dtype, p.shape)
    tied = storage != name or name in shared.values()
    return TensorInfo(
        name=name,
        dtype=p.dtype,
        shape=p.shape,
        nbytes=nbytes,
        file=tag,
        storage=f"zero:{storage}" if tied else None,
        byte_span=(0, nbytes) if tied else None,
    )


def _flat_params(
    params: dict[str, _Param],
    shapes: list[dict[str, tuple[int, ...]]],
    optim: list[_RankFile],
    world: int,
) -> None:
    """ZeRO-1/2: group g is the concatenation of every rank's partition g, walked in the
    saved ``param_shapes`` order (plus per-parameter alignment padding, if any)."""
    osds = [f.sub("optimizer_state_dict") for f in optim]
    parts = [o.tensor_list("single_partition_of_fp32_groups") for o in osds]
    paddings = osds[0].int_lists("param_alignment_paddings")
    for g, group in enumerate(shapes):
        pieces = []
        for f, o, rank_parts in zip(optim, osds, parts, strict=True):
            if g >= len(rank_parts):
                raise o.bad("single_partition_of_fp32_groups",
                            f"no fp32 partition for param group {g}")  # fmt: skip
            pieces.append(_Piece(f.zf, rank_parts[g], f"single_partition_of_fp32_groups[{g}]"))
        offset = 0
        pads = paddings[g] if paddings is not None and g < len(paddings) else []
        for i, (name, shape) in enumerate(group.items()):
            params[name] = _Param(shape, pieces[0].tensor.tag.dtype, "flat", [pieces], offset)
            offset += _numel(shape) + (pads[i] if i < len(pads) else 0)
        total = sum(p.numel for p in pieces)
        align = 2 * world
        if -(-offset // align) * align != -(-total // align) * align:
            raise FormatError(
                f"{optim[0].path.parent}: param group {g} holds {total} fp32 elements "
                f"but its parameters need {offset}",
                "the rank files do not belong together (or an old checkpoint was overwritten)",
            )


def _sliced_params(
    params: dict[str, _Param],
    shapes: list[dict[str, tuple[int, ...]]],
    optim: list[_RankFile],
    world: int,
) -> None:
    """ZeRO-3: each parameter has ``ceil(n/W)`` elements at the same offset on every rank
    (sub-group partitions of a rank read as one vector)."""
    per_rank: list[list[_Piece]] = []
    for f in optim:
        groups = f.sub("optimizer_state_dict").tensor_list("fp32_flat_groups")
        per_rank.append([_Piece(f.zf, t, f"fp32_flat_groups[{i}]") for i, t in enumerate(groups)])
    totals = [sum(p.numel for p in rank) for rank in per_rank]
    offset = 0
    dtype = per_rank[0][0].tensor.tag.dtype
    for group in shapes:
        for name, shape in group.items():
            params[name] = _Param(shape, dtype, "sliced", per_rank, offset)
            offset += math.ceil(_numel(shape) / world)
    if any(total != offset for total in totals):
        raise FormatError(
            f"{optim[0].path.parent}: the ranks hold {sorted(set(totals))} fp32 elements "
            f"each but the parameters need {offset}",
            "the rank files do not belong together (or an old checkpoint was overwritten)",
        )
