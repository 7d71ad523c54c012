"""The streaming shard writer and the all-or-nothing output folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file

from lora_cli.errors import FormatError, LoraError, UsageError
from lora_cli.io.destination import check_destination
from lora_cli.io.dtypes import SAFETENSORS_DTYPES, from_torch, to_torch
from lora_cli.io.writer import (
    TMP_MARK,
    OutputDir,
    ShardWriter,
    copy_range,
    remove_stale_temporaries,
)

DEAD_PID = 2**30  # above the kernel's pid_max limit (2**22): never a live process


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "b.weight": torch.randn(4, 3, generator=g),
        "a.bias": torch.randn(3, generator=g).to(torch.bfloat16),
        "ids": torch.arange(5),
        "flag": torch.tensor([True, False]),
        "empty": torch.zeros(0, 2, dtype=torch.float16),
        "scalar": torch.tensor(7.0, dtype=torch.float64),
    }


def _specs(tensors):
    return [(k, from_torch(v.dtype), tuple(v.shape)) for k, v in tensors.items()]


def _write_all(path: Path, tensors, order=None, metadata=None) -> None:
    w = ShardWriter(path, _specs(tensors), metadata)
    for name in order or tensors:
        w.write(name, tensors[name])
    w.close()


def _assert_loads(path: Path, tensors) -> None:
    loaded = load_file(path)
    assert set(loaded) == set(tensors)
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k
    with safe_open(path, "pt") as f:
        assert f.metadata()["format"] == "pt"
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k), v)


# --- ShardWriter ---------------------------------------------------------------------------


def test_round_trip_loads_with_safe_open_and_load_file(tmp_path):
    tensors = _tensors()
    path = tmp_path / "m.safetensors"
    _write_all(path, tensors)
    _assert_loads(path, tensors)
    # byte-identical to the reference writer
    assert path.read_bytes() == save(tensors, metadata={"format": "pt"})


def test_tensors_may_arrive_in_any_order(tmp_path):
    tensors = _tensors()
    path = tmp_path / "m.safetensors"
    _write_all(path, tensors, order=sorted(tensors, reverse=True))
    _assert_loads(path, tensors)
    assert path.read_bytes() == save(tensors, metadata={"format": "pt"})


def test_non_contiguous_tensor_is_written_in_c_order(tmp_path):
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    path = tmp_path / "m.safetensors"
    w = ShardWriter(path, [("t", "F32", (4, 3))])
    w.write("t", t)
    w.close()
    assert torch.equal(load_file(path)["t"], t)


def test_metadata_is_written(tmp_path):
    path = tmp_path / "m.safetensors"
    _write_all(path, {"a": torch.ones(1)}, metadata={"format": "pt", "x": "a"})
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt", "x": "a"}


def test_missing_tensor_at_close_is_an_error(tmp_path):
    tensors = _tensors()
    w = ShardWriter(tmp_path / "m.safetensors", _specs(tensors))
    for name in list(tensors)[1:]:
        w.write(name, tensors[name])
    with pytest.raises(FormatError, match=r"1 planned tensors were never written.*b\.weight"):
        w.close()
    w.abort()  # harmless after a failed close


@pytest.mark.parametrize(
    "name, value, needle",
    [
        ("a", torch.ones(3), "has 12 bytes, planned 8"),  # wrong byte count
        ("a", torch.ones(2, dtype=torch.int32), "is I32"),  # same bytes, wrong dtype
        ("a", torch.ones(2, 1), r"\(2, 1\)"),  # same bytes, wrong shape
        ("zzz", torch.ones(2), "not planned"),
    ],
)
def test_wrong_tensor_is_refused(tmp_path, name, value, needle):
    w = ShardWriter(tmp_path / "m.safetensors", [("a", "F32", (2,))])
    with pytest.raises(FormatError, match=needle):
        w.write(name, value)
    w.abort()


def test_a_tensor_cannot_be_written_twice(tmp_path):
    w = ShardWriter(tmp_path / "m.safetensors", [("a", "F32", (2,)), ("b", "F32", (1,))])
    w.write("a", torch.ones(2))
    with pytest.raises(FormatError, match="already written"):
        w.write("a", torch.ones(2))
    w.abort()


def test_write_after_close_is_refused_and_close_is_not_repeated(tmp_path):
    w = ShardWriter(tmp_path / "m.safetensors", [("a", "F32", (1,))])
    w.write("a", torch.ones(1))
    w.close()
    with pytest.raises(FormatError, match="after the shard was closed"):
        w.write("a", torch.ones(1))
    with pytest.raises(FormatError, match="closed twice"):
        w.close()
    # the file descriptor is not closed a second time (it may belong to someone else now)
    other = os.open(tmp_path / "m.safetensors", os.O_RDONLY)
    try:
        w.abort()
        os.fstat(other)
    finally:
        os.close(other)


def test_existing_file_is_never_truncated(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"precious")
    with pytest.raises(LoraError):
        ShardWriter(path, [("a", "F32", (1,))])
    assert path.read_bytes() == b"precious"


def test_copy_from_copies_raw_bytes_from_another_file(tmp_path):
    tensors = _tensors()
    src = tmp_path / "src.safetensors"
    save_file(tensors, src, metadata={"format": "pt"})
    with safe_open(src, "pt") as f:
        assert set(f.keys()) == set(tensors)
    from lora_cli.io.safetensors_format import read_header

    header = read_header(src)
    dst = tmp_path / "dst.safetensors"
    w = ShardWriter(dst, _specs(tensors))
    fd = os.open(src, os.O_RDONLY)
    try:
        for name, e in header.entries.items():
            w.copy_from(name, fd, header.data_start + e.start, e.nbytes)
    finally:
        os.close(fd)
    w.close()
    _assert_loads(dst, tensors)


def test_copy_from_checks_the_byte_count(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 64)
    w = ShardWriter(tmp_path / "m.safetensors", [("a", "F32", (2,))])
    fd = os.open(src, os.O_RDONLY)
    try:
        with pytest.raises(FormatError, match="has 4 bytes, planned 8"):
            w.copy_from("a", fd, 0, 4)
    finally:
        os.close(fd)
        w.abort()


def test_copy_range_refuses_a_short_source(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"abc")
    dst = tmp_path / "dst.bin"
    sfd = os.open(src, os.O_RDONLY)
    dfd = os.open(dst, os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(FormatError, match="ended early"):
            copy_range(sfd, 0, dfd, 0, 10)
    finally:
        os.close(sfd)
        os.close(dfd)


def test_copy_range_fallback_without_copy_file_range(tmp_path, no_fast_io):
    src = tmp_path / "src.bin"
    src.write_bytes(bytes(range(256)) * 3)
    dst = tmp_path / "dst.bin"
    sfd = os.open(src, os.O_RDONLY)
    dfd = os.open(dst, os.O_WRONLY | os.O_CREAT)
    try:
        copy_range(sfd, 10, dfd, 5, 700)
    finally:
        os.close(sfd)
        os.close(dfd)
    assert dst.read_bytes() == b"\0" * 5 + src.read_bytes()[10:710]


# --- OutputDir ----------------------------------------------------------------------------


def _temps(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if TMP_MARK in p.name)


def test_output_dir_appears_only_on_success(tmp_path):
    final = tmp_path / "out"
    with OutputDir(final) as out:
        assert out.path.parent == tmp_path and out.path.name.startswith(".out" + TMP_MARK)
        (out.path / "f.txt").write_text("hi")
        assert not final.exists()
    assert (final / "f.txt").read_text() == "hi"
    assert _temps(tmp_path) == []


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_output_dir_is_removed_on_error_and_ctrl_c(tmp_path, exc):
    final = tmp_path / "out"
    with pytest.raises(type(exc)), OutputDir(final) as out:
        (out.path / "f.txt").write_text("partial")
        raise exc
    assert not final.exists()
    assert _temps(tmp_path) == []


def test_overwrite_replaces_an_existing_folder(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with OutputDir(final, overwrite=True) as out:
        (out.path / "new.txt").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert _temps(tmp_path) == []


def test_failed_overwrite_keeps_the_old_folder(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), OutputDir(final, overwrite=True):
        raise RuntimeError
    assert (final / "old.txt").read_text() == "old"


def test_output_that_appears_while_running_is_not_replaced(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(UsageError, match="appeared"), OutputDir(final) as out:
        (out.path / "f").write_text("x")
        final.mkdir()
        (final / "theirs").write_text("x")
    assert sorted(p.name for p in final.iterdir()) == ["theirs"]
    assert _temps(tmp_path) == []


def test_stale_temporaries_of_dead_runs_are_removed(tmp_path):
    final = tmp_path / "out"
    dead_dir = tmp_path / f".out{TMP_MARK}{DEAD_PID}"
    dead_dir.mkdir()
    (dead_dir / "model.safetensors").write_bytes(b"x" * 10)
    dead_old = tmp_path / f".out{TMP_MARK}{DEAD_PID + 1}.old"
    dead_old.mkdir()
    dead_file = tmp_path / f".out{TMP_MARK}{DEAD_PID + 2}"
    dead_file.write_bytes(b"x")
    live = tmp_path / f".out{TMP_MARK}{os.getppid()}"  # our parent is alive
    live.mkdir()
    other = tmp_path / f".other{TMP_MARK}{DEAD_PID}"  # another output's temporary
    other.mkdir()
    with OutputDir(final):
        pass
    assert _temps(tmp_path) == sorted([live.name, other.name])
    remove_stale_temporaries(tmp_path / "other")
    assert _temps(tmp_path) == [live.name]


def test_temporary_of_a_killed_process_is_cleaned_by_the_next_run(tmp_path):
    """A run killed with SIGKILL leaves its temporary; the next one removes it."""
    script = (
        "import os, sys; from pathlib import Path; from lora_cli.io.writer import OutputDir\n"
        "d = OutputDir(Path(sys.argv[1])).__enter__()\n"
        "(d.path / 'x').write_text('x'); print(d.path, flush=True); os._exit(0)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "out")],
        capture_output=True,
        text=True,
        check=True,
    )
    left = Path(proc.stdout.strip())
    assert left.is_dir()
    with OutputDir(tmp_path / "out") as out:
        (out.path / "y").write_text("y")
    assert not left.exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["y"]


# --- check_destination --------------------------------------------------------------------


def test_check_destination_accepts_a_new_path(tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    check_destination(tmp_path / "out", False, [inp])


def test_check_destination_refuses_an_existing_output_without_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(UsageError, match="already exists.*--overwrite"):
        check_destination(tmp_path / "out", False, [])
    check_destination(tmp_path / "out", True, [])


def test_check_destination_refuses_a_missing_parent(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        check_destination(tmp_path / "no" / "out", False, [])


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permissions")
def test_check_destination_refuses_an_unwritable_parent(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(UsageError, match="permission denied"):
            check_destination(ro / "out", False, [])
    finally:
        ro.chmod(0o700)


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize(
    "output, inp",
    [
        ("model", "model"),  # the input folder itself
        ("model/sub", "model"),  # inside the input folder
        ("model/pytorch_model.bin", "model/pytorch_model.bin"),  # the input file
        ("model", "model/pytorch_model.bin"),  # the folder holding the input file
        (".", "model"),  # an ancestor of the input
        (".", "model/pytorch_model.bin"),
        ("link", "model"),  # a symlink to the input folder (refused as a symlink)
        ("link/sub", "model"),
    ],
)
def test_check_destination_never_targets_an_input(tmp_path, output, inp, overwrite):
    """With --overwrite, replacing a folder that holds the input would destroy the input."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "pytorch_model.bin").write_bytes(b"w")
    (tmp_path / "link").symlink_to(model)
    with pytest.raises(UsageError, match="input|symbolic link"):
        check_destination(tmp_path / output, overwrite, [tmp_path / inp])


def test_check_destination_allows_an_output_beside_a_file_input(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    weights = model / "pytorch_model.bin"
    weights.write_bytes(b"w")
    check_destination(model / "converted", False, [weights])


_WHOLE_BYTE = [
    name
    for name, (bits, attr) in SAFETENSORS_DTYPES.items()
    if bits % 8 == 0 and attr and hasattr(torch, attr)
]


@pytest.mark.parametrize("dtype", _WHOLE_BYTE)
def test_every_dtype_is_byte_identical_to_safetensors(tmp_path, dtype):
    g = torch.Generator().manual_seed(1)
    raw = torch.randint(0, 2 if dtype == "BOOL" else 256, (3, 16), dtype=torch.uint8, generator=g)
    tensors = {"x": raw.view(to_torch(dtype)), "y": torch.ones(3)}
    try:
        expected = save(tensors, metadata={"format": "pt"})
    except (KeyError, ValueError, TypeError):  # the oracle predates this dtype
        import safetensors

        pytest.skip(f"safetensors {safetensors.__version__} cannot write {dtype} tensors")
    path = tmp_path / "m.safetensors"
    _write_all(path, tensors)
    assert path.read_bytes() == expected
