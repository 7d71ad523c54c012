"""Crafted pickles in the places a user would put weights: as ``adapter_model.bin`` next to
a valid adapter_config.json, and as a base ``pytorch_model.bin``. Every subcommand refuses
them without running any of their code (a marker file the payload would create never
appears)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from rel_helpers import (
    build_inputs,
    malicious_pickles,
    proves_payload_runs,
    temp_siblings,
    torch_file_with_pickle,
)

PAYLOADS = sorted(malicious_pickles(Path("/unused")))


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    return build_inputs(tmp_path_factory.mktemp("valid"))


@pytest.mark.parametrize("payload", PAYLOADS)
def test_payloads_really_execute_under_plain_pickle(tmp_path, payload) -> None:
    """The control: without our reader these files run code."""
    marker = tmp_path / "marker"
    assert proves_payload_runs(malicious_pickles(marker)[payload], marker)


def _hostile_adapter(valid, root: Path, marker: Path, payload: str) -> Path:
    _, adapter = valid
    folder = root / "hostile-adapter"
    folder.mkdir()
    config = json.loads((adapter / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(config))
    state = {"base_model.model.x.lora_A.weight": torch.zeros(4, 32)}
    torch_file_with_pickle(folder / "adapter_model.bin", state, malicious_pickles(marker)[payload])
    return folder


def _hostile_base(valid, root: Path, marker: Path, payload: str) -> Path:
    base, _ = valid
    folder = root / "hostile-base"
    folder.mkdir()
    (folder / "config.json").write_text((base / "config.json").read_text())
    state = {"model.embed_tokens.weight": torch.zeros(64, 32)}
    torch_file_with_pickle(folder / "pytorch_model.bin", state, malicious_pickles(marker)[payload])
    return folder


def _commands(valid, where: str, hostile: Path, dest: Path) -> dict[str, list]:
    base, adapter = valid
    merge = ["merge", base, hostile] if where == "adapter" else ["merge", hostile, adapter]
    return {
        "merge": [*merge, "-o", dest],
        "inspect": ["inspect", hostile],
        "convert": ["convert", hostile, "-o", dest],
        "validate": ["validate", hostile],
    }


@pytest.mark.parametrize("cmd", ["merge", "inspect", "convert", "validate"])
@pytest.mark.parametrize("where", ["adapter", "base"])
@pytest.mark.parametrize("payload", PAYLOADS)
def test_hostile_pickle_is_refused_and_never_runs(
    valid, tmp_path, run_cli, payload: str, where: str, cmd: str
) -> None:
    marker = tmp_path / "marker"
    build = _hostile_adapter if where == "adapter" else _hostile_base
    hostile = build(valid, tmp_path, marker, payload)
    dest = tmp_path / "dest"
    code, out, err = run_cli(*_commands(valid, where, hostile, dest)[cmd])
    assert "Traceback" not in out + err
    weights = "adapter_model.bin" if where == "adapter" else "pytorch_model.bin"
    if cmd == "validate":  # the file exists but is not acceptable: a finding
        assert code == 1
        (line,) = [x for x in out.splitlines() if x.startswith("FINDING ")]
        assert line.startswith(f"FINDING {weights}: header: refused to load global")
    else:
        assert code == 2
        (line,) = err.strip().splitlines()
        assert line.startswith("error: ") and f"{weights}: refused to load global" in line
        assert "may be malicious" in line
    time.sleep(0.05)  # a spawned process would have had time to touch the marker
    assert not marker.exists()
    assert not dest.exists() and temp_siblings(dest) == []
