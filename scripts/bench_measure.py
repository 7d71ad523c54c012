"""Measuring one child process tree: wall time, CPU time and peak RSS (imported by the bench
scripts, which never import torch themselves: see ``bench.run_helper``)."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

POLL_INTERVAL_S = 0.02


def _children_via_stat() -> dict[int, list[int]]:
    """ppid -> pids, scanning /proc: /proc/PID/task/TID/children is not built into every kernel."""
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        # comm may contain spaces and parentheses: the ppid is the 2nd field after the last ')'.
        rest = raw.rpartition(b")")[2].split()
        if len(rest) >= 2:
            tree.setdefault(int(rest[1]), []).append(int(entry.name))
    return tree


def _vm_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of one process in KiB; (0, 0) if it is gone or a zombie."""
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith(b"VmHWM:"):
                    hwm = int(line.split()[1])
    except (OSError, ValueError):
        pass
    return rss, hwm


class TreeRssPoller(threading.Thread):
    """Samples the summed VmRSS of a process and all its descendants until stopped.

    Sums the tree because a contender may fork workers (cp does not, python may). It also keeps
    each process's last-seen VmHWM (the kernel's own high-water mark, reset at exec): their sum is
    an upper bound of the tree peak that a 20 ms poll cannot miss, except for growth after the
    last sample. wait4/RUSAGE_CHILDREN ru_maxrss are no substitute: on Linux a child's maxrss
    starts at the *parent's* RSS at fork (it is carried across exec), and RUSAGE_CHILDREN is a
    high-water mark over every child this bench ever reaped.
    """

    def __init__(self, root: int, interval: float = POLL_INTERVAL_S) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.interval = interval
        self.peak_kib = 0
        self.hwm_kib: dict[int, int] = {}
        self.samples = 0
        self._stop_event = threading.Event()

    def sample(self) -> None:
        tree = _children_via_stat()
        todo, total = [self.root], 0
        while todo:
            pid = todo.pop()
            rss, hwm = _vm_kib(pid)
            total += rss
            if hwm:
                self.hwm_kib[pid] = max(hwm, self.hwm_kib.get(pid, 0))
            todo.extend(tree.get(pid, ()))
        self.peak_kib = max(self.peak_kib, total)
        self.samples += 1

    def run(self) -> None:
        while True:
            self.sample()
            if self._stop_event.wait(self.interval):
                return

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


@dataclass
class RunResult:
    """One timed execution of one contender."""

    ok: bool
    wall_s: float
    peak_rss_mib: float  # polled peak of the tree's summed VmRSS: what we report
    hwm_sum_mib: float  # sum of per-process VmHWM (upper bound; cross-check)
    wait4_maxrss_mib: float  # child's ru_maxrss, floored by this bench's RSS at fork
    rusage_children_maxrss_mib: float  # cumulative over all children so far
    returncode: int | None
    rss_samples: int
    # the child's own CPU and kernel counters from wait4 (whole process tree it waited for)
    user_s: float = 0.0
    sys_s: float = 0.0
    minor_faults: int = 0
    major_faults: int = 0
    vol_ctx_switches: int = 0
    invol_ctx_switches: int = 0
    stdout_tail: str = ""
    stderr_tail: str = ""
    error: str = ""


def text_tail(data: bytes, n: int = 2000) -> str:
    return data[-n:].decode("utf-8", errors="replace").strip()


def run_measured(
    cmd: list[str],
    timeout: float,
    env: dict[str, str],
    timed_sync: bool = False,
    tail_bytes: int = 2000,
) -> RunResult:
    """Run `cmd` as a child, timing wall clock and polling its process tree's RSS.

    os.wait4 is used instead of Popen.wait so the child's own rusage comes back with its exit.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        try:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=env,
                start_new_session=True,  # own process group, so a timeout kills the whole tree
            )
        except OSError as exc:
            return RunResult(False, 0.0, 0.0, 0.0, 0.0, 0.0, None, 0, error=f"cannot start: {exc}")
        poller = TreeRssPoller(proc.pid)
        poller.start()
        timed_out = threading.Event()

        def _kill() -> None:
            timed_out.set()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

        timer = threading.Timer(timeout, _kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            # Ctrl-C reaches only our process group (the child has its own session): take the
            # child's tree down with us instead of leaving it running.
            timer.cancel()
            _kill()
            poller.stop()
            os.waitpid(proc.pid, 0)
            proc.returncode = -signal.SIGKILL
            raise
        if timed_sync:
            os.sync()
        wall = time.perf_counter() - t0
        timer.cancel()
        poller.stop()
        rc = os.waitstatus_to_exitcode(status)
        proc.returncode = rc  # reaped by wait4; stop Popen from waiting again
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    error = f"timed out after {timeout:.0f} s" if timed_out.is_set() else ""
    if rc != 0 and not error:
        error = f"exit code {rc}"
    return RunResult(
        ok=rc == 0 and not timed_out.is_set(),
        wall_s=wall,
        peak_rss_mib=poller.peak_kib / 1024,
        hwm_sum_mib=sum(poller.hwm_kib.values()) / 1024,
        wait4_maxrss_mib=usage.ru_maxrss / 1024,
        rusage_children_maxrss_mib=children / 1024,
        returncode=rc,
        rss_samples=poller.samples,
        user_s=usage.ru_utime,
        sys_s=usage.ru_stime,
        minor_faults=usage.ru_minflt,
        major_faults=usage.ru_majflt,
        vol_ctx_switches=usage.ru_nvcsw,
        invol_ctx_switches=usage.ru_nivcsw,
        stdout_tail=text_tail(stdout, tail_bytes),
        stderr_tail=text_tail(stderr),
        error=error,
    )


def warm_cache(paths: list[Path]) -> float:
    """Read every input once with `cat` so each contender starts from the same warm page cache."""
    files = [str(p) for d in paths for p in sorted(d.iterdir()) if p.is_file()]
    t0 = time.perf_counter()
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.name.endswith(".safetensors"))
