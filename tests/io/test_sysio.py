"""Portable I/O: every fast path and its fallback give the same bytes, and the fallbacks
are chosen when the platform lacks os.preadv / os.pread / os.pwrite / os.copy_file_range."""

from __future__ import annotations

import os
import threading

import pytest

from lora_cli.io import sysio

DATA = bytes(range(256)) * 4099  # ~1 MiB, not a multiple of any chunk


def _fds(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(DATA)
    return os.open(src, os.O_RDONLY), os.open(tmp_path / "dst.bin", os.O_RDWR | os.O_CREAT)


@pytest.mark.parametrize("read", ["_read_preadv", "_read_pread", "_read_seek"])
def test_reads_agree(tmp_path, read) -> None:
    if read != "_read_seek" and not hasattr(os, read.split("_")[-1]):
        pytest.skip("not on this platform")
    src, dst = _fds(tmp_path)
    try:
        buf = bytearray(1000)
        assert getattr(sysio, read)(src, memoryview(buf), 12345) == 1000
        assert bytes(buf) == DATA[12345:13345]
        assert getattr(sysio, read)(src, memoryview(buf), len(DATA)) == 0  # end of file
    finally:
        os.close(src)
        os.close(dst)


@pytest.mark.parametrize("copy", ["_copy_kernel", "_copy_buffered"])
@pytest.mark.parametrize("write", ["_write_pwrite", "_write_seek"])
def test_copies_and_writes_agree(tmp_path, monkeypatch, copy, write) -> None:
    if copy == "_copy_kernel" and not hasattr(os, "copy_file_range"):
        pytest.skip("no copy_file_range here")
    monkeypatch.setattr(sysio, "write_at", getattr(sysio, write))
    monkeypatch.setattr(sysio, "COPY_CHUNK", 1000)  # many chunks
    src, dst = _fds(tmp_path)
    try:
        sysio.write_all(dst, memoryview(b"head"), 0)
        getattr(sysio, copy)(src, 7, dst, 4, len(DATA) - 7)
        with pytest.raises(sysio.ShortCopy):
            getattr(sysio, copy)(src, len(DATA) - 3, dst, 2 * len(DATA), 10)
    finally:
        os.close(src)
        os.close(dst)
    assert (tmp_path / "dst.bin").read_bytes()[: len(DATA) - 3] == b"head" + DATA[7:]


def test_seek_fallbacks_are_safe_across_threads(tmp_path, no_fast_io) -> None:
    """Merge reads ahead on a worker thread from the fd the main thread copies from."""
    src, dst = _fds(tmp_path)
    errors = []

    def reader(start: int) -> None:
        buf = bytearray(4096)
        for k in range(200):
            off = (start + k * 4096) % (len(DATA) - 4096)
            no_fast_io.read_at(src, memoryview(buf), off)
            if bytes(buf) != DATA[off : off + 4096]:
                errors.append(off)

    threads = [threading.Thread(target=reader, args=(s,)) for s in (0, 777, 5555)]
    try:
        for t in threads:
            t.start()
        no_fast_io.copy_range(src, 0, dst, 0, len(DATA))
        for t in threads:
            t.join()
    finally:
        os.close(src)
        os.close(dst)
    assert errors == []
    assert (tmp_path / "dst.bin").read_bytes() == DATA


def test_fast_paths_are_used_where_they_exist() -> None:
    chosen = sysio.fast_paths()
    if hasattr(os, "preadv"):
        assert chosen["read_at"] == "_read_preadv"
    if hasattr(os, "copy_file_range"):
        assert chosen["copy_range"] == "_copy_kernel"


# -- every read opens a regular file, or refuses at once ------------------------------------
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX FIFOs")
def test_a_fifo_is_refused_without_blocking(tmp_path):
    from lora_cli.errors import FormatError

    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(FormatError, match="FIFO, not a regular file"):
        sysio.open_regular(fifo)  # no writer: a plain open would block here
    with pytest.raises(FormatError, match="FIFO"):
        sysio.read_file(fifo, 100)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_a_device_and_a_folder_are_refused(tmp_path):
    from lora_cli.errors import FormatError

    with pytest.raises(FormatError, match="character device"):
        sysio.open_regular("/dev/zero")
    with pytest.raises(FormatError, match="folder"):
        sysio.open_regular(tmp_path)


def test_read_file_refuses_past_its_limit(tmp_path):
    from lora_cli.errors import FormatError

    path = tmp_path / "latest"
    path.write_bytes(b"x" * 11)
    assert sysio.read_file(path, 11) == b"x" * 11
    with pytest.raises(FormatError, match="over the 10-byte limit"):
        sysio.read_file(path, 10)
