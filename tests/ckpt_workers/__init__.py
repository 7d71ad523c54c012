"""Real training checkpoints for the tests, produced by the real tools at test time.

``deepspeed_checkpoints`` runs ``ds_train.py`` under ``torch.distributed.run`` (CPU,
gloo); the session fixtures in ``tests/conftest.py`` call it once per session.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

WORKERS = Path(__file__).parent


def _launch(world: int, worker: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "DS_BUILD_OPS": "0"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd = [*launcher, "--nproc_per_node", str(world), *worker]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def deepspeed_checkpoints(out: Path, world: int, variants: list[dict]) -> Path:
    """Train and save every variant with ``world`` processes; returns ``out``."""
    done = _launch(world, [str(WORKERS / "ds_train.py"), str(out), json.dumps(variants)])
    missing = [v["name"] for v in variants if not (out / v["name"] / "latest").is_file()]
    if missing:
        raise RuntimeError(
            f"DeepSpeed run failed ({done.returncode}), missing {missing}:\n{done.stderr[-3000:]}"
        )
    return out


def fsdp_checkpoint(out: Path, world: int) -> Path:
    """FSDP2 on a gloo CPU mesh, saved through torch.distributed.checkpoint: ``out/ckpt``."""
    done = _launch(world, [str(WORKERS / "fsdp_train.py"), str(out)])
    if not (out / "ckpt" / "pytorch_model_fsdp_0" / ".metadata").is_file():
        raise RuntimeError(f"FSDP run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return out
