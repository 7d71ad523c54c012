# ruff: noqa: F401, F811  (pytest fixtures are imported from eco_helpers)
"""mlx-lm adapters in: merged against ``mlx_lm.fuse --dequantize`` (the oracle)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from eco_helpers import (
    llama_base,
    llama_base_fp32,
    load_folder,
    make_base,
    make_mlx_adapter,
    mlx_fuse,
    within_ulps,
)
from safetensors.torch import save_file

pytest.importorskip("mlx_lm")


def _compare_with_fuse(
    base: Path, adapter: Path, tmp: Path, run_cli, max_ulp: int = 1, per_tensor: bool = False
) -> int:
    """Merge with lora, fuse with mlx-lm, compare every tensor mlx wrote; return #changed."""
    code, _, err = run_cli("merge", base, adapter, "-o", tmp / "merged", "-q")
    assert code == 0, err
    ours = load_folder(tmp / "merged")
    fused = mlx_fuse(base, adapter, tmp / "fused")
    original = load_folder(base)
    changed = 0
    for name, ref in fused.items():
        if ".switch_mlp." in name:  # mlx stacks experts; HF keeps them one per tensor
            prefix, leaf = name.split(".switch_mlp.")
            leaf = leaf.rsplit(".", 1)[0]
            got = torch.stack(
                [ours[f"{prefix}.experts.{e}.{leaf}.weight"] for e in range(len(ref))]
            )
            before = torch.stack(
                [original[f"{prefix}.experts.{e}.{leaf}.weight"] for e in range(len(ref))]
            )
        else:
            got, before = ours[name], original[name]
        if per_tensor:  # DoRA: a norm, a division and a product, each rounded
            size = ref.abs().max()
            ulp = torch.nextafter(size, torch.tensor(float("inf"), dtype=size.dtype)) - size
            assert (got - ref).abs().max() <= max_ulp * ulp, name
        else:
            assert within_ulps(got, ref, before, max_ulp), name
        changed += not torch.equal(got, before)
    return changed


def test_lora_matches_mlx_fuse(llama_base, tmp_path, run_cli):
    adapter = make_mlx_adapter(llama_base, tmp_path / "ad")
    changed = _compare_with_fuse(llama_base, adapter, tmp_path, run_cli)
    assert changed == 2 * 7  # every Linear of both blocks
    # the same weights with a 0.19-style config (alpha written, ignored; no fine_tune_type)
    old = make_mlx_adapter(llama_base, tmp_path / "old", old_config=True)
    cfg = json.loads((old / "adapter_config.json").read_text())
    assert "fine_tune_type" not in cfg and cfg["lora_parameters"]["alpha"] == 16
    assert run_cli("merge", llama_base, old, "-o", tmp_path / "m-old", "-q")[0] == 0
    new, older = load_folder(tmp_path / "merged"), load_folder(tmp_path / "m-old")
    assert all(torch.equal(new[k], older[k]) for k in new)


def test_last_n_layers_and_keys(llama_base, tmp_path, run_cli):
    adapter = make_mlx_adapter(
        llama_base,
        tmp_path / "ad",
        num_layers=1,
        keys=["self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj", "model.embed_tokens"],
    )
    changed = _compare_with_fuse(llama_base, adapter, tmp_path, run_cli)
    assert changed == 3 + 1  # three projections of the last block, and the embedding
    merged = load_folder(tmp_path / "merged")
    base = load_folder(llama_base)
    assert torch.equal(
        merged["model.layers.0.self_attn.q_proj.weight"],
        base["model.layers.0.self_attn.q_proj.weight"],
    )


def test_dora_matches_mlx_fuse(llama_base_fp32, tmp_path, run_cli):
    adapter = make_mlx_adapter(llama_base_fp32, tmp_path / "ad", fine_tune_type="dora")
    # mlx computes DoRA's norm in the base dtype after rounding the delta; fp32 base
    changed = _compare_with_fuse(
        llama_base_fp32, adapter, tmp_path, run_cli, max_ulp=4, per_tensor=True
    )
    assert changed == 14


def test_full_fine_tune_is_replacement(llama_base, tmp_path, run_cli):
    adapter = make_mlx_adapter(llama_base, tmp_path / "ad", fine_tune_type="full", num_layers=1)
    changed = _compare_with_fuse(llama_base, adapter, tmp_path, run_cli, max_ulp=0)
    assert changed == 7 + 2  # the last block's 7 projections and 2 norms


def test_moe_switch_linear_per_expert(tmp_path, run_cli):
    base = make_base(
        tmp_path / "base",
        "qwen2",
        model_type="qwen3_moe",
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        head_dim=8,
        extra_config={"num_experts": 4, "rope_theta": 10000.0},
    )
    assert "model.layers.0.mlp.experts.3.gate_proj.weight" in load_folder(base)
    keys = ["mlp.switch_mlp.gate_proj", "mlp.switch_mlp.up_proj", "mlp.switch_mlp.down_proj"]
    adapter = make_mlx_adapter(base, tmp_path / "ad", keys=keys + ["self_attn.v_proj"])
    assert _compare_with_fuse(base, adapter, tmp_path, run_cli) == 2 * 4  # stacked in mlx

    # the same base with its experts fused as transformers v5 holds them in memory
    fused_base = tmp_path / "fused-base"
    fused_base.mkdir()
    tensors = load_folder(base)
    for layer in range(2):
        p = f"model.layers.{layer}.mlp.experts"
        per = {
            leaf: torch.stack([tensors.pop(f"{p}.{e}.{leaf}.weight") for e in range(4)])
            for leaf in ("gate_proj", "up_proj", "down_proj")
        }
        tensors[f"{p}.gate_up_proj"] = torch.cat([per["gate_proj"], per["up_proj"]], dim=1)
        tensors[f"{p}.down_proj"] = per["down_proj"]
    save_file(tensors, fused_base / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(base / "config.json", fused_base / "config.json")
    code, _, err = run_cli("merge", fused_base, adapter, "-o", tmp_path / "m2", "-q")
    assert code == 0, err
    ours, ref, before = load_folder(tmp_path / "m2"), load_folder(tmp_path / "fused"), tensors
    for layer in range(2):
        p = f"model.layers.{layer}.mlp"
        want = torch.cat(
            [ref[f"{p}.switch_mlp.gate_proj.weight"], ref[f"{p}.switch_mlp.up_proj.weight"]], dim=1
        )
        name = f"{p}.experts.gate_up_proj"
        assert within_ulps(ours[name], want, before[name], 1)
        name = f"{p}.experts.down_proj"
        assert within_ulps(ours[name], ref[f"{p}.switch_mlp.down_proj.weight"], before[name], 1)
        assert not torch.equal(ours[name], before[name])


def test_periodic_file_and_inspect(llama_base, tmp_path, run_cli):
    adapter = make_mlx_adapter(llama_base, tmp_path / "ad", num_layers=1)
    periodic = adapter / "0000100_adapters.safetensors"
    (adapter / "adapters.safetensors").rename(periodic)
    code, out, err = run_cli("inspect", periodic, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["adapter"]["format"] == "mlx-lm"
    assert doc["adapter"]["native"]["num_layers"] == 1
    assert doc["adapter"]["r"] == 4 and doc["adapter"]["lora_alpha"] == 10.0
    assert {m["name"] for m in doc["adapter"]["modules"]} >= {"model.layers.1.self_attn.q_proj"}
    code, _, err = run_cli("inspect", adapter)
    assert code == 2 and "periodic" in err
    code, out, err = run_cli("validate", periodic, "--base", llama_base, "--json")
    assert code == 0, out + err


def test_refusals(llama_base, tmp_path, run_cli):
    adapter = make_mlx_adapter(llama_base, tmp_path / "ad")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    del cfg["lora_parameters"]["scale"]
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli("merge", llama_base, adapter, "-o", tmp_path / "m")
    assert code == 2 and "scale" in err and "Traceback" not in err
    assert not (tmp_path / "m").exists()
