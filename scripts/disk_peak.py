"""Disk peak of a `lora merge --part I/N --evict --push-to-hub` job on a Hub base.

The base (bench.py's generator, ``--disk-size`` GiB in ~100 MB shards) is served by the test
suite's fake Hub (``tests/fake_hub.py``, 127.0.0.1 only); each part job runs as its own
process against it, with its own empty Hugging Face cache, while a thread samples the bytes
on disk of that cache and the job's output folders. Reported as ratios: the peak over the
base's size, and over one input shard plus one output shard (the largest of each), which is
what the design promises. Run through ``scripts/bench.py --disk-peak``.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
POLL_S = 0.002


def bytes_on_disk(roots: list[Path]) -> int:
    total = 0
    for root in roots:
        for folder, _, files in os.walk(root):
            for name in files:
                with contextlib.suppress(FileNotFoundError):
                    total += os.lstat(os.path.join(folder, name)).st_blocks * 512
    return total


def watched_run(cmd: list[str], env: dict[str, str], roots: list[Path]) -> tuple[int, int, str]:
    """(exit code, peak bytes on disk under ``roots`` while ``cmd`` ran, stderr tail)."""
    peak = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, bytes_on_disk(roots))
            time.sleep(POLL_S)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    done.set()
    thread.join()
    return proc.returncode, max(peak, bytes_on_disk(roots)), proc.stderr[-2000:]


def measure(workdir: Path, spec: Any, parts: int, base: Path, adapter: Path) -> dict[str, Any]:
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from fake_hub import serve

    lora = str(Path(sys.executable).parent / "lora")
    run_dir = workdir / "disk-peak"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    shard_sizes = [p.stat().st_size for p in base.glob("*.safetensors")]
    base_bytes = bytes_on_disk([base])
    jobs = []
    with serve(run_dir / "hub") as hub:
        hub.add_folder("bench/base", base)
        env = dict(os.environ, HF_ENDPOINT=hub.endpoint, HF_HUB_DISABLE_XET="1")
        env.pop("HF_HUB_OFFLINE", None)
        out = run_dir / "merged"
        for i in range(1, parts + 1):
            cache = run_dir / f"cache-{i}"  # a fresh runner: nothing cached
            env_i = dict(env, HF_HUB_CACHE=str(cache))
            cmd = [lora, "merge", "bench/base", str(adapter), "-o", str(out), "--quiet"]
            cmd += ["--part", f"{i}/{parts}", "--evict", "--push-to-hub", "bench/merged"]
            roots = [cache, run_dir / "merged.lora-parts"]
            t0 = time.perf_counter()
            code, peak, err = watched_run(cmd, env_i, roots)
            if code != 0:
                raise SystemExit(f"part {i}/{parts} failed ({code}): {err}")
            rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB, max so far
            jobs.append({"part": f"{i}/{parts}", "peak_bytes": peak, "peak_rss_kib_so_far": rss,
                         "seconds": round(time.perf_counter() - t0, 1)})  # fmt: skip
            shutil.rmtree(cache, ignore_errors=True)
        cmd = [lora, "merge", "bench/base", str(adapter), "-o", str(out), "--join",
               "--push-to-hub", "bench/merged", "--quiet"]  # fmt: skip
        code, join_peak, err = watched_run(cmd, dict(env, HF_HUB_CACHE=str(run_dir / "cache-j")),
                                           [run_dir / "cache-j", out])  # fmt: skip
        if code != 0:
            raise SystemExit(f"join failed ({code}): {err}")
        files = hub.files("bench/merged")
        pushed = sum(len(v) for k, v in files.items() if k.endswith(".safetensors"))
    shutil.rmtree(run_dir, ignore_errors=True)
    worst = max(j["peak_bytes"] for j in jobs)
    one_in_one_out = 2 * max(shard_sizes)  # the merge keeps shard sizes
    return {
        "base_bytes": base_bytes,
        "shards": len(shard_sizes),
        "largest_shard_bytes": max(shard_sizes),
        "parts": parts,
        "jobs": jobs,
        "join_peak_bytes": join_peak,
        "pushed_shard_bytes": pushed,
        "peak_over_base": round(worst / base_bytes, 3),
        "peak_over_one_in_one_out": round(worst / one_in_one_out, 2),
    }


def render(result: dict[str, Any]) -> str:
    gib = 1 << 30
    lines = [
        f"disk peak, --part I/{result['parts']} --evict --push-to-hub on a "
        f"{result['base_bytes'] / gib:.2f} GiB base ({result['shards']} shards, largest "
        f"{result['largest_shard_bytes'] / 2**20:.0f} MiB):"
    ]
    for job in result["jobs"]:
        lines.append(
            f"  part {job['part']}: peak {job['peak_bytes'] / 2**20:.0f} MiB "
            f"({job['peak_bytes'] / result['base_bytes']:.3f} × base), {job['seconds']} s, "
            f"peak RSS so far {job['peak_rss_kib_so_far'] / 1024:.0f} MiB"
        )
    lines.append(
        f"  worst part: {result['peak_over_base']} × base, "
        f"{result['peak_over_one_in_one_out']} × (largest input shard + largest output shard); "
        f"join: {result['join_peak_bytes'] / 2**20:.1f} MiB"
    )
    return "\n".join(lines)


def main(workdir: Path, spec: Any, parts: int, base: Path, adapter: Path, json_path: Path) -> int:
    result = measure(workdir, spec, parts, base, adapter)
    print(render(result))
    json_path.write_text(json.dumps({"disk_peak": result}, indent=2) + "\n")
    print(f"wrote {json_path}")
    return 0
