"""Run one CLI invocation on a hostile input, as a stranger's file would reach a CI job.

Each case runs the real command line (``lora_cli.cli.main``) in a child forked from the test
process, so torch is already imported (no 3 s interpreter start per case) while the child still
has its own address space: its memory is capped with ``RLIMIT_AS`` (an allocation past the cap
fails instead of swapping the machine), it is killed when it overruns its time, and its peak
RSS comes back through ``wait4``. What ``assert_refused`` checks is the project's promise for
an expected failure: exit 2, exactly one ``error:`` line naming the file, no traceback, bounded
time and memory, inputs unchanged byte for byte, nothing at the destination.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import resource
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

# Generous: the suite shares 2 cores with other work. "Well under a second" work that regresses
# to exponential or unbounded time still blows through these by orders of magnitude.
DEFAULT_SECONDS = 15.0
DEFAULT_MEMORY_MB = 1024


@dataclass
class Outcome:
    code: int  # exit status; -N when killed by signal N
    stdout: str
    stderr: str
    seconds: float
    peak_rss_mb: float  # the child's own peak, inherited pages included
    timed_out: bool  # killed: past ``seconds``, or once ``kill_when`` was set

    @property
    def error_lines(self) -> list[str]:
        return [ln for ln in self.stderr.splitlines() if ln.startswith("error:")]


def _vm_size_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def run_cli(
    argv: Sequence[object],
    *,
    seconds: float = DEFAULT_SECONDS,
    memory_mb: int = DEFAULT_MEMORY_MB,
    env: dict[str, str] | None = None,
    kill_when: threading.Event | None = None,
) -> Outcome:
    """``lora ARGV`` in a forked child with an address-space cap of ``memory_mb`` beyond what
    the parent has mapped now, killed after ``seconds``, or as soon as ``kill_when`` is set
    (a test that kills a job at a chosen point need not wait out the time limit)."""
    args = [str(a) for a in argv]
    with tempfile.TemporaryDirectory(prefix="lora-hostile-") as tmp:
        out_path, err_path = Path(tmp) / "out", Path(tmp) / "err"
        limit = _vm_size_bytes() + memory_mb * 2**20
        sys.stdout.flush()
        sys.stderr.flush()
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:  # child: never returns
            code = 70
            try:
                os.setpgid(0, 0)
                for fd, path in ((1, out_path), (2, err_path)):
                    f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                    os.dup2(f, fd)
                    os.close(f)
                os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
                sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
                sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
                sys.stdin = open(0, closefd=False)  # noqa: SIM115
                resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
                os.environ.update(env or {})
                import torch

                torch.set_num_threads(1)  # OpenMP pools do not survive fork
                from lora_cli.cli import main

                sys.argv = ["lora", *args]
                try:
                    main()
                    code = 0
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                except BaseException:
                    import traceback

                    traceback.print_exc()
                    code = 1
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
        timed_out = False
        deadline = start + seconds
        while True:
            done, status, usage = os.wait4(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline or (kill_when is not None and kill_when.is_set()):
                timed_out = True
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                _, status, usage = os.wait4(pid, 0)
                break
            time.sleep(0.01)
        elapsed = time.monotonic() - start
        code = os.waitstatus_to_exitcode(status)
        return Outcome(
            code=code,
            stdout=out_path.read_text(errors="replace"),
            stderr=err_path.read_text(errors="replace"),
            seconds=elapsed,
            peak_rss_mb=usage.ru_maxrss / 1024,
            timed_out=timed_out,
        )


def digest(paths: Iterable[Path]) -> dict[str, str]:
    """Every file under ``paths`` (followed through symlinks) → sha256, plus each folder's
    listing, so a deleted, added or rewritten byte shows."""
    seen: dict[str, str] = {}
    for root in paths:
        root = Path(root)
        if not root.exists() and not root.is_symlink():
            seen[str(root)] = "<absent>"
            continue
        items = [root] if not root.is_dir() else [root, *sorted(root.rglob("*"))]
        for p in items:
            if p.is_dir():
                seen[str(p)] = "dir:" + ",".join(sorted(c.name for c in p.iterdir()))
            elif p.is_file():
                seen[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                seen[str(p)] = "special"
    return seen


def leftovers(dest: Path) -> list[Path]:
    """What a refused run left at or beside ``dest``: the output itself, its hidden
    temporaries (``.NAME.lora-tmp-*``) and parts folders."""
    found = [dest] if dest.exists() or dest.is_symlink() else []
    if dest.parent.is_dir():
        found += [
            p
            for p in dest.parent.iterdir()
            if p.name.startswith(f".{dest.name}.") or p.name.startswith(f"{dest.name}.lora-")
        ]
    return found


def assert_refused(
    argv: Sequence[object],
    inputs: Iterable[Path],
    *,
    dest: Path | None = None,
    names: Iterable[str] = (),
    code: int = 2,
    seconds: float = DEFAULT_SECONDS,
    memory_mb: int = DEFAULT_MEMORY_MB,
    env: dict[str, str] | None = None,
) -> Outcome:
    """The promise for an expected failure, checked whole; returns the outcome for more asserts.

    ``names``: strings the one error line must contain (the file, the tensor or field).
    """
    inputs = list(inputs)
    before = digest(inputs)
    outcome = run_cli(argv, seconds=seconds, memory_mb=memory_mb, env=env)
    shown = " ".join(map(str, argv))
    context = f"lora {shown}\nstdout:\n{outcome.stdout}\nstderr:\n{outcome.stderr}"
    assert not outcome.timed_out, f"ran past {seconds}s\n{context}"
    assert "Traceback" not in outcome.stderr, context
    assert outcome.code == code, f"exit {outcome.code}, wanted {code}\n{context}"
    assert len(outcome.error_lines) == 1, f"wanted exactly one error: line\n{context}"
    for name in names:
        assert name in outcome.error_lines[0], f"{name!r} not in the error line\n{context}"
    assert digest(inputs) == before, f"an input changed\n{context}"
    if dest is not None:
        assert leftovers(Path(dest)) == [], f"left behind: {leftovers(Path(dest))}\n{context}"
    return outcome
