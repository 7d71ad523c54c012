"""Property-based fuzzing of the readers: mutated safetensors headers and bytes, mutated
torch zip files. Each mutant is either refused with a ``LoraError`` or read correctly;
never another exception, a crash or a hang.

Bounded to a few seconds: small files, a fixed number of examples, no shrinking
database, and an alarm that turns a hang into a failure.
"""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from rel_helpers import no_hang
from safetensors import SafetensorError
from safetensors.torch import load_file, save, save_file

from lora_cli.errors import LoraError
from lora_cli.io.reader import open_source

HANG_SECONDS = 10
FUZZ = settings(
    max_examples=200,
    deadline=None,
    database=None,
    derandomize=True,  # the same mutants on every CI run
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(3, 4, generator=g),
        "b.bias": torch.randn(5, generator=g).to(torch.bfloat16),
        "c.idx": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "d.empty": torch.empty(0, 2),
        "e.scalar": torch.tensor(1.5, dtype=torch.float16),
    }


VALID_ST = save(_tensors(), metadata={"format": "pt"})


def _torch_bytes() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        t = _tensors()
        t["tied"] = t["a.weight"]  # shared storage
        t["view"] = t["a.weight"][1:]  # offset view
        p = Path(d) / "x.bin"
        torch.save(t, p)
        return p.read_bytes()


VALID_BIN = _torch_bytes()


def _read_all(path: Path) -> dict[str, torch.Tensor] | None:
    """Our reader: every tensor, or None when it refuses the file with a LoraError."""
    try:
        with no_hang(HANG_SECONDS), open_source(path) as src:
            return {name: src.read(name).clone() for name in src.names()}
    except LoraError:
        return None


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _reference(path: Path) -> dict[str, torch.Tensor] | None:
    try:
        return load_file(path)
    except (SafetensorError, ValueError, OSError, RuntimeError, TypeError):
        return None


def _check_safetensors(tmp: Path, data: bytes) -> None:
    path = tmp / "model.safetensors"
    path.write_bytes(data)
    ours = _read_all(path)
    if ours is None:
        return
    # What we accept, the Rust library accepts too, with the same values bit for bit.
    ref = _reference(path)
    assert ref is not None, "accepted a file the safetensors library refuses"
    assert set(ours) == set(ref)
    for name, t in ours.items():
        assert t.dtype == ref[name].dtype and t.shape == ref[name].shape, name
        assert torch.equal(_bits(t), _bits(ref[name])), name


mutation = st.tuples(st.integers(min_value=0), st.integers(min_value=0, max_value=255))


@FUZZ
@given(flips=st.lists(mutation, min_size=1, max_size=4), cut=st.integers(0, 3))
def test_safetensors_byte_mutations(tmp_path, flips, cut) -> None:
    data = bytearray(VALID_ST)
    for pos, value in flips:
        data[pos % len(data)] = value
    if cut:  # sometimes truncate too
        data = data[: len(data) - cut * 7]
    _check_safetensors(tmp_path, bytes(data))


def _header() -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", VALID_ST[:8])
    return json.loads(VALID_ST[8 : 8 + n]), VALID_ST[8 + n :]


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**65), max_value=2**65)
    | st.floats(allow_nan=False)
    | st.sampled_from(["F32", "BF16", "I64", "F12", "", "F4", "U16", "format", "pt"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=8,
)


SMALL = st.integers(min_value=-1, max_value=80)
# near-valid values per field, so mutants get past the first checks often
NEAR = {
    "dtype": st.sampled_from(
        ["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "F4", "F6_E2M3"]
    ),
    "shape": st.lists(st.one_of(SMALL, st.booleans(), st.just(2**48), st.just(2**64)), max_size=3),
    "data_offsets": st.lists(st.one_of(SMALL, st.booleans(), st.just(2**64)), max_size=3),
}


@FUZZ
@given(
    tensor=st.sampled_from([*_header()[0].keys(), "new.tensor"]),
    field=st.sampled_from(["dtype", "shape", "data_offsets", "extra", None]),
    value=st.one_of(*NEAR.values(), JSON_VALUES),
    length_delta=st.sampled_from([0, 0, 0, -1, 1, 8, 2**40]),
)
# classics that must always be in the run: a JSON bool is not a dimension, a list is not
# a dtype, a float is not an offset
@example(tensor="e.scalar", field="shape", value=[True], length_delta=0)
@example(tensor="a.weight", field="dtype", value=["F32"], length_delta=0)
@example(tensor="d.empty", field="shape", value=[0.0, 2], length_delta=0)
@example(tensor="d.empty", field="data_offsets", value=[0, 0.0], length_delta=0)
def test_safetensors_header_mutations(tmp_path, tensor, field, value, length_delta) -> None:
    """Structured edits: a field of one entry (or the whole entry) replaced by a near-valid
    or an arbitrary JSON value, sometimes with a wrong header length prefix."""
    header, body = _header()
    if field is None:
        header[tensor] = value
    else:
        entry = header.get(tensor)
        entry = dict(entry) if isinstance(entry, dict) else {}
        entry[field] = value
        header[tensor] = entry
    text = json.dumps(header).encode()
    n = max(0, len(text) + length_delta)
    _check_safetensors(tmp_path, struct.pack("<Q", n) + text + body)


@FUZZ
@given(flips=st.lists(mutation, min_size=1, max_size=6), cut=st.integers(0, 3))
def test_torch_zip_byte_mutations(tmp_path, flips, cut) -> None:
    data = bytearray(VALID_BIN)
    for pos, value in flips:
        data[pos % len(data)] = value
    if cut:
        data = data[: len(data) - cut * 97]
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(bytes(data))
    ours = _read_all(path)
    if ours is None:
        return
    with no_hang(HANG_SECONDS), open_source(path) as src:
        for name, t in ours.items():  # what was read is what the listing promised
            info = src.info(name)
            assert tuple(t.shape) == info.shape and t.numel() * t.element_size() == info.nbytes


def test_the_unmutated_files_read_correctly(tmp_path) -> None:
    """The fuzz starting points are valid: otherwise every mutant is trivially refused."""
    (tmp_path / "model.safetensors").write_bytes(VALID_ST)
    ours = _read_all(tmp_path / "model.safetensors")
    assert ours is not None and set(ours) == set(_tensors())
    (tmp_path / "pytorch_model.bin").write_bytes(VALID_BIN)
    ours = _read_all(tmp_path / "pytorch_model.bin")
    assert ours is not None
    for name, t in _tensors().items():
        assert torch.equal(_bits(ours[name]), _bits(t)), name


@pytest.mark.parametrize("n", [0, 7, 8, 9])
def test_tiny_files(tmp_path, n) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(VALID_ST[:n])
    assert _read_all(path) is None
    save_file({}, path)
    assert _read_all(path) == {}
