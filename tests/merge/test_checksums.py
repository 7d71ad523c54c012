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


def test_writer_hashes_whatever_the_write_order(tmp_path) -> None:
    """The trailing hash follows the written prefix: rows and tensors may land in any
    order (``merge --part`` workers, row blocks) and the digest is still the file's."""
    tensors = {
        "a": torch.arange(6, dtype=torch.float32),
        "b": torch.ones(3, dtype=torch.int64),
        "c": torch.arange(40, dtype=torch.float32).reshape(10, 4),
    }
    specs = [
        (n, "F32" if t.is_floating_point() else "I64", tuple(t.shape)) for n, t in tensors.items()
    ]
    for order in (["a", "b", "c"], ["c", "b", "a"], ["b", "c", "a"]):
        path = tmp_path / f"{''.join(order)}.safetensors"
        writer = ShardWriter(path, specs, hashed=True)
        for name in order:
            if name == "c":  # rows out of order too
                writer.write_rows("c", 6, tensors["c"][6:])
                writer.write_rows("c", 0, tensors["c"][:6])
            else:
                writer.write(name, tensors[name])
        writer.close()
        assert writer.digest() == _sha(path)
    unhashed = ShardWriter(tmp_path / "plain.safetensors", specs)
    for name, t in tensors.items():
        unhashed.write(name, t)
    unhashed.close()
    assert unhashed.digest() is None
