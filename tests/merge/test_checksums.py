"""The checksum manifest is hashed while the shards are written (no read-back): it must equal
an independent sha256 of every file, pass `sha256sum -c`, and `--no-checksums` must leave
every other byte unchanged."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from rel_helpers import build_inputs

from lora_cli.io.layout import MANIFEST_NAME
from lora_cli.io.writer import ShardWriter


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    return build_inputs(tmp_path_factory.mktemp("valid"))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_manifest_equals_an_independent_sha256(valid, tmp_path, run_cli) -> None:
    out = tmp_path / "merged"
    assert run_cli("merge", *valid, "-o", out, "-q", "--max-shard-size", "12KB")[0] == 0
    lines = (out / MANIFEST_NAME).read_text().splitlines()
    files = sorted(p.name for p in out.iterdir() if p.name != MANIFEST_NAME)
    assert lines == [f"{_sha(out / name)}  {name}" for name in files]
    if shutil.which("sha256sum"):
        subprocess.run(["sha256sum", "-c", "--quiet", MANIFEST_NAME], cwd=out, check=True)


def test_no_checksums_changes_nothing_else(valid, tmp_path, run_cli) -> None:
    with_sums, without = tmp_path / "with", tmp_path / "without"
    assert run_cli("merge", *valid, "-o", with_sums, "-q")[0] == 0
    assert run_cli("merge", *valid, "-o", without, "-q", "--no-checksums")[0] == 0
    expected = {p.name: p.read_bytes() for p in with_sums.iterdir() if p.name != MANIFEST_NAME}
    assert {p.name: p.read_bytes() for p in without.iterdir()} == expected
    code, stdout, err = run_cli("validate", without, "--base", valid[0], "--adapter", valid[1])
    assert code == 0 and "no checksum manifest" in stdout + err


def test_writer_hashes_in_order_and_gives_up_otherwise(tmp_path) -> None:
    tensors = {"a": torch.arange(6, dtype=torch.float32), "b": torch.ones(3, dtype=torch.int64)}
    specs = [
        (n, "F32" if t.is_floating_point() else "I64", tuple(t.shape)) for n, t in tensors.items()
    ]
    for order, hashed in ((["a", "b"], True), (["b", "a"], False)):
        path = tmp_path / f"{''.join(order)}.safetensors"
        writer = ShardWriter(path, specs)
        names = sorted(writer.entries, key=lambda n: writer.entries[n].start)
        for name in names if hashed else names[::-1]:
            writer.write(name, tensors[name])
        writer.close()
        assert writer.digest() == (_sha(path) if hashed else None)
