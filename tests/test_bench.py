"""``scripts/bench.py`` runs to its table, FP8 and MXFP4 bases included, and saves what it
measured before rendering (a crash while rendering, or anywhere later, loses nothing); its
``--extract-only`` run gives the extract table; its gpt-oss-shaped adapter is what PEFT loads
and its output check recomputes what PEFT merges."""

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
    argv = ["--smoke", "--quant", "fp8,mxfp4", "--workdir", str(tmp_path), "--json", str(results)]
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
        ("gpt-oss:all-linear", "lora"),
        ("mxfp4", "cp"),
        ("mxfp4:all-linear", "lora"),
        ("mxfp4:all-linear", "lora-keep"),
    }
    for key, case in rows.items():
        assert case["ok"], (key, case["runs"][-1]["error"], case["runs"][-1]["stderr_tail"])
        assert case["check"]["ok"], (key, case["check"])
    # an MXFP4 -> bf16 merge is also recomputed against the bf16 model its base encodes
    assert rows[("mxfp4:all-linear", "lora")]["check"]["probes"] == 6
    assert rows[("gpt-oss:all-linear", "lora")]["check"]["probes"] == 6
    quantized = {(r["quantized"], r["lora"]): r for r in saved["ratios"] if "quantized" in r}
    assert set(quantized) == {(q, c) for q in ("fp8", "mxfp4") for c in ("lora", "lora-keep")}
    assert all(r["over_bf16_merge"] > 0 for r in quantized.values())
    assert quantized[("mxfp4", "lora")]["bf16_merge"] == "gpt-oss bf16"
    sizes = saved["sizes"]["quick"]
    assert sizes["mxfp4_base_bytes"] < 0.7 * sizes["gpt-oss_base_bytes"]  # experts: 4.25 bits
    table = rendered[0]
    for label in ("fp8:all-linear", "mxfp4:all-linear"):
        assert f"{label} -> bf16" in " ".join(table.split())
        assert f"{label} keep" in " ".join(table.split())
    assert "the bf16-base merge" in table


def test_extract_only_smoke_run_renders_the_extract_table(bench, tmp_path, capsys) -> None:
    results = tmp_path / "results.json"
    argv = ["--smoke", "--extract-only", "--workdir", str(tmp_path), "--json", str(results)]
    assert bench.main(argv) == 0
    saved = json.loads(results.read_text())
    assert saved["complete"] and saved["cases"] == [] and saved["settings"]["extract_only"]
    row = saved["sizes"]["quick"]["extract"]["lora extract"]
    assert len(row["wall_s"]) == 1 and row["max_peak_rss_mib"] > 0, row
    measured = row["measured"]
    # TUNED - BASE is the rank-16 adapter's delta plus bf16 rounding: extracting rank 16 leaves
    # only the rounding, and every changed tensor (the 7 projections of 4 layers) is covered
    assert measured["changed_tensors"] == measured["covered_tensors"] == 28, measured
    assert 0 < measured["relative_error"] < 0.05, measured
    assert abs(measured["relative_error"] - row["reported"]["error"]) < 1e-3, row
    assert 0 < row["size_ratio"] < 0.5
    out = capsys.readouterr().out
    assert "extract: rank 16" in out and "lora extract" in out
    assert "size   adapter" not in out  # no merge table


def test_mergekit_gets_absolute_paths(bench, tmp_path, monkeypatch) -> None:
    """mergekit 0.1.5's model card looks a relative path (``bench-output/base-small``) up on the
    Hub after the whole extraction: the bench hands it absolute paths only."""
    import bench_extract

    monkeypatch.chdir(tmp_path)
    cmds = bench_extract.commands(
        Path("w/base"), Path("w/tuned"), Path("w/out"), Path("lora"), Path("mk")
    )
    cmd, dest = cmds["mergekit"]
    for flag in ("--model", "--base-model", "--out-path"):
        assert Path(cmd[cmd.index(flag) + 1]).is_absolute(), cmd
    assert dest.is_absolute() and dest != cmds["lora extract"][1]


def test_gpt_oss_adapter_is_what_peft_saves_and_merges(bench, tmp_path) -> None:
    """The oracle for the gpt-oss-shaped inputs: PEFT's own ``get_peft_model`` saves the same
    keys and shapes as the bench's all-linear adapter, and PEFT's ``merge_and_unload`` of that
    adapter gives, bit for bit, the values the bench's output check recomputes."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    spec = bench.oss.OSS_SIZES["quick"]
    base, _, _ = bench.ensure_base(tmp_path, spec)
    adapter, _ = bench.ensure_adapter(tmp_path, spec, "all-linear", base)
    ours = load_file(adapter / "adapter_model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    config = json.loads((adapter / "adapter_config.json").read_text())
    fields = ("r", "lora_alpha", "target_modules", "target_parameters")
    peft_cfg = LoraConfig(**{k: config[k] for k in fields})
    get_peft_model(model, peft_cfg).save_pretrained(tmp_path / "peft-own")
    theirs = load_file(tmp_path / "peft-own" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()
    probes, untouched = bench.check_probes(spec, "all-linear")
    assert {p["expert"] for p in probes} == {None, 0, spec.experts - 1}
    for probe in probes:
        w = bench._load(base, probe["tensor"], probe["expert"])
        want = merged[probe["tensor"]]
        want = want if probe["expert"] is None else want[probe["expert"]]
        assert not torch.equal(want, w), probe
        assert torch.equal(bench.probe_reference(probe, ours, w), want.float()), probe
    assert torch.equal(merged[untouched], bench._load(base, untouched))


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
