"""safetensors headers: the Rust library's validation rules, and a planner that lays files
out byte for byte like the Rust writer."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file

from lora_cli.errors import FormatError
from lora_cli.io.dtypes import SAFETENSORS_DTYPES, from_torch
from lora_cli.io.safetensors_format import (
    MAX_HEADER_SIZE,
    parse_header_bytes,
    plan_header,
    read_header,
)

U8 = {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}


def _raw(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _write(tmp_path: Path, blob: bytes, name: str = "x.safetensors") -> Path:
    path = tmp_path / name
    path.write_bytes(blob)
    return path


def _refused(path: Path, *needles: str) -> str:
    """Our reader and the Rust library both refuse; our message is one line naming the file."""
    with pytest.raises(FormatError) as info:
        read_header(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    for needle in needles:
        assert needle in message, message
    with pytest.raises(Exception), safe_open(path, "pt") as f:  # noqa: B017 - Rust refuses too
        f.keys()
    return message


# --- rejected headers: one case per Rust rule ---------------------------------------------


def test_file_smaller_than_the_length_prefix(tmp_path):
    _refused(_write(tmp_path, b"\x01\x00\x00"), "too small")


def test_header_length_over_100mb_is_refused_before_reading(tmp_path):
    path = _write(tmp_path, _raw(b"{}", length=MAX_HEADER_SIZE + 1))
    _refused(path, "100 MB")


def test_header_length_past_end_of_file(tmp_path):
    path = _write(tmp_path, _raw(b'{"a":1}', length=500))
    _refused(path, "past the end", "500")


def test_header_not_utf8(tmp_path):
    _refused(_write(tmp_path, _raw(b'{"\xff\xfe":1}')), "UTF-8")


@pytest.mark.parametrize("text", [b"[1, 2]", b'"a string"', b"42", b"null"])
def test_header_not_a_json_object(tmp_path, text):
    _refused(_write(tmp_path, _raw(text)), "not a JSON object")


@pytest.mark.parametrize(
    "text", [b"", b"{", b'{"a": NaN}', b"{'a': 1}", b'{"a":' + b"[" * 100_000], ids=repr
)
def test_header_not_json(tmp_path, text):
    _refused(_write(tmp_path, _raw(text)), "not valid JSON")


def test_duplicate_tensor_names(tmp_path):
    text = (
        b'{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
        b'"w":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}'
    )
    _refused(_write(tmp_path, _raw(text, b"ab")), "'w'", "twice")


def test_duplicate_field_inside_an_entry(tmp_path):
    text = b'{"w":{"dtype":"U8","dtype":"U8","shape":[1],"data_offsets":[0,1]}}'
    _refused(_write(tmp_path, _raw(text, b"a")), "'w'", "'dtype'")


@pytest.mark.parametrize("dtype", ["F128", "f32", "float32", None, 7])
def test_unknown_dtype(tmp_path, dtype):
    header = {"ok": U8, "bad": {"dtype": dtype, "shape": [1], "data_offsets": [2, 3]}}
    _refused(_write(tmp_path, _raw(header, b"abc")), "'bad'", "dtype")


@pytest.mark.parametrize(
    "entry",
    [
        {"dtype": "F32", "shape": [3], "data_offsets": [2, 10]},  # 12 bytes needed, span 8
        {"dtype": "F16", "shape": [2, 3], "data_offsets": [2, 10]},
        {"dtype": "U8", "shape": [], "data_offsets": [2, 10]},  # a scalar is 1 byte
    ],
)
def test_shape_and_offsets_disagree(tmp_path, entry):
    message = _refused(_write(tmp_path, _raw({"ok": U8, "bad": entry}, b"x" * 10)), "'bad'")
    assert "needs" in message


@pytest.mark.parametrize(
    "entry",
    [
        {"dtype": "U8", "shape": [-1], "data_offsets": [2, 3]},
        {"dtype": "U8", "shape": [1.0], "data_offsets": [2, 3]},
        {"dtype": "U8", "shape": [True], "data_offsets": [2, 3]},
        {"dtype": "U8", "shape": "1", "data_offsets": [2, 3]},
        {"dtype": "U8", "shape": [1], "data_offsets": [2]},
        {"dtype": "U8", "shape": [1], "data_offsets": [2, 3, 4]},
        {"dtype": "U8", "shape": [1], "data_offsets": [-1, 0]},
        {"dtype": "U8", "shape": [1], "data_offsets": [2.0, 3]},
        {"dtype": "U8", "shape": [1]},
        "not an object",
    ],
)
def test_malformed_entry(tmp_path, entry):
    _refused(_write(tmp_path, _raw({"ok": U8, "bad": entry}, b"abc")), "'bad'")


def test_gap_between_tensors(tmp_path):
    header = {"a": U8, "b": {"dtype": "U8", "shape": [2], "data_offsets": [3, 5]}}
    _refused(_write(tmp_path, _raw(header, b"x" * 5)), "'b'", "gap")


def test_data_not_starting_at_zero(tmp_path):
    header = {"a": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]}}
    _refused(_write(tmp_path, _raw(header, b"x" * 3)), "'a'")


def test_overlapping_tensors(tmp_path):
    header = {"a": U8, "b": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]}}
    _refused(_write(tmp_path, _raw(header, b"x" * 3)), "'b'", "overlap")


def test_aliased_tensors_json_attack(tmp_path):
    """safetensors' test_json_attack: many names over the same bytes."""
    header = {f"t{i}": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]} for i in range(10)}
    _refused(_write(tmp_path, _raw(header, b"x" * 16)), "overlap")


@pytest.mark.parametrize("data", [b"abc", b"a"], ids=["trailing-bytes", "truncated"])
def test_end_of_data_must_equal_file_size(tmp_path, data):
    message = _refused(_write(tmp_path, _raw({"a": U8}, data)), "'a'")
    assert f"holds {len(data)} data bytes" in message


@pytest.mark.parametrize(
    "metadata",
    [{"a": 1}, {"a": {"b": "c"}}, {"a": ["b"]}, {"a": None}, [], "", 0, ["format", "pt"]],
)
def test_metadata_must_map_strings_to_strings(tmp_path, metadata):
    header = {"__metadata__": metadata, "a": U8}
    _refused(_write(tmp_path, _raw(header, b"ab")), "__metadata__")


def test_sub_byte_dtype_must_fill_whole_bytes(tmp_path):
    header = {"a": {"dtype": "F4", "shape": [3], "data_offsets": [0, 1]}}
    _refused(_write(tmp_path, _raw(header, b"x")), "'a'", "whole bytes")


def test_missing_file_is_a_format_error(tmp_path):
    with pytest.raises(FormatError, match="cannot read"):
        read_header(tmp_path / "nope.safetensors")


# --- accepted headers -------------------------------------------------------------------


@pytest.mark.parametrize(
    "blob",
    [
        _raw(b"{}"),
        _raw(b"  {}   "),  # whitespace padding, as writers aligning the data do
        _raw({"__metadata__": None, "a": U8}, b"ab"),
        _raw(b'{"__metadata__":{"k":"1","k":"2"},"a":' + json.dumps(U8).encode() + b"}", b"ab"),
        _raw({"a": {**U8, "extra": [1]}}, b"ab"),  # unknown fields are ignored
        _raw(
            {
                "e1": {"dtype": "F32", "shape": [0, 5], "data_offsets": [0, 0]},
                "e2": {"dtype": "F16", "shape": [0], "data_offsets": [0, 0]},
                "s": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]},
            },
            b"abcd",
        ),
    ],
    ids=["empty", "padded", "null-metadata", "dup-metadata-key", "extra-field", "empty+scalar"],
)
def test_edge_cases_the_rust_reader_accepts(tmp_path, blob):
    path = _write(tmp_path, blob)
    with safe_open(path, "pt") as f:
        rust_keys = sorted(f.keys())
    header = read_header(path)
    assert sorted(header.entries) == rust_keys


def test_duplicate_metadata_keys_keep_the_last_value_like_rust(tmp_path):
    blob = _raw(b'{"__metadata__":{"k":"1","k":"2"},"a":' + json.dumps(U8).encode() + b"}", b"ab")
    path = _write(tmp_path, blob)
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"k": "2"}
    assert read_header(path).metadata == {"k": "2"}


def _sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "layer.weight": torch.randn(3, 5, generator=g),
        "layer.bias": torch.randn(5, generator=g).to(torch.bfloat16),
        "emb": torch.randn(4, 2, generator=g).to(torch.float16),
        "ids": torch.arange(7, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "bytes": torch.arange(5, dtype=torch.uint8),
        "double": torch.randn(2, generator=g, dtype=torch.float64),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "f8": torch.randn(6, generator=g).to(torch.float8_e4m3fn),
    }


def test_files_written_by_safetensors_parse_with_matching_entries(tmp_path):
    tensors = _sample_tensors()
    path = tmp_path / "ref.safetensors"
    save_file(tensors, path, metadata={"format": "pt", "note": "x"})
    header = read_header(path)
    assert header.metadata == {"format": "pt", "note": "x"}
    assert set(header.entries) == set(tensors)
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    assert header.data_start == 8 + n
    assert header.file_size == len(blob)
    raw_json = json.loads(blob[8 : 8 + n])
    for name, t in tensors.items():
        e = header.entries[name]
        assert e.dtype == raw_json[name]["dtype"] == from_torch(t.dtype)
        assert e.shape == tuple(t.shape)
        assert [e.start, e.end] == raw_json[name]["data_offsets"]
        got = blob[header.data_start + e.start : header.data_start + e.end]
        assert got == _bytes(t)
    # entries come back in data order
    starts = [e.start for e in header.entries.values()]
    assert starts == sorted(starts)


def test_parse_header_bytes_needs_only_the_header_prefix(tmp_path):
    tensors = {"a": torch.ones(1000)}
    blob = save(tensors)
    (n,) = struct.unpack("<Q", blob[:8])
    header = parse_header_bytes(Path("mem"), blob[: 8 + n], len(blob))
    assert header.entries["a"].nbytes == 4000


# --- planning headers like the Rust writer --------------------------------------------------


def _specs(tensors: dict[str, torch.Tensor]) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(k, from_torch(v.dtype), tuple(v.shape)) for k, v in tensors.items()]


def _our_file(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    header, entries = plan_header(_specs(tensors), metadata)
    data = b"".join(_bytes(tensors[e.name]) for e in entries)
    return header + data


def test_planned_file_is_byte_identical_to_safetensors_save():
    tensors = _sample_tensors()
    assert _our_file(tensors) == save(tensors, metadata={"format": "pt"})


def test_plan_order_is_dtype_descending_then_name():
    tensors = _sample_tensors()
    _, entries = plan_header(_specs(tensors))
    order = list(SAFETENSORS_DTYPES)
    keys = [(-order.index(e.dtype), e.name) for e in entries]
    assert keys == sorted(keys)
    assert entries[0].dtype == "I64" and entries[-1].dtype == "BOOL"  # enum order


def test_plan_aligns_data_and_every_tensor():
    tensors = _sample_tensors()
    header, entries = plan_header(_specs(tensors))
    assert len(header) % 8 == 0
    assert header[8:].rstrip(b" ").endswith(b"}")
    for e in entries:
        itemsize = max(1, SAFETENSORS_DTYPES[e.dtype][0] // 8)
        assert e.start % itemsize == 0, e


def test_plan_always_writes_format_pt_first():
    for metadata in (None, {}, {"alias": "kept"}):
        header, _ = plan_header([("a", "F32", (1,))], metadata)
        doc = json.loads(header[8:])
        assert list(doc)[0] == "__metadata__"
        assert doc["__metadata__"]["format"] == "pt"
    header, _ = plan_header([("a", "F32", (1,))], {"alias": "kept"})
    assert json.loads(header[8:])["__metadata__"] == {"format": "pt", "alias": "kept"}


def test_plan_writes_utf8_names_like_rust():
    tensors = {"ñame.wëight": torch.ones(2), 'quote"s': torch.ones(1), "tab\t": torch.ones(1)}
    assert _our_file(tensors) == save(tensors, metadata={"format": "pt"})


def test_alias_metadata_loads_and_matches_rust_layout(tmp_path):
    """Rust orders metadata keys by hash, so only the metadata order may differ."""
    tensors = {"a": torch.ones(3), "b": torch.zeros(2, dtype=torch.float16)}
    meta = {"lm_head.weight": "model.embed_tokens.weight"}
    ours = _our_file(tensors, meta)
    ref = save(tensors, metadata={"format": "pt", **meta})
    assert len(ours) == len(ref)
    path = _write(tmp_path, ours)
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt", **meta}
    loaded = load_file(path)
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    (n,) = struct.unpack("<Q", ref[:8])
    assert ours[8 + n :] == ref[8 + n :]  # identical data layout


@pytest.mark.parametrize(
    "specs, metadata, needle",
    [
        ([("a", "F32", (1,)), ("a", "F16", (1,))], None, "twice"),
        ([("a", "F4", (3,))], None, "whole bytes"),
        ([("a", "F99", (1,))], None, "dtype"),
        ([("__metadata__", "F32", (1,))], None, "__metadata__"),
        ([("bad\udcff", "F32", (1,))], None, "cannot be stored"),
        ([("a", "F32", (1,))], {"k": 1}, "string"),
    ],
)
def test_plan_refuses_what_cannot_be_stored(specs, metadata, needle):
    with pytest.raises(FormatError, match=needle):
        plan_header(specs, metadata)


_DT = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F64": torch.float64,
    "I8": torch.int8,
}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(
        st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=8),
        st.tuples(st.sampled_from(sorted(_DT)), st.lists(st.integers(0, 3), max_size=3)),
        min_size=0,
        max_size=6,
    )
)
def test_plan_matches_safetensors_for_random_dicts(spec):
    tensors = {
        name: torch.zeros(shape, dtype=_DT[dtype]) + (i % 2)
        for i, (name, (dtype, shape)) in enumerate(spec.items())
    }
    assert _our_file(tensors) == save(tensors, metadata={"format": "pt"})
