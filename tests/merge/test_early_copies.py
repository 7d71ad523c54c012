"""While torch imports (``preload``), merge plans and copies untouched tensors without it.

The early copies change only when bytes are written, never which: the output must be
byte-identical to a merge that copied nothing early, its checksum manifest must hold, and
the deferred NaN/Inf scan of the adapter must still refuse before any merged tensor, with
nothing left at the destination.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_owned
from rel_helpers import build_inputs, tree_digest
from safetensors.torch import save_file

from lora_cli.errors import MergeError
from lora_cli.merge import run
from lora_cli.stages.merge import merge


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return build_inputs(tmp_path_factory.mktemp("early"))


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _loading_for(monkeypatch, calls: int) -> list[str]:
    """Pretend torch is importing for the first ``calls`` checks; returns (filled after the
    merge) the names ``_copy_while_torch_loads`` copied before any merged tensor."""
    left = [calls]
    early: list[str] = []

    def loading() -> bool:
        left[0] -= 1
        return left[0] >= 0

    monkeypatch.setattr(run, "torch_loading", loading)
    real = run._copy_while_torch_loads

    def spy(*args):
        written, done = real(*args)
        early.extend(sorted(done))
        return written, done

    monkeypatch.setattr(run, "_copy_while_torch_loads", spy)
    return early


@pytest.mark.parametrize("calls", [3, 10_000])  # a few copies early; every copy early
def test_early_copies_give_the_same_bytes(inputs, tmp_path, monkeypatch, calls) -> None:
    base, adapter = inputs
    merge(base, adapter, tmp_path / "plain", device="cpu")
    early = _loading_for(monkeypatch, calls)
    result = merge(base, adapter, tmp_path / "early", device="cpu")
    copies = result.counts["copy"]
    assert 0 < len(early) < copies if calls == 3 else len(early) == copies, (early, copies)
    assert _files(tmp_path / "early") == _files(tmp_path / "plain")
    subprocess.run(
        ["sha256sum", "-c", "--quiet", "lora-checksums.sha256"], cwd=tmp_path / "early", check=True
    )


def test_nan_adapter_is_refused_after_early_copies(inputs, tmp_path, monkeypatch) -> None:
    base, adapter = inputs
    bad = tmp_path / "adapter"
    bad.mkdir()
    for p in adapter.iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    tensors = load_owned(bad / "adapter_model.safetensors")
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = float("inf")
    save_file(tensors, bad / "adapter_model.safetensors")
    before = tree_digest(base, bad)
    early = _loading_for(monkeypatch, 10_000)
    with pytest.raises(MergeError, match=r"1 NaN/Inf"):
        merge(base, bad, tmp_path / "out", device="cpu")
    assert early  # the scan ran after the copies, and still nothing is published
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if ".lora-tmp-" in p.name]
    assert tree_digest(base, bad) == before


def test_planning_a_safetensors_merge_needs_no_torch(inputs, tmp_path) -> None:
    """With torch unimportable, a merge must get through planning (and the copies) and
    stop only at the adapter's NaN/Inf scan in write_shards, its first use of torch: so a
    real merge plans and copies while torch imports."""
    base, adapter = inputs
    code = (
        "import sys, traceback\n"
        "sys.modules['torch'] = None\n"
        "from lora_cli.stages.merge import merge\n"
        "try:\n"
        f"    merge({str(base)!r}, {str(adapter)!r}, {str(tmp_path / 'out')!r}, device='cpu')\n"
        "except ImportError as exc:\n"
        "    print([f.name for f in traceback.extract_tb(exc.__traceback__)])\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    frames = proc.stdout.strip().splitlines()[-1]
    assert "write_shards" in frames and "check_adapter_values" in frames, frames
    assert "plan_merge" not in frames and "build_plan" not in frames, frames
    assert not (tmp_path / "out").exists()
