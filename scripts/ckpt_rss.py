"""Peak memory of `lora merge` on a ZeRO-3 checkpoint many times larger than its biggest
tensor: trains a wider tiny Llama under DeepSpeed (2 CPU ranks), then runs the merge in a
child process and reports its peak RSS (resource.getrusage) against the sizes involved.

    .venv/bin/python scripts/ckpt_rss.py [WORKDIR [LAYERS]]

Run it with two layer counts to see the peak stay flat while the checkpoint grows.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

SIZES = {"vocab_size": 8192, "hidden_size": 512, "intermediate_size": 1536,
         "num_hidden_layers": 8}  # fmt: skip


_MEASURE = ("import resource, subprocess, sys; "
            "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")  # fmt: skip


def peak_rss_mib(cmd: list[str]) -> float:
    """Peak RSS of ``cmd`` alone (measured by a fresh parent that runs only it)."""
    done = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], check=True,
                          capture_output=True, text=True)  # fmt: skip
    return int(done.stdout.split()[-1]) / 1024


def main() -> None:
    from ckpt_workers import deepspeed_checkpoints

    work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp())
    if len(sys.argv) > 2:
        SIZES["num_hidden_layers"] = int(sys.argv[2])
    if not (work / "zero3" / "latest").is_file():
        deepspeed_checkpoints(work, 2, [{"name": "zero3", "stage": 3, "sizes": SIZES}])
    ckpt = work / "zero3"
    files = list((ckpt / "global_step2").iterdir())
    total = sum(f.stat().st_size for f in files)
    biggest = SIZES["vocab_size"] * SIZES["hidden_size"] * 4
    baseline = peak_rss_mib([sys.executable, "-c", "import torch, lora_cli.cli"])
    out = work / "merged"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    lora = str(Path(sys.executable).parent / "lora")
    peak = peak_rss_mib([lora, "merge", str(ckpt), "-o", str(out), "--base", str(work / "base"),
                         "-q", "--device", "cpu"])  # fmt: skip
    merged = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    mib = 1 << 20
    print(f"checkpoint files {total / mib:.0f} MiB (merged model {merged / mib:.0f} MiB, "
          f"largest tensor {biggest / mib:.0f} MiB)")  # fmt: skip
    print(f"peak RSS: python+torch import {baseline:.0f} MiB, lora merge {peak:.0f} MiB "
          f"(+{peak - baseline:.0f} MiB over the import)")  # fmt: skip


if __name__ == "__main__":
    main()
