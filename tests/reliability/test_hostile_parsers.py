"""Hostile checkpoints, pickles and indexes: each is built at test time from a real fixture
(ZeRO and DCP checkpoints made by DeepSpeed and torch.distributed, a PEFT adapter), then run
through the real command line in a forked, memory-capped, time-limited child
(``hostile_harness.assert_refused``): exit 2, one ``error:`` line naming the file and the
field or tensor, no traceback, bounded time and memory, inputs unchanged, nothing written.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from checkpoint_mutations import (
    DCP_FOLDER,
    TAG,
    copy_checkpoint,
    edit_metadata,
    edit_states,
    first_tensor,
    make_fifo,
    move_chunk,
    rank_file,
    zero_stage_enum,
)
from hostile_harness import assert_refused, run_cli
from rel_helpers import build_inputs, torch_file_with_pickle

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX only (fork, FIFOs)")


def _optim(f: Path, rank: int = 0) -> Path:
    return rank_file(f, rank, "optim")


def _model(f: Path, rank: int = 0) -> Path:
    return rank_file(f, rank, "model")


def _osd(path: Path, key: str, value=None, *, delete: bool = False) -> None:
    def fn(s: dict) -> None:
        if delete:
            del s["optimizer_state_dict"][key]
        else:
            s["optimizer_state_dict"][key] = value

    edit_states(path, fn)


def _states(path: Path, key: str, value) -> None:
    edit_states(path, lambda s: s.__setitem__(key, value))


def _first_fragment(s: dict) -> None:
    name = next(iter(s["frozen_param_fragments"]))
    s["frozen_param_fragments"][name] = torch.zeros(1, dtype=torch.float32)


def _complex_group(s: dict) -> None:
    groups = s["optimizer_state_dict"]["fp32_flat_groups"]
    groups[0] = groups[0].to(torch.complex64)


# case → (variant, mutate(folder) -> the file the error must name, the field it must name)
ZERO_CASES: dict[str, tuple[str, Callable[[Path], Path], str]] = {
    "partition_count 2**40": (
        "zero3", lambda f: (_osd(_optim(f), "partition_count", [2**40]), f / TAG)[1],
        "of 1099511627776"),
    "zero_stage 'abc'": (
        "zero3", lambda f: (_osd(_optim(f), "zero_stage", zero_stage_enum("abc")), _optim(f))[1],
        "zero_stage"),
    "zero_stage 7": (
        "zero2", lambda f: (_osd(_optim(f), "zero_stage", 7), _optim(f))[1], "zero_stage"),
    "missing optimizer_state_dict": (
        "zero3", lambda f: (edit_states(_optim(f), lambda s: s.pop("optimizer_state_dict")),
                            _optim(f))[1], "optimizer_state_dict"),
    "empty fp32_flat_groups": (
        "zero3", lambda f: (_osd(_optim(f, 1), "fp32_flat_groups", []), _optim(f, 1))[1],
        "fp32_flat_groups"),
    "complex fp32 partition": (
        "zero3", lambda f: (edit_states(_optim(f), _complex_group), _optim(f))[1],
        "fp32_flat_groups[0]"),
    "partitions not a list": (
        "zero2", lambda f: (_osd(_optim(f), "single_partition_of_fp32_groups", 3), _optim(f))[1],
        "single_partition_of_fp32_groups"),
    "negative padding": (
        "zero2", lambda f: (_osd(_optim(f), "param_alignment_paddings", [[-1]]), _optim(f))[1],
        "param_alignment_paddings"),
    "param_shapes a string": (
        "zero3", lambda f: (_states(_model(f), "param_shapes", "x"), _model(f))[1], "param_shapes"),
    "param_shapes bad shape": (
        "zero2", lambda f: (_states(_model(f), "param_shapes", [{"a": "b"}]), _model(f))[1],
        "param_shapes[0]"),
    "shared_params values": (
        "zero3", lambda f: (_states(_model(f), "shared_params", {"a": 5}), _model(f))[1],
        "shared_params"),
    "buffer_names an int": (
        "zero3", lambda f: (_states(_model(f), "buffer_names", 5), _model(f))[1], "buffer_names"),
    "frozen fragment too small": (
        "zero3", lambda f: (edit_states(_model(f, 1), _first_fragment), _model(f, 1))[1],
        "frozen_param_fragments"),
    "module not a dict": (
        "zero2", lambda f: (_states(_model(f), "module", [1]), _model(f))[1], "module"),
    "dp_world_size a string": (
        "zero2", lambda f: (_states(_model(f), "dp_world_size", "2"), _model(f))[1],
        "dp_world_size"),
    "latest ..": ("zero3", lambda f: ((f / "latest").write_text(".."), f / "latest")[1], "'..'"),
    "latest not UTF-8": (
        "zero3", lambda f: ((f / "latest").write_bytes(b"\xff\xfe\x00"), f / "latest")[1], "UTF-8"),
    "rank file is a FIFO": (
        "zero3", lambda f: (make_fifo(_optim(f, 1)), _optim(f, 1))[1], "FIFO"),
}  # fmt: skip


def _overlap(meta) -> None:
    fqn = first_tensor(meta)
    move_chunk(meta, fqn, 1, (42, 0))  # rows 42 twice, row 85 never


def _huge_chunk(meta) -> None:
    fqn = first_tensor(meta)
    meta.state_dict_metadata[fqn].size = torch.Size([10**6, 10**6])
    meta.state_dict_metadata[fqn].chunks = meta.state_dict_metadata[fqn].chunks[:1]
    move_chunk(meta, fqn, 0, (0, 0), (10**6, 10**6))


def _set_chunk(field: str, value) -> Callable:
    def fn(meta) -> None:
        object.__setattr__(meta.state_dict_metadata[first_tensor(meta)].chunks[0], field, value)

    return fn


def _set_entry(field: str, value) -> Callable:
    return lambda meta: setattr(meta.state_dict_metadata[first_tensor(meta)], field, value)


def _storage(field: str, value) -> Callable:
    def fn(meta) -> None:
        info = next(iter(meta.storage_data.values()))
        object.__setattr__(info, field, value)

    return fn


def _int_key(meta) -> None:
    meta.state_dict_metadata[5] = meta.state_dict_metadata.pop(first_tensor(meta))


def _outside(meta) -> None:
    fqn = first_tensor(meta)
    move_chunk(meta, fqn, 2, (200, 0))


DCP_CASES: dict[str, tuple[Callable, str]] = {
    "overlapping chunks": (_overlap, "overlap"),
    "chunk [10^6, 10^6]": (_huge_chunk, "needs 4000000000000 bytes"),
    "chunk offsets a string": (_set_chunk("offsets", "ab"), "offsets"),
    "chunks an int": (_set_entry("chunks", 5), "chunks"),
    "size a string": (_set_entry("size", "x"), "size"),
    "key not a string": (_int_key, "state_dict_metadata"),
    "chunk outside the tensor": (_outside, "outside the tensor"),
    "relative_path escapes": (_storage("relative_path", "../x.distcp"), "relative_path"),
    "storage range past the file": (_storage("length", 10**9), "bytes"),
}


@pytest.fixture(scope="module")
def adapter_inputs(tmp_path_factory):
    return build_inputs(tmp_path_factory.mktemp("hostile-parsers"))


# every subcommand for these; merge alone (it opens every record) for the rest, to keep
# the suite's time small (each run is a fork of ~1 s)
EVERY_COMMAND = {"partition_count 2**40", "zero_stage 'abc'", "latest ..",
                 "rank file is a FIFO", "overlapping chunks", "chunk [10^6, 10^6]"}  # fmt: skip


def _commands(case: str, ckpt: Path, base: Path, dest: Path) -> list[list]:
    merge = ["merge", ckpt, "-o", dest, "--base", base]
    if case not in EVERY_COMMAND:
        return [merge]
    # validate could not run (exit 2), not a finding: the adapter it recomputes from is unusable
    return [merge, ["inspect", ckpt], ["convert", ckpt, "-o", dest],
            ["validate", base, "--base", base, "--adapter", ckpt]]  # fmt: skip


@pytest.mark.parametrize("case", list(ZERO_CASES))
def test_hostile_zero_records(deepspeed_2ranks, tmp_path, case):
    variant, mutate, field = ZERO_CASES[case]
    ckpt = copy_checkpoint(deepspeed_2ranks / variant, tmp_path / "ckpt")
    named = mutate(ckpt)
    dest = tmp_path / "out"
    base = deepspeed_2ranks / "base"
    for argv in _commands(case, ckpt, base, dest):
        assert_refused(argv, [ckpt, base], dest=dest, names=[named.name, field])


@pytest.mark.parametrize("case", list(DCP_CASES))
def test_hostile_dcp_metadata(fsdp_3ranks, tmp_path, case):
    mutate, field = DCP_CASES[case]
    ckpt = copy_checkpoint(fsdp_3ranks / "ckpt", tmp_path / "ckpt")
    edit_metadata(ckpt, mutate)
    dest = tmp_path / "out"
    base = fsdp_3ranks / "base"
    for argv in _commands(case, ckpt, base, dest):
        assert_refused(argv, [ckpt, base], dest=dest, names=[".metadata", field])


def test_dcp_distcp_fifo_is_refused_not_waited_on(fsdp_3ranks, tmp_path):
    ckpt = copy_checkpoint(fsdp_3ranks / "ckpt", tmp_path / "ckpt")
    make_fifo(ckpt / DCP_FOLDER / "__1_0.distcp")
    dest = tmp_path / "out"
    assert_refused(["merge", ckpt, "-o", dest], [ckpt], dest=dest, names=["__1_0.distcp", "FIFO"])


def test_dcp_output_is_deterministic(fsdp_3ranks, tmp_path):
    """The control for the tiling check: an untouched checkpoint converts the same twice."""
    ckpt = fsdp_3ranks / "ckpt"
    digests = []
    for i in range(2):
        out = tmp_path / f"out{i}"
        outcome = run_cli(["convert", ckpt, "-o", out])
        assert outcome.code == 0, outcome.stderr
        digests.append((out / "adapter_model.safetensors").read_bytes())
    assert digests[0] == digests[1]


# -- torch zip / .bin / the restricted unpickler -------------------------------------------------
def _nested_tuple_key(depth: int = 200) -> bytes:
    """{t200: 1} with t(i+1) = (t(i), t(i)): 1.7 KB whose key takes 2^200 steps to hash."""
    body = b")"
    for _ in range(depth):
        body += b"q\x01h\x01h\x01\x86"  # memo[1] = top; push it twice; TUPLE2
    return b"\x80\x02}q\x00" + body + b"K\x01s."


def _repr_bomb(depth: int = 60) -> bytes:
    """A REDUCE whose callable is a shared nested tuple: its full repr is 2^60 items."""
    body = b")"
    for _ in range(depth):
        body += b"q\x01h\x01h\x01\x86"
    return b"\x80\x02" + body + b")R."


def _hostile_adapter(inputs, root: Path, write: Callable[[Path], None]) -> Path:
    _, adapter = inputs
    folder = root / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    write(folder / "adapter_model.bin")
    return folder


def _stride0(path: Path) -> None:
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    torch.save({key: torch.zeros(1).expand(10**6, 10**6)}, path)


def _deflate_bomb(path: Path) -> None:
    """data.pkl DEFLATEd 1000:1 (no-op opcodes, then an empty dict)."""
    torch_file_with_pickle(path, {"a": torch.zeros(1)}, b"\x80\x02" + b"N0" * (2 << 20) + b"}.")
    _deflate_pickle(path, path)
    assert path.stat().st_size < 64 << 10


def _deflate_pickle(src: Path, dst: Path) -> None:
    """Re-zip a torch file with its data.pkl DEFLATEd (as a generic zip tool might)."""
    with zipfile.ZipFile(src) as zin:
        entries = [(i, zin.read(i)) for i in zin.infolist()]
    with zipfile.ZipFile(dst, "w") as zout:
        for info, data in entries:
            packed = info.filename.endswith("data.pkl")
            kind = zipfile.ZIP_DEFLATED if packed else zipfile.ZIP_STORED
            zout.writestr(info.filename, data, compress_type=kind)


BIN_CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "nested tuple key": (lambda p: torch_file_with_pickle(p, {}, _nested_tuple_key()), "hash"),
    "repr bomb": (lambda p: torch_file_with_pickle(p, {}, _repr_bomb()), "refused to call"),
    "stride-0 view of 10^12 elements": (_stride0, "1000000000000 elements"),
    "deflate bomb": (_deflate_bomb, "inflates"),
}


@pytest.mark.parametrize("case", list(BIN_CASES))
def test_hostile_adapter_bin(adapter_inputs, tmp_path, case):
    write, field = BIN_CASES[case]
    adapter = _hostile_adapter(adapter_inputs, tmp_path, write)
    base = adapter_inputs[0]
    dest = tmp_path / "out"
    assert (adapter / "adapter_model.bin").stat().st_size < 64 << 10
    for argv in (["merge", base, adapter, "-o", dest], ["inspect", adapter],
                 ["convert", adapter, "-o", dest, "--to", "peft"]):  # fmt: skip
        assert_refused(argv, [adapter, base], dest=dest, names=["adapter_model.bin", field],
                       seconds=10, memory_mb=512)  # fmt: skip
    # validate reports an unreadable weights file as a finding (exit 1), as for any
    # corrupt header; bounded and one FINDING line all the same
    outcome = run_cli(["validate", adapter], seconds=10, memory_mb=512)
    assert outcome.code == 1 and not outcome.timed_out, outcome.stderr
    assert "Traceback" not in outcome.stderr, outcome.stderr
    findings = [ln for ln in outcome.stdout.splitlines() if ln.startswith("FINDING")]
    assert len(findings) == 1 and "adapter_model.bin" in findings[0] and field in findings[0]


# -- index.json and non-regular files -------------------------------------------------------
def _copy_base(inputs, root: Path) -> Path:
    import shutil

    return Path(shutil.copytree(inputs[0], root / "base"))


INDEX_CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "nested 100k deep": (lambda p: p.write_text('{"weight_map": ' + "[" * 100_000 + "]" * 100_000
                                                + "}"), "nested"),
    "weight_map a list": (lambda p: p.write_text(json.dumps({"weight_map": [1]})), "weight_map"),
    "not an object": (lambda p: p.write_text("[1]"), "JSON object"),
    "not UTF-8": (lambda p: p.write_bytes(b'{"weight_map": "\xff"}'), "not valid JSON"),
    "a FIFO": (make_fifo, "FIFO"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(INDEX_CASES))
def test_hostile_index(adapter_inputs, tmp_path, case):
    write, field = INDEX_CASES[case]
    base = _copy_base(adapter_inputs, tmp_path)
    write(base / "model.safetensors.index.json")
    adapter = adapter_inputs[1]
    dest = tmp_path / "out"
    for argv in (["merge", base, adapter, "-o", dest], ["inspect", base]):
        assert_refused(argv, [base, adapter], dest=dest,
                       names=["model.safetensors.index.json", field])  # fmt: skip


def test_fifo_weights_file_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "model.safetensors"
    make_fifo(fifo)
    assert_refused(["inspect", fifo], [fifo], names=["model.safetensors", "FIFO"])


def test_inflate_ratio_keeps_real_compressed_pickles(tmp_path):
    """The control for the bomb: a re-zipped (DEFLATEd) real state dict still reads."""
    from lora_cli.io.torch_zip import TorchZipFile

    state = {f"layers.{i}.weight": torch.full((2,), float(i)) for i in range(200)}
    plain = tmp_path / "plain.bin"
    torch.save(state, plain)
    packed = tmp_path / "packed.bin"
    _deflate_pickle(plain, packed)
    with TorchZipFile(packed) as z:
        assert z.records.keys() == state.keys()
        assert torch.equal(z.read("layers.7.weight"), state["layers.7.weight"])
    with zipfile.ZipFile(packed) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("data.pkl"))
        assert info.compress_type == zipfile.ZIP_DEFLATED and info.compress_size < info.file_size
