"""The README's first command: the built-in example runs end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_runs_inspect_convert_merge_validate(tmp_path: Path) -> None:
    env = {**os.environ, "LORA_DEMO_DIR": str(tmp_path / "demo")}
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for step in ("lora inspect", "lora convert", "lora merge", "lora validate", "demo OK"):
        assert step in done.stdout, step
    # only the demo's own story: no progress bars leaking from transformers or the Hub
    assert "%|" not in done.stderr and "Loading weights" not in done.stderr, done.stderr[-2000:]
    assert (tmp_path / "demo" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "demo" / "merged" / "lora-checksums.sha256").is_file()
