"""``scripts/bench.py`` runs to its table, FP8 base included, and saves what it measured
before rendering (a crash while rendering, or anywhere later, loses nothing)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench.py"


@pytest.fixture
def bench():
    spec = importlib.util.spec_from_file_location("bench_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up)
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_smoke_run_renders_every_row_and_saves_results_first(
    bench, tmp_path, monkeypatch, capsys
) -> None:
    results = tmp_path / "results.json"
    rendered = []
    real_render = bench.render

    def render_then_crash(cases, ratios, help_s):
        saved = json.loads(results.read_text())  # already on disk, whole
        assert saved["complete"] and len(saved["cases"]) == len(cases)
        rendered.append(real_render(cases, ratios, help_s))
        raise RuntimeError("a crash after measuring")

    monkeypatch.setattr(bench, "render", render_then_crash)
    argv = ["--smoke", "--quant", "fp8", "--workdir", str(tmp_path), "--json", str(results)]
    with pytest.raises(RuntimeError, match="after measuring"):
        bench.main(argv)

    saved = json.loads(results.read_text())
    rows = {(c["adapter"], c["contender"]): c for c in saved["cases"]}
    assert set(rows) == {
        ("-", "cp"),
        ("all-linear", "lora"),
        ("fp8", "cp"),
        ("fp8:all-linear", "lora"),
        ("fp8:all-linear", "lora-keep"),
    }
    for key, case in rows.items():
        assert case["ok"], (key, case["runs"][-1]["error"], case["runs"][-1]["stderr_tail"])
        assert case["check"]["ok"], (key, case["check"])
    quantized = {r["lora"]: r for r in saved["ratios"] if "quantized" in r}
    assert set(quantized) == {"lora", "lora-keep"}
    assert all(r["over_bf16_merge"] > 0 for r in quantized.values())
    table = rendered[0]
    assert "fp8:all-linear -> bf16" in table and "fp8:all-linear keep" in table
    assert "the bf16-base merge" in table


def test_every_readme_bench_command_parses(bench) -> None:
    """Every bench command the README shows is one the script accepts (parsing only: the
    smoke run above runs the code they share)."""
    import re
    import shlex

    readme = (SCRIPT.parent.parent / "README.md").read_text()
    lines = re.findall(r"^\.venv/bin/python scripts/bench\.py(.*)$", readme, re.M)
    assert len(lines) >= 6
    for line in lines:
        args = bench.parse_args(shlex.split(line, comments=True))
        assert args.size_list and args.adapter_list
