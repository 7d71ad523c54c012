"""`lora extract` against mergekit's `mergekit-extract-lora` (issue 18), imported by
``scripts/bench.py`` (``--extract``, ``--extract-only``); run as a script it is the helper child
that measures an adapter's error (``bench_extract.py error BASE TUNED ADAPTER``).

The pair: BASE, the bench's synthetic bf16 Llama base, and TUNED = BASE merged with the bench's
all-linear rank-16 adapter (by ``lora merge``): a known rank-16 change plus bf16 rounding. Both
tools extract rank 16; each is timed (wall, CPU, peak RSS of its process tree) with the order
rotated every repetition, and each adapter's relative error ‖Δ − ΔW‖/‖Δ‖ over every tensor
that differs between BASE and TUNED is measured here, by code that is neither tool's (one tensor
at a time, Δ in fp32, ΔW from the adapter as PEFT defines it).

mergekit runs offline: the bench gives it absolute paths, because mergekit 0.1.5's model card
(``mergekit/card.py::is_hf``) treats any existing path that does not start with ``/`` or ``~``
and has at most one ``/`` (``bench-output/base-small``) as a possible Hub id and calls
``huggingface_hub.repo_exists`` on it after the extraction is done: with the network off that is
the crash at the very end (``OfflineModeIsEnabled`` under ``HF_HUB_OFFLINE=1``, a connection
error or a wait without it). Nothing else in its extraction path touches the Hub for a local
folder (it needs no tokenizer); ``HF_HUB_OFFLINE=1`` stays set so any future lookup fails at once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_measure import run_measured, warm_cache

RANK = 16  # the bench adapter's rank: TUNED - BASE is rank 16 plus rounding
PREFIX = "base_model.model."


def ensure_tuned(
    size: str, base: Path, adapter: Path, workdir: Path, lora: Path, timeout: float, env: dict
) -> tuple[Path, str | None]:
    """TUNED for ``size`` (made by ``lora merge``, reused while BASE's and the adapter's spec
    stamps are the ones it was made from); (path, error)."""
    tuned = workdir / f"tuned-{size}"
    stamp = workdir / f"tuned-{size}.spec.json"
    expected = {
        "base": _read(base.with_name(base.name + ".spec.json")),
        "adapter": _read(adapter.with_name(adapter.name + ".spec.json")),
    }
    with contextlib.suppress(OSError, ValueError):
        if json.loads(stamp.read_text()) == expected and (tuned / "config.json").is_file():
            return tuned, None
    stamp.unlink(missing_ok=True)
    shutil.rmtree(tuned, ignore_errors=True)
    cmd = [str(lora), "merge", str(base), str(adapter), "-o", str(tuned), "--quiet"]
    made = run_measured(cmd + ["--no-checksums"], timeout, env)
    if not made.ok:
        return tuned, f"could not make TUNED ({made.error}): {made.stderr_tail[-400:]}"
    stamp.write_text(json.dumps(expected))
    return tuned, None


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def commands(
    base: Path, tuned: Path, out: Path, lora: Path, mergekit: Path | None
) -> dict[str, tuple[list[str], Path]]:
    """Each tool's command line and output folder, with absolute paths (see the module
    docstring)."""
    base, tuned, out = base.resolve(), tuned.resolve(), out.resolve()
    ours = out.with_name(out.name + "-lora")
    cmds = {
        "lora extract": (
            [str(lora), "extract", str(base), str(tuned), "-o", str(ours)]
            + ["--rank", str(RANK), "--json", "--quiet"],
            ours,
        )
    }
    if mergekit is not None:
        theirs = out.with_name(out.name + "-mergekit")
        cmds["mergekit"] = (
            [str(mergekit), "--model", str(tuned), "--base-model", str(base)]
            + ["--out-path", str(theirs), "--max-rank", str(RANK)],
            theirs,
        )
    return cmds


def run(
    size: str,
    base: Path,
    adapter: Path,
    workdir: Path,
    lora: Path,
    args: argparse.Namespace,
    env: dict[str, str],
    info: dict[str, Any],
    save: Callable[[], None],
) -> None:
    """Time both tools ``args.repeats`` times (mergekit: ``args.mergekit_repeats`` when set) at
    ``size`` into ``info["extract"]`` (one row per tool), calling ``save()`` after every run;
    each tool's adapter error is measured once, after its first successful run (outside the
    timed window)."""
    rows: dict[str, Any] = {}
    info["extract"] = rows
    tuned, error = ensure_tuned(size, base, adapter, workdir, lora, args.timeout, env)
    if error:
        print(f"  extract: {error}", flush=True)
        info["extract_error"] = error
        save()
        return
    info["tuned_bytes"] = _bytes(tuned)
    warm_cache([tuned])
    out = workdir / f"out-{size}-extract"
    cmds = commands(base, tuned, out, lora, args.mergekit)
    env = dict(env, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    order = list(cmds)
    for rep in range(args.repeats):
        for name in order[rep % len(order) :] + order[: rep % len(order)]:
            row = rows.setdefault(name, {"wall_s": [], "peak_rss_mib": [], "cpu_s": []})
            if "error" in row:
                continue  # a broken contender is reported once, not re-run
            if name == "mergekit" and rep >= (args.mergekit_repeats or args.repeats):
                continue
            cmd, dest = cmds[name]
            shutil.rmtree(dest, ignore_errors=True)
            os.sync()
            r = run_measured(cmd, args.timeout, env, args.timed_sync, tail_bytes=1 << 20)
            if not r.ok:
                row["error"] = f"{r.error}: {(r.stderr_tail or r.stdout_tail)[-600:]}"
                print(f"  extract rep {rep + 1} {name:<13} FAILED {row['error']}", flush=True)
            else:
                row["wall_s"].append(r.wall_s)
                row["peak_rss_mib"].append(r.peak_rss_mib)
                row["cpu_s"].append(r.user_s + r.sys_s)
                print(
                    f"  extract rep {rep + 1} {name:<13} {r.wall_s:8.2f} s  peak "
                    f"{r.peak_rss_mib:8.0f} MiB",
                    flush=True,
                )
                if name == "lora extract" and "reported" not in row:
                    row["reported"] = _lora_totals(r.stdout_tail)
                if "measured" not in row:
                    row["adapter_bytes"] = _bytes(dest)
                    row["size_ratio"] = row["adapter_bytes"] / info["tuned_bytes"]
                    row["measured"] = measure_error(base, tuned, dest, env)
                _summarize(row)
            if not (args.keep and rep == args.repeats - 1):
                shutil.rmtree(dest, ignore_errors=True)
            save()


def _summarize(row: dict[str, Any]) -> None:
    if row["wall_s"]:
        row["median_wall_s"] = statistics.median(row["wall_s"])
        row["median_cpu_s"] = statistics.median(row["cpu_s"])
        row["max_peak_rss_mib"] = max(row["peak_rss_mib"])


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def _lora_totals(stdout: str) -> dict[str, Any] | None:
    """The totals `lora extract --json` reports (its own error and size ratio)."""
    with contextlib.suppress(ValueError, KeyError, TypeError):
        return json.loads(stdout)["totals"]
    found = re.search(r'"totals": (\{[^{}]*\})', stdout)
    with contextlib.suppress(ValueError, AttributeError):
        return json.loads(found.group(1))  # type: ignore[union-attr]
    return None


def measure_error(base: Path, tuned: Path, adapter: Path, env: dict[str, str]) -> dict[str, Any]:
    """``adapter_error`` in a child (it imports torch; this process must not, see
    bench.run_helper); a failure is reported, never fatal."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "error", str(base), str(tuned)]
    proc = subprocess.run(cmd + [str(adapter)], capture_output=True, env=env, check=False)
    lines = proc.stdout.decode("utf-8", errors="replace").strip().splitlines()
    if proc.returncode != 0 or not lines or not lines[-1].startswith("RESULT "):
        return {"problem": f"exit {proc.returncode}: {proc.stderr.decode()[-600:]}"}
    return json.loads(lines[-1][len("RESULT ") :])


def _pattern(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches a module path ending in it."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def adapter_error(base: Path, tuned: Path, adapter: Path) -> dict[str, Any]:
    """‖Δ − ΔW‖_F / ‖Δ‖_F over every tensor that differs between BASE and TUNED, one tensor at
    a time: Δ = TUNED − BASE in fp32; ΔW = alpha/r · B @ A for a LoRA pair (PEFT's scale,
    rank/alpha patterns and rsLoRA included), a saved full tensor minus BASE, or 0 when the
    adapter has nothing for it."""
    import torch
    from safetensors import safe_open

    config = json.loads((adapter / "adapter_config.json").read_text())
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    where: dict[str, Path] = {}
    for p in sorted(adapter.glob("*.safetensors")):
        with safe_open(str(p), framework="pt") as f:
            where.update(dict.fromkeys(f.keys(), p))

    def get(key: str) -> Any:
        with safe_open(str(where[key]), framework="pt") as f:
            return f.get_tensor(key).float()

    def files(folder: Path) -> dict[str, Path]:
        out: dict[str, Path] = {}
        for p in sorted(folder.glob("*.safetensors")):
            with safe_open(str(p), framework="pt") as f:
                out.update(dict.fromkeys(f.keys(), p))
        return out

    in_base, in_tuned = files(base), files(tuned)
    residual = energy = 0.0
    changed = covered = 0
    worst = (0.0, "")
    for name, path in in_tuned.items():
        with safe_open(str(path), framework="pt") as f:
            w_tuned = f.get_tensor(name)
        with safe_open(str(in_base[name]), framework="pt") as f:
            w_base = f.get_tensor(name)
        if torch.equal(w_tuned, w_base):
            continue
        changed += 1
        delta = w_tuned.float() - w_base.float()
        module = name.removesuffix(".weight")
        a_key, b_key = f"{PREFIX}{module}.lora_A.weight", f"{PREFIX}{module}.lora_B.weight"
        if a_key in where and b_key in where:
            a, b = get(a_key), get(b_key)
            r = _pattern(ranks, module, config["r"])
            alpha = _pattern(alphas, module, config["lora_alpha"])
            scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
            approx = scale * (b @ a)
            covered += 1
        elif f"{PREFIX}{name}" in where:
            approx = get(f"{PREFIX}{name}") - w_base.float()
            covered += 1
        else:
            approx = torch.zeros_like(delta)
        err2 = float((delta - approx).square().sum())
        norm2 = float(delta.square().sum())
        residual += err2
        energy += norm2
        if norm2 and math.sqrt(err2 / norm2) > worst[0]:
            worst = (math.sqrt(err2 / norm2), name)
    return {
        "relative_error": math.sqrt(residual / energy) if energy else 0.0,
        "changed_tensors": changed,
        "covered_tensors": covered,
        "worst_tensor": worst[1],
        "worst_tensor_error": worst[0],
    }


def _x(num: float | None, den: float | None) -> str:
    return f"{num / den:.2f}x" if num is not None and den else "n/a"


def _f(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def render(sizes: dict[str, dict[str, Any]]) -> str:
    """The extract table: per size and tool, median wall, CPU, peak RSS, the measured error and
    adapter size; then each size's mergekit/lora ratios and lora's peak RSS across sizes."""
    head = (
        f"{'size':<6} {'tool':<13} {'median s':>9} {'cpu s':>8} {'peak RSS MiB':>12} "
        f"{'rel. error':>10} {'(reported)':>10} {'adapter/TUNED':>13}  runs"
    )
    lines = ["extract: rank 16, TUNED = BASE + the all-linear r16 adapter merged", head]
    lines.append("-" * len(head))
    ratios: list[str] = []
    rss: list[tuple[str, float, float]] = []
    for size, info in sizes.items():
        rows = info.get("extract") or {}
        if info.get("extract_error"):
            lines.append(f"{size:<6} FAILED: {info['extract_error']}")
        for tool, row in rows.items():
            if "error" in row and not row["wall_s"]:
                lines.append(f"{size:<6} {tool:<13} FAILED: {row['error'][:300]}")
                continue
            measured = (row.get("measured") or {}).get("relative_error")
            reported = (row.get("reported") or {}).get("error")
            lines.append(
                f"{size:<6} {tool:<13} {_f(row.get('median_wall_s'), '.2f'):>9} "
                f"{_f(row.get('median_cpu_s'), '.1f'):>8} "
                f"{_f(row.get('max_peak_rss_mib'), '.0f'):>12} "
                f"{_f(measured, '.6f'):>10} {_f(reported, '.6f'):>10} "
                f"{_f(row.get('size_ratio'), '.4f'):>13}  {len(row['wall_s'])}"
                + (" (then FAILED)" if "error" in row else "")
            )
        lo, mk = rows.get("lora extract", {}), rows.get("mergekit", {})
        if mk:
            ratios.append(
                f"  {size:<6} mergekit/lora: {_x(mk.get('median_wall_s'), lo.get('median_wall_s'))}"
                f" time, {_x(mk.get('median_cpu_s'), lo.get('median_cpu_s'))} cpu, "
                f"{_x(mk.get('max_peak_rss_mib'), lo.get('max_peak_rss_mib'))} peak RSS"
            )
        if lo.get("max_peak_rss_mib"):
            rss.append((size, lo["max_peak_rss_mib"], info.get("base_gib") or 0.0))
    lines += ratios
    if len(rss) >= 2:
        (s0, r0, g0), (s1, r1, g1) = rss[0], rss[-1]
        lines.append(
            f"  lora extract peak RSS: {r0:.0f} MiB at {s0} ({g0:.2f} GiB base), {r1:.0f} MiB at "
            f"{s1} ({g1:.2f} GiB): {_x(r1, r0)} for {_x(g1, g0)} the bytes"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) != 4 or argv[0] != "error":
        raise SystemExit("usage: bench_extract.py error BASE TUNED ADAPTER")
    result = adapter_error(Path(argv[1]), Path(argv[2]), Path(argv[3]))
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
