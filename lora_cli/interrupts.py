"""Ctrl-C and SIGTERM: stop promptly, remove the temporaries, exit 130 or 143, never hang.

SIGTERM is what ``timeout``, ``docker stop``, Slurm and Kubernetes send; Python's default
dies at once (exit -15) and leaves the model-sized ``.OUT.lora-tmp-PID`` folder behind, so
it is raised as an interrupt like Ctrl-C and cleaned up the same way.

Raising from a signal handler is only safe where the interrupted code can unwind: an
exception thrown inside importlib's own frames can leak the import lock (seen: a weakref
callback of ``_get_module_lock`` swallowed the interrupt after taking the lock, and the
torch preload thread then waited forever), so there the interrupt is deferred and
re-delivered until the main thread is out of them. Once interrupted, the process leaves
with ``os._exit`` after its cleanup: interpreter shutdown would wait for the non-daemon
preload thread, which may still be inside ``import torch``. A watchdog guarantees the exit:
if the cleanup has not finished ``GRACE_SECONDS`` after the signal, it removes the
registered temporaries itself and exits.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import FrameType

GRACE_SECONDS = 10.0
RETRY_SECONDS = 0.05
MESSAGE = "interrupted; nothing was written to the destination"
_SIGNALS = ("SIGINT", "SIGTERM")

_received: int | None = None  # the first signal, once one came
_raised = False  # the interrupt was raised in the main thread
_reported = False  # its error line was printed
_temporaries: set[Path] = set()
_lock = threading.Lock()


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, raised in the main thread (a KeyboardInterrupt, so every
    ``except KeyboardInterrupt`` / ``finally`` cleanup runs as for Ctrl-C)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_code() -> int:
    """128 + the signal number: 130 for Ctrl-C, 143 for SIGTERM (a shell's convention)."""
    return 128 + (_received or signal.SIGINT)


def message() -> str:
    """The one error line's text; the CLI prints it (else the exit path does, once)."""
    global _reported
    _reported = True
    if _received == signal.SIGTERM:
        return "terminated (SIGTERM); nothing was written to the destination"
    return MESSAGE


def _report() -> None:
    if not _reported:
        with suppress(Exception):
            sys.stderr.write(f"error: {message()}\n")


def register_temporary(path: Path) -> None:
    """A folder or file the watchdog removes if the cleanup does not finish in time."""
    with _lock:
        _temporaries.add(Path(path))


def unregister_temporary(path: Path) -> None:
    with _lock:
        _temporaries.discard(Path(path))


def _in_importlib(frame: FrameType | None) -> bool:
    return frame is not None and frame.f_code.co_filename.startswith("<frozen importlib")


def _handler(signum: int, frame: FrameType | None) -> None:
    global _received, _raised
    if _received is None:
        _received = signum
        threading.Thread(target=_watchdog, name="lora-interrupt", daemon=True).start()
    if _raised:
        return  # already unwinding: let the cleanup finish (the watchdog bounds it)
    if _in_importlib(frame):
        return  # unsafe here; the watchdog delivers it again in a moment
    _raised = True
    raise Interrupted(_received)


def _watchdog() -> None:
    deadline = time.monotonic() + GRACE_SECONDS
    while time.monotonic() < deadline:
        time.sleep(RETRY_SECONDS)
        kill = getattr(signal, "pthread_kill", None)  # (not on Windows)
        if not _raised and _received is not None and kill is not None:
            with suppress(OSError, ValueError):  # to the main thread: wakes a blocking call
                kill(threading.main_thread().ident or 0, _received)
    _remove_temporaries()
    _report()
    with suppress(Exception):
        sys.stderr.flush()
    os._exit(exit_code())


def _remove_temporaries() -> None:
    with _lock:
        paths = list(_temporaries)
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with suppress(OSError):
                path.unlink()


def install() -> None:
    """Handle SIGINT and SIGTERM (call from the main thread). A signal the parent set to be
    ignored (``nohup``, a shell's background job) stays ignored."""
    for name in _SIGNALS:
        sig = getattr(signal, name, None)
        if sig is None:
            continue
        if signal.getsignal(sig) in (signal.SIG_IGN, None):
            continue
        signal.signal(sig, _handler)


@contextmanager
def exit_promptly_when_interrupted() -> Iterator[None]:
    """Around the whole command: once interrupted, flush and leave without interpreter
    shutdown (which would join a preload thread still importing torch)."""
    try:
        yield
    finally:
        if _received is not None:
            _remove_temporaries()
            _report()
            for stream in (sys.stdout, sys.stderr):
                with suppress(Exception):
                    stream.flush()
            os._exit(exit_code())
