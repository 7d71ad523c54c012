"""The same inputs give the same bytes: merge (and convert) twice, compare the folders."""

from __future__ import annotations

from pathlib import Path

import pytest
from rel_helpers import build_inputs


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    return build_inputs(tmp_path_factory.mktemp("valid"))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize(
    "options",
    [(), ("--max-shard-size", "12KB"), ("--dtype", "fp16")],
    ids=["default", "resharded", "fp16"],
)
def test_merging_twice_gives_identical_folders(
    valid, tmp_path, run_cli, options, monkeypatch
) -> None:
    # the model card's date follows SOURCE_DATE_EPOCH (else today): no flake at midnight
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    base, adapter = valid
    outputs = []
    for name in ("first", "second"):
        code, _, err = run_cli("merge", base, adapter, "-o", tmp_path / name, "-q", *options)
        assert code == 0, err
        outputs.append(_snapshot(tmp_path / name))
    first, second = outputs
    assert list(first) == list(second)
    assert len([n for n in first if n.endswith(".safetensors")]) >= 2
    assert "README.md" in first  # the model card is held to the same bytes
    for name in first:
        assert first[name] == second[name], name


def test_converting_twice_gives_identical_folders(valid, tmp_path, run_cli) -> None:
    base, _ = valid
    for name in ("first", "second"):
        code, _, err = run_cli("convert", base, "-o", tmp_path / name, "-q")
        assert code == 0, err
    assert _snapshot(tmp_path / "first") == _snapshot(tmp_path / "second")
