"""`merge --part I/N` and `merge --join`: parts run as separate processes (concurrently, in
random order, one killed and rerun) join into a folder byte-identical to a one-process
merge; a missing, stale, foreign, duplicated or incomplete part is refused by name and
nothing is published."""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import peft_adapter
from rel_helpers import build_inputs, copy_inputs

from lora_cli.io.destination import PARTS_SUFFIX
from lora_cli.merge.parts import parse_part, split_by_bytes

ROOT = Path(__file__).resolve().parents[2]
SHARDS = ("--max-shard-size", "6KB")  # ~8 output shards from the tiny two-shard base

# `lora` in a fresh interpreter; with a call number, SIGKILL at that ShardWriter.copy_from call
CHILD = r"""
import os, signal, sys
kill_at = int(sys.argv[1])
if kill_at:
    from lora_cli.io import writer
    original, calls = writer.ShardWriter.copy_from, [0]
    def hook(*args, **kwargs):
        calls[0] += 1
        if calls[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)
    writer.ShardWriter.copy_from = hook
sys.argv = ["lora", *sys.argv[2:]]
from lora_cli.cli import main
main()
"""


def _spawn(*args: object, kill_at: int = 0) -> subprocess.Popen:
    cmd = [sys.executable, "-c", CHILD, str(kill_at), *map(str, args)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    return build_inputs(tmp_path_factory.mktemp("valid"))


@pytest.fixture(scope="module")
def reference(valid, tmp_path_factory) -> dict[str, bytes]:
    """The one-process merge every join must equal, byte for byte."""
    from lora_cli.stages.merge import merge

    out = tmp_path_factory.mktemp("ref") / "merged"
    merge(*valid, out, max_shard_size=SHARDS[1], device="cpu")
    files = _files(out)
    assert len([n for n in files if n.endswith(".safetensors")]) >= 6
    return files


@pytest.fixture(scope="module")
def parted(valid, tmp_path_factory) -> Path:
    """A pristine set of 3 parts (written in-process), copied by tests that break them."""
    from lora_cli.stages.merge import merge

    out = tmp_path_factory.mktemp("parted") / "merged"
    for i in (1, 2, 3):
        merge(*valid, out, max_shard_size=SHARDS[1], device="cpu", part=f"{i}/3")
    return out


def _copy_parts(parted: Path, tmp_path: Path) -> Path:
    out = tmp_path / "merged"
    shutil.copytree(parted.parent / f"merged{PARTS_SUFFIX}", tmp_path / f"merged{PARTS_SUFFIX}")
    return out


def test_split_is_balanced_by_bytes_and_deterministic() -> None:
    sizes = [50, 10, 40, 30, 20, 60]
    parts = split_by_bytes(sizes, 3)
    assert parts == split_by_bytes(sizes, 3)
    assert sorted(i for p in parts for i in p) == list(range(6))
    assert sorted(sum(sizes[i] for i in p) for p in parts) == [70, 70, 70]
    assert split_by_bytes([5], 3) == [[0], [], []]  # more parts than shards: empty parts


@pytest.mark.parametrize("text", ["0/3", "4/3", "3", "a/b", "1/0", "-1/2"])
def test_bad_part_option_is_a_usage_error(text: str) -> None:
    from lora_cli.errors import UsageError

    with pytest.raises(UsageError, match="--part"):
        parse_part(text)


def test_parts_in_separate_processes_join_byte_identical(valid, reference, tmp_path, run_cli):
    base, adapter = valid
    out = tmp_path / "merged"
    args = ("merge", base, adapter, "-o", out, "-q", *SHARDS)
    order = [1, 2, 3]
    random.Random(7).shuffle(order)
    victim = order[1]
    # all parts at once (they share the parts folder); one is killed mid-write
    procs = {i: _spawn(*args, "--part", f"{i}/3", kill_at=2 if i == victim else 0) for i in order}
    for i, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        if i == victim:
            assert proc.returncode == -signal.SIGKILL
        else:
            assert proc.returncode == 0, err.decode()
    parts = tmp_path / f"merged{PARTS_SUFFIX}"
    assert not (parts / f"part-{victim}-of-3").exists()
    assert list(parts.glob(f".part-{victim}-of-3.lora-tmp-*"))  # the killed run's leftovers
    code, _, err = run_cli(*args, "--join")
    assert code == 2
    assert err.strip().splitlines() == [
        f"error: {parts}: part {victim}/3 is missing — run: lora merge BASE ADAPTER -o OUT "
        f"--part {victim}/3"
    ]
    assert not out.exists()

    proc = _spawn(*args, "--part", f"{victim}/3")  # the rerun
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()
    assert not list(parts.glob(f".part-{victim}-of-3.lora-tmp-*"))  # cleaned by the rerun
    code, stdout, err = run_cli(*args, "--join", "--json")
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["part"] == "joined 3"
    assert _files(out) == reference
    assert not parts.exists()
    code, stdout, _ = run_cli("validate", out, "--base", base, "--adapter", adapter)
    assert code == 0, stdout


def test_validate_parts_cover_the_checkpoint(valid, tmp_path, run_cli) -> None:
    base, adapter = valid
    out = tmp_path / "merged"
    assert run_cli("merge", base, adapter, "-o", out, "-q", *SHARDS)[0] == 0
    seen = 0
    for i in (1, 2, 3):
        code, stdout, err = run_cli(
            "validate", out, "--base", base, "--adapter", adapter, "--part", f"{i}/3", "--json"
        )
        assert code == 0, stdout + err
        doc = json.loads(stdout)
        assert doc["part"] == f"{i}/3"
        seen += doc["tensors_checked"]
    code, stdout, _ = run_cli("validate", out, "--json")
    assert seen == json.loads(stdout)["tensors_checked"]
    # a part finds a corrupted tensor in its own files
    victim = sorted(out.glob("*.safetensors"))[-1]
    raw = bytearray(victim.read_bytes())
    raw[-2] ^= 0x40
    victim.write_bytes(bytes(raw))
    codes = [
        run_cli("validate", out, "--base", base, "--adapter", adapter, "--part", f"{i}/3")[0]
        for i in (1, 2, 3)
    ]
    assert sorted(codes) == [0, 0, 1]


def _join(run_cli, valid, out: Path, *extra: str):
    return run_cli("merge", *valid, "-o", out, "-q", *SHARDS, "--join", *extra)


def _first_error(err: str) -> str:
    return err.strip().splitlines()[0]


def test_join_refuses_a_part_from_another_adapter(valid, parted, tmp_path, run_cli) -> None:
    from conftest import tiny_model

    base, _ = copy_inputs(valid, tmp_path / "in")
    other = tmp_path / "other-adapter"
    peft_adapter(tiny_model("llama"), other, target_modules=["q_proj", "v_proj"], r=2)
    out = _copy_parts(parted, tmp_path)
    code, _, err = run_cli("merge", base, other, "-o", out, "-q", *SHARDS, "--join")
    assert code == 2
    assert "part 1/3 is stale or foreign: made from another adapter" in _first_error(err)
    assert not out.exists()
    assert (tmp_path / f"merged{PARTS_SUFFIX}").is_dir()  # the parts are kept


def test_join_refuses_other_options_and_versions(valid, parted, tmp_path, run_cli) -> None:
    out = _copy_parts(parted, tmp_path)
    code, _, err = run_cli("merge", *valid, "-o", out, "-q", *SHARDS, "--dtype", "fp16", "--join")
    assert code == 2 and "made from other merge options" in err
    record = tmp_path / f"merged{PARTS_SUFFIX}" / "part-2-of-3" / "part.json"
    doc = json.loads(record.read_text())
    doc["fingerprint"]["lora_version"] = "0.0.1"
    record.write_text(json.dumps(doc))
    code, _, err = _join(run_cli, valid, out)
    assert code == 2
    assert "part 2/3 is stale or foreign: made from another lora version 0.0.1" in err
    assert not out.exists()


def test_join_refuses_a_base_with_other_values(valid, parted, tmp_path, run_cli) -> None:
    base, adapter = copy_inputs(valid, tmp_path / "in")
    shard = sorted(base.glob("*.safetensors"))[0]
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 1  # same architecture and headers, other values
    shard.write_bytes(bytes(raw))
    out = _copy_parts(parted, tmp_path)
    code, _, err = run_cli("merge", base, adapter, "-o", out, "-q", *SHARDS, "--join")
    assert code == 2 and "made from another base checkpoint" in err


def test_join_refuses_mixed_splits_and_incomplete_parts(valid, parted, tmp_path, run_cli):
    out = _copy_parts(parted, tmp_path)
    parts = tmp_path / f"merged{PARTS_SUFFIX}"
    (parts / "part-1-of-2").mkdir()
    code, _, err = _join(run_cli, valid, out)
    assert code == 2
    assert "parts from different splits: part-1-of-2 (N=2), part-1-of-3 (N=3)" in err
    shutil.rmtree(parts / "part-1-of-2")
    (parts / "part-3-of-3" / "part.json").unlink()
    code, _, err = _join(run_cli, valid, out)
    assert code == 2 and "part 3/3 is incomplete (no part.json) — rerun it" in _first_error(err)
    assert not out.exists()


def test_join_refuses_duplicated_and_truncated_parts(valid, parted, tmp_path, run_cli):
    out = _copy_parts(parted, tmp_path)
    parts = tmp_path / f"merged{PARTS_SUFFIX}"
    shutil.copy(parts / "part-1-of-3" / "part.json", parts / "part-2-of-3" / "part.json")
    code, _, err = _join(run_cli, valid, out)
    assert code == 2 and "it says part 1/3): a duplicated part?" in err
    shutil.rmtree(parts)
    out = _copy_parts(parted, tmp_path)
    shard = sorted((parts / "part-3-of-3").glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-4])
    code, _, err = _join(run_cli, valid, out)
    assert code == 2
    assert _first_error(err).startswith(
        f"error: {shard}: shard of part 3/3 is missing, truncated or altered — rerun it"
    )
    assert not out.exists()


def test_join_without_parts_and_part_with_join(valid, tmp_path, run_cli) -> None:
    out = tmp_path / "merged"
    code, _, err = _join(run_cli, valid, out)
    assert code == 2 and "no parts to join" in err
    code, _, err = _join(run_cli, valid, out, "--part", "1/2")
    assert code == 2 and "--part goes without --join" in err


@pytest.mark.parametrize("index", [1, 3])  # the first and the last part: every one is checked
@pytest.mark.parametrize(
    ("key", "what"),
    [("base", "another base checkpoint"), ("adapter", "another adapter"),
     ("plan", "another shard layout"), ("options", "other merge options")],
)  # fmt: skip
def test_join_checks_every_parts_fingerprint(valid, parted, tmp_path, run_cli, index, key, what):
    """Issue 21: a join that skipped the last part's fingerprint passed every test."""
    out = _copy_parts(parted, tmp_path)
    record = tmp_path / f"merged{PARTS_SUFFIX}" / f"part-{index}-of-3" / "part.json"
    doc = json.loads(record.read_text())
    doc["fingerprint"][key] = "f" * 64 if key != "options" else '{"dtype": "F16"}'
    record.write_text(json.dumps(doc))
    code, _, err = _join(run_cli, valid, out)
    assert code == 2
    assert f"part {index}/3 is stale or foreign: made from {what}" in _first_error(err)
    assert not out.exists()


def test_join_rehashes_every_shard_of_the_last_part(valid, parted, tmp_path, run_cli) -> None:
    """One flipped data byte in the last shard of the last part (size and header intact)."""
    out = _copy_parts(parted, tmp_path)
    shard = sorted((tmp_path / f"merged{PARTS_SUFFIX}" / "part-3-of-3").glob("*.safetensors"))[-1]
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0x80
    shard.write_bytes(bytes(raw))
    code, _, err = _join(run_cli, valid, out)
    assert code == 2
    assert _first_error(err).startswith(
        f"error: {shard}: shard of part 3/3 does not match the sha256 its part recorded"
    )
    assert not out.exists()


def test_parts_written_without_checksums_still_join_verified(valid, tmp_path, run_cli) -> None:
    """--no-checksums drops the manifest, not the part records' digests the join checks."""
    out = tmp_path / "merged"
    args = ("merge", *valid, "-o", out, "-q", "--no-checksums", *SHARDS)
    for i in (1, 2):
        assert run_cli(*args, "--part", f"{i}/2")[0] == 0
    records = sorted((tmp_path / f"merged{PARTS_SUFFIX}").glob("*/part.json"))
    for record in records:
        assert all(
            len(s["sha256"]) == 64 for s in json.loads(record.read_text())["shards"].values()
        )
    shard = sorted((tmp_path / f"merged{PARTS_SUFFIX}" / "part-2-of-2").glob("*.safetensors"))[0]
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0x80
    shard.write_bytes(bytes(raw))
    code, _, err = run_cli(*args, "--join")
    assert code == 2 and "does not match the sha256" in err
    raw[-1] ^= 0x80
    shard.write_bytes(bytes(raw))
    code, _, err = run_cli(*args, "--join")
    assert code == 0, err
    assert not (out / "lora-checksums.sha256").exists()
