"""Positional reads, writes and file-to-file copies: a fast path where the platform has one,
a plain fallback everywhere else, chosen once at import. Output bytes never depend on it.

``os.preadv`` / ``os.pwrite`` / ``os.copy_file_range`` are missing on Windows, and
``copy_file_range`` on macOS and older Pythons; the fallbacks (seek + readinto / write
under one lock, a bounded buffer copy) work wherever Python does. Callers reach these
through the module (``sysio.read_at(...)``) so a test can swap in the fallbacks
(``FALLBACKS``) and run the I/O and merge suites on them.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

COPY_CHUNK = 8 << 20

# The fallbacks move the file position that threads sharing an fd also use (merge reads
# ahead on a worker thread while the main thread copies from the same base shard).
_POSITION_LOCK = threading.Lock()


# -- opening: every file the tool reads is opened here ---------------------------------------
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)


def open_regular(path: Path | str) -> int:
    """A read-only descriptor on ``path``, refused unless it is a regular file.

    A FIFO where a shard, rank file or config is expected would block ``open`` (or the
    first read) forever, a character device (``/dev/zero``) reads without end, and a
    socket cannot be opened at all. ``O_NONBLOCK`` makes the open of a FIFO return at once
    so ``fstat`` can look at what was opened (no race between a check and the open); the
    flag is then cleared (it means nothing to a regular file).
    """
    from lora_cli.errors import FormatError

    try:
        fd = os.open(path, os.O_RDONLY | _NONBLOCK | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise FormatError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
            hint = "point at the file itself (reading a FIFO or device never ends)"
            raise FormatError(f"{path}: is a {kind}, not a regular file", hint)
        if _NONBLOCK:
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


_KINDS = {stat.S_IFIFO: "FIFO", stat.S_IFCHR: "character device", stat.S_IFBLK: "block device",
          stat.S_IFSOCK: "socket", stat.S_IFDIR: "folder"}  # fmt: skip


def open_binary(path: Path | str) -> BinaryIO:
    """``open(path, "rb")`` through ``open_regular``."""
    return os.fdopen(open_regular(path), "rb")


def read_file(path: Path | str, limit: int, what: str = "file") -> bytes:
    """The whole of a small regular file (configs, indexes, ``.metadata``, ``latest``),
    refused past ``limit`` bytes before anything is read."""
    from lora_cli.errors import FormatError

    with open_binary(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise FormatError(f"{path}: {what} is {size} bytes, over the {limit}-byte limit",
                              "this is not the file it is named after")  # fmt: skip
        data = f.read(size + 1)  # not limit + 1: read() allocates what it is asked for
    if len(data) > limit:  # grew while being read
        raise FormatError(f"{path}: {what} is over the {limit}-byte limit")
    return data


def regular_size(path: Path | str) -> int:
    """The size of a regular file (refused, like ``open_regular``, when it is not one)."""
    fd = open_regular(path)
    try:
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


# -- reads: fill ``view`` from ``offset`` (returns the bytes read; 0 at end of file) -----------
def _read_preadv(fd: int, view: memoryview, offset: int) -> int:
    return os.preadv(fd, [view], offset)


def _read_pread(fd: int, view: memoryview, offset: int) -> int:
    data = os.pread(fd, len(view), offset)
    view[: len(data)] = data
    return len(data)


def _read_seek(fd: int, view: memoryview, offset: int) -> int:
    with _POSITION_LOCK:
        os.lseek(fd, offset, os.SEEK_SET)
        with io.FileIO(fd, "rb", closefd=False) as f:
            return f.readinto(view) or 0


# -- writes: some of ``view`` at ``offset`` (returns the bytes written) ------------------------
def _write_pwrite(fd: int, view: memoryview, offset: int) -> int:
    return os.pwrite(fd, view, offset)


def _write_seek(fd: int, view: memoryview, offset: int) -> int:
    with _POSITION_LOCK:
        os.lseek(fd, offset, os.SEEK_SET)
        return os.write(fd, view)


def write_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += write_at(fd, view[done:], offset + done)


# -- copies: ``nbytes`` from one file to another, both positional -----------------------------
class ShortCopy(Exception):
    """The source ended before ``nbytes`` were copied."""


def _copy_buffered(src_fd: int, src_off: int, dst_fd: int, dst_off: int, nbytes: int) -> None:
    buf = memoryview(bytearray(min(COPY_CHUNK, nbytes) or 1))
    done = 0
    while done < nbytes:
        n = read_at(src_fd, buf[: min(len(buf), nbytes - done)], src_off + done)
        if n <= 0:
            raise ShortCopy
        write_all(dst_fd, buf[:n], dst_off + done)
        done += n


def _copy_kernel(src_fd: int, src_off: int, dst_fd: int, dst_off: int, nbytes: int) -> None:
    """copy_file_range: no bytes pass through user space (reflinks on btrfs/XFS); across
    filesystems or where the kernel refuses, the buffered copy."""
    done = 0
    try:
        while done < nbytes:
            n = os.copy_file_range(
                src_fd, dst_fd, min(nbytes - done, 1 << 30), src_off + done, dst_off + done
            )
            if n == 0:
                raise ShortCopy
            done += n
        return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    _copy_buffered(src_fd, src_off + done, dst_fd, dst_off + done, nbytes - done)


def _pick(fast: Callable, name: str, fallback: Callable) -> Callable:
    return fast if hasattr(os, name) else fallback


read_at = _pick(_read_preadv, "preadv", _pick(_read_pread, "pread", _read_seek))
write_at = _pick(_write_pwrite, "pwrite", _write_seek)
copy_range = _pick(_copy_kernel, "copy_file_range", _copy_buffered)

# What a platform without any fast path gets (tests run the suites on these).
FALLBACKS = {"read_at": _read_seek, "write_at": _write_seek, "copy_range": _copy_buffered}


def fast_paths() -> dict[str, str]:
    """Which implementation each operation uses here (for bench and bug reports)."""
    return {"read_at": read_at.__name__, "write_at": write_at.__name__,
            "copy_range": copy_range.__name__}  # fmt: skip
