"""Structure-aware fuzzing of the ZeRO and DCP readers: the records of real checkpoints
(DeepSpeed and torch.distributed fixtures) are unpickled, one field is replaced by a
hypothesis-chosen value (wrong types, huge or negative counts, shapes, tensors of other
sizes and dtypes, deletions), the file is saved again the way its producer saves it, and
the reader opens the checkpoint and reads every tensor in-process. Each mutant is refused
with a ``LoraError`` or read; never another exception or a hang.
"""

from __future__ import annotations

import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from checkpoint_mutations import (
    DCP_FOLDER,
    load_metadata,
    load_states,
    metadata_path,
    rank_file,
    zero_stage_enum,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rel_helpers import no_hang

from lora_cli.errors import LoraError

HANG_SECONDS = 20
FUZZ = settings(
    max_examples=60,
    deadline=None,
    database=None,
    derandomize=True,  # the same mutants on every run
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
DELETE = object()

_tensors = st.builds(
    lambda n, dtype: torch.zeros(n, dtype=dtype),
    st.integers(0, 64),
    st.sampled_from([torch.float32, torch.bfloat16, torch.int64, torch.complex64]),
)
_ints = st.one_of(st.integers(-3, 300), st.sampled_from([2**31, 2**40, 2**63, -(2**63)]))
VALUES = st.one_of(
    st.just(DELETE),
    st.none(),
    st.booleans(),
    _ints,
    st.text(max_size=4),
    st.lists(_ints, max_size=3),
    st.lists(st.lists(_ints, max_size=3), max_size=2),
    st.dictionaries(st.text(max_size=3), st.one_of(_ints, st.text(max_size=3)), max_size=2),
    st.lists(_tensors, max_size=2),
    _tensors,
    st.builds(zero_stage_enum, st.one_of(_ints, st.text(max_size=3))),
)


def _read_everything(open_fn, path: Path) -> None:
    """Open, list and read every tensor; a ``LoraError`` anywhere is a fine refusal."""
    with no_hang(HANG_SECONDS):
        try:
            source, _ = open_fn(path)
        except LoraError:
            return
        with source:
            for name in source.names():
                try:
                    source.read(name)
                except LoraError:
                    return


def _replace(container: Any, key: Any, value: Any) -> None:
    if value is DELETE:
        if isinstance(container, dict):
            container.pop(key, None)
        elif isinstance(container, list) and container:
            del container[key % len(container)]
    elif isinstance(container, dict):
        container[key] = value
    elif isinstance(container, list) and container:
        container[key % len(container)] = value


# -- ZeRO ---------------------------------------------------------------------------------------
OPTIM_FIELDS = ["zero_stage", "partition_count", "single_partition_of_fp32_groups",
                "fp32_flat_groups", "param_alignment_paddings"]  # fmt: skip
MODEL_FIELDS = ["module", "param_shapes", "frozen_param_shapes", "frozen_param_fragments",
                "shared_params", "buffer_names", "dp_world_size"]  # fmt: skip


@pytest.fixture(scope="module")
def zero_records(deepspeed_2ranks):
    """variant → (folder, {rank file: unpickled states}), loaded once."""
    out = {}
    for variant in ("zero2", "zero3"):
        folder = deepspeed_2ranks / variant
        files = {rank_file(folder, r, k) for r in (0, 1) for k in ("optim", "model")}
        out[variant] = (folder, {p: load_states(p) for p in files})
    return out


def _zero_mutant(records: dict, data) -> tuple[Path, Path]:
    import copy

    variant = data.draw(st.sampled_from(sorted(records)), "variant")
    folder, states = records[variant]
    path = data.draw(st.sampled_from(sorted(states)), "file")
    tree = copy.deepcopy(states[path])
    optim = "optim" in path.name
    target = tree["optimizer_state_dict"] if optim else tree
    field = data.draw(st.sampled_from(OPTIM_FIELDS if optim else MODEL_FIELDS), "field")
    value = data.draw(VALUES, "value")
    inner = target.get(field)
    if isinstance(inner, (list, dict)) and inner and data.draw(st.booleans(), "inside"):
        keys = list(inner) if isinstance(inner, dict) else list(range(len(inner)))
        key = data.draw(st.sampled_from(keys), "key")
        element = inner[key]
        if isinstance(element, dict) and element and data.draw(st.booleans(), "deeper"):
            _replace(element, data.draw(st.sampled_from(list(element)), "name"), value)
        else:
            _replace(inner, key, value)
    else:
        _replace(target, field, value)
    root = Path(tempfile.mkdtemp(prefix="lora-fuzz-zero-"))
    ckpt = Path(shutil.copytree(folder, root / "ckpt"))
    torch.save(tree, ckpt / path.relative_to(folder))
    return root, ckpt


@FUZZ
@given(data=st.data())
def test_zero_mutants_are_refused_or_read(zero_records, data):
    from lora_cli.sources.zero import open_zero

    root, ckpt = _zero_mutant(zero_records, data)
    try:
        _read_everything(open_zero, ckpt)
    finally:
        shutil.rmtree(root)


# -- DCP ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dcp_records(fsdp_3ranks):
    folder = fsdp_3ranks / "ckpt"
    return folder, load_metadata(folder)


def _set(record: Any, field: str, value: Any) -> None:
    """Frozen dataclass records: set (or delete) the attribute behind their back."""
    if value is DELETE:
        if hasattr(record, "__dict__") and field in record.__dict__:
            del record.__dict__[field]
    else:
        object.__setattr__(record, field, value)


def _dcp_mutant(records, data) -> tuple[Path, Path]:
    import copy

    folder, meta = records
    meta = copy.deepcopy(meta)
    tensors = [f for f, md in meta.state_dict_metadata.items() if hasattr(md, "chunks")]
    fqn = data.draw(st.sampled_from(tensors), "tensor")
    md = meta.state_dict_metadata[fqn]
    where = data.draw(st.sampled_from(["size", "chunks", "chunk", "storage", "key", "list"]))
    value = data.draw(VALUES, "value")
    if where in ("size", "chunks"):
        _set(md, where, value)
    elif where == "chunk":
        chunk = md.chunks[data.draw(st.integers(0, len(md.chunks) - 1), "chunk")]
        _set(chunk, data.draw(st.sampled_from(["offsets", "sizes"])), value)
    elif where == "storage":
        infos = [v for k, v in meta.storage_data.items() if k.fqn == fqn]
        field = data.draw(st.sampled_from(["relative_path", "offset", "length"]))
        _set(infos[data.draw(st.integers(0, len(infos) - 1), "info")], field, value)
    elif where == "key":
        hashable = value is not DELETE and not isinstance(value, (list, dict, torch.Tensor))
        meta.state_dict_metadata[value if hashable else 7] = meta.state_dict_metadata.pop(fqn)
    else:  # the chunk list itself: drop, duplicate or reorder a chunk
        op = data.draw(st.sampled_from(["drop", "duplicate", "reverse"]))
        if op == "drop":
            md.chunks.pop()
        elif op == "duplicate":
            md.chunks.append(md.chunks[0])
        else:
            md.chunks.reverse()
    root = Path(tempfile.mkdtemp(prefix="lora-fuzz-dcp-"))
    ckpt = Path(shutil.copytree(folder, root / "ckpt"))
    with open(metadata_path(ckpt), "wb") as f:
        pickle.dump(meta, f)
    return root, ckpt / DCP_FOLDER


@FUZZ
@given(data=st.data())
def test_dcp_mutants_are_refused_or_read(dcp_records, data):
    from lora_cli.sources.dcp import open_dcp

    root, folder = _dcp_mutant(dcp_records, data)
    try:
        _read_everything(open_dcp, folder)
    finally:
        shutil.rmtree(root)
