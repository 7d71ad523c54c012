"""Every bad input gives a clean one-line error (or, for `validate`, a finding) and a
non-zero exit from every subcommand that reads it: no traceback, nothing left behind.

inspect / convert / merge exit 2 with one ``error:`` line on stderr naming the file (and
the tensor where there is one). validate exits 1 with a FINDING line naming them when the
input exists but is corrupt, and 2 when there is nothing it could validate.
"""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from rel_helpers import (
    ADAPTER_FILE,
    SHARD2,
    SHARD_CORRUPTIONS,
    build_inputs,
    copy_inputs,
    corrupt,
    empty_adapter_file,
    set_adapter_tensor,
    temp_siblings,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    return build_inputs(tmp_path_factory.mktemp("valid"))


@dataclass
class Bad:
    """What a broken input looks like from the outside."""

    target: str  # base | adapter | other: which input is broken
    path: Path  # what to pass as that input
    names: list[str]  # strings the error must contain (file, tensor)
    needle: str  # a fragment of the expected message
    validate_code: int = 1


def _structural(where: str, case: str) -> Callable[[Path, Path], Bad]:
    def make(base: Path, adapter: Path) -> Bad:
        f = base / SHARD2 if where == "base" else adapter / ADAPTER_FILE
        tensor = corrupt(f, case)
        names = [f.name] + ([repr(tensor)] if tensor else [])
        thing = base if where == "base" else adapter
        return Bad(where, thing, names, SHARD_CORRUPTIONS[case][1])

    return make


def _missing_shard(base: Path, adapter: Path) -> Bad:
    (base / SHARD2).unlink()
    return Bad("base", base, ["model.safetensors.index.json", SHARD2], "missing")


def _config(text: str | None, needle: str) -> Callable[[Path, Path], Bad]:
    def make(base: Path, adapter: Path) -> Bad:
        (adapter / "adapter_config.json").write_text(text)
        return Bad("adapter", adapter, ["adapter_config.json"], needle)

    return make


def _config_missing(base: Path, adapter: Path) -> Bad:
    (adapter / "adapter_config.json").unlink()
    return Bad("adapter", adapter, [adapter.name], "adapter_config.json")


def _nan(base: Path, adapter: Path) -> Bad:
    key = set_adapter_tensor(adapter, "lora_B", lambda t: t.view(-1).__setitem__(3, math.nan))
    return Bad("adapter", adapter, [ADAPTER_FILE, key], "NaN")


def _empty(base: Path, adapter: Path) -> Bad:
    empty_adapter_file(adapter)
    return Bad("adapter", adapter, [ADAPTER_FILE], "no LoRA")


def _neither(base: Path, adapter: Path) -> Bad:
    folder = base.parent / "notes"
    folder.mkdir()
    (folder / "README.md").write_text("a model card, no weights")
    (folder / "config.json").write_text("{}")
    return Bad("other", folder, [folder.name], "no weights found", validate_code=2)


# case → (builder, subcommands that read it)
ALL = ("inspect", "convert", "merge", "validate")
CASES: dict[str, tuple[Callable[[Path, Path], Bad], tuple[str, ...]]] = {}
for _case in SHARD_CORRUPTIONS:
    CASES[f"base-shard-{_case}"] = (_structural("base", _case), ALL)
    CASES[f"adapter-file-{_case}"] = (_structural("adapter", _case), ALL)
CASES.update(
    {
        "index-names-missing-shard": (_missing_shard, ALL),
        "adapter-config-not-json": (_config('{"peft_type": "LORA",', "not valid JSON"), ALL),
        "adapter-config-not-object": (_config("[1, 2]", "must be a JSON object"), ALL),
        "adapter-config-no-peft-type": (_config('{"r": 8}', "peft_type"), ALL),
        # inspect describes these with a warning (it is the tool to look at broken
        # adapters with); the subcommands that would write or gate on them refuse them
        "adapter-config-missing": (_config_missing, ("convert", "merge", "validate")),
        "adapter-with-nan": (_nan, ("convert", "merge", "validate")),
        "adapter-empty-zero3-save": (_empty, ("convert", "merge", "validate")),
        "neither-adapter-nor-checkpoint": (_neither, ALL),
    }
)
PARAMS = [(case, cmd) for case, (_, cmds) in CASES.items() for cmd in cmds]


def _command(cmd: str, bad: Bad, base: Path, adapter: Path, dest: Path) -> list:
    if cmd == "merge":
        if bad.target == "other":  # a folder of neither kind, given as the base
            return ["merge", bad.path, adapter, "-o", dest]
        return ["merge", base, adapter, "-o", dest]
    if cmd == "convert":
        return ["convert", bad.path, "-o", dest]
    return [cmd, bad.path]


def _check_error(code: int, out: str, err: str, bad: Bad, dest: Path) -> None:
    assert "Traceback" not in out + err
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    for name in bad.names:
        assert name in lines[0], (name, lines[0])
    assert bad.needle in lines[0]
    assert not dest.exists()
    assert temp_siblings(dest) == []


def _check_validate(code: int, out: str, err: str, bad: Bad) -> None:
    assert "Traceback" not in out + err
    assert code == bad.validate_code, (out, err)
    if code == 2:
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
        assert all(name in err for name in bad.names) and bad.needle in err
        return
    findings = [x for x in out.splitlines() if x.startswith("FINDING ")]
    assert findings, out
    plain = [n.strip("'") for n in bad.names]
    assert any(all(n in line for n in plain) for line in findings), (plain, findings)


@pytest.mark.parametrize(("case", "cmd"), PARAMS, ids=[f"{c}-{m}" for c, m in PARAMS])
def test_bad_input(valid, tmp_path, run_cli, case: str, cmd: str) -> None:
    base, adapter = copy_inputs(valid, tmp_path)
    bad = CASES[case][0](base, adapter)
    dest = tmp_path / "dest"
    code, out, err = run_cli(*_command(cmd, bad, base, adapter, dest))
    if cmd == "validate":
        _check_validate(code, out, err, bad)
    else:
        _check_error(code, out, err, bad, dest)


def test_merge_refuses_a_bad_adapter_given_as_base_too(valid, tmp_path, run_cli) -> None:
    """An adapter file in the base slot is read with the same rules."""
    base, adapter = copy_inputs(valid, tmp_path)
    tensor = corrupt(adapter / ADAPTER_FILE, "offsets-overlap")
    dest = tmp_path / "dest"
    code, out, err = run_cli("merge", adapter / ADAPTER_FILE, adapter, "-o", dest)
    _check_error(
        code, out, err, Bad("base", adapter, [ADAPTER_FILE, repr(tensor)], "overlap"), dest
    )


# A few through a real interpreter: what a user's shell sees, with no test harness between.
SUBPROCESS = [
    ("base-shard-truncated", "merge"),
    ("adapter-file-header-not-utf8", "inspect"),
    ("base-shard-duplicate-names", "convert"),
    ("adapter-with-nan", "merge"),
    ("neither-adapter-nor-checkpoint", "validate"),
    ("adapter-config-not-json", "validate"),
]


@pytest.mark.parametrize(("case", "cmd"), SUBPROCESS, ids=[f"{c}-{m}" for c, m in SUBPROCESS])
def test_bad_input_in_a_real_process(valid, tmp_path, case: str, cmd: str) -> None:
    base, adapter = copy_inputs(valid, tmp_path)
    bad = CASES[case][0](base, adapter)
    dest = tmp_path / "dest"
    args = [str(a) for a in _command(cmd, bad, base, adapter, dest)]
    proc = subprocess.run(
        [sys.executable, "-m", "lora_cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if cmd == "validate":
        _check_validate(proc.returncode, proc.stdout, proc.stderr, bad)
    else:
        _check_error(proc.returncode, proc.stdout, proc.stderr, bad, dest)
