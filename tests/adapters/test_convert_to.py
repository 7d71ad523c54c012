# ruff: noqa: F401, F811  (pytest fixtures are imported from eco_helpers)
"""``lora convert --to peft|mlx``: the other ecosystem's own loader gives the same logits."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import peft_adapter, require_fused_experts, tiny_model
from eco_helpers import (
    llama_base_fp32,
    load_folder,
    make_mlx_adapter,
)

pytest.importorskip("mlx_lm")
TOKENS = [[3, 17, 5, 42, 9, 11, 60, 2]]


def peft_logits(base, adapter) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter).eval()
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits[0]


def mlx_logits(base, adapter) -> torch.Tensor:
    import mlx.core as mx
    import numpy as np
    from mlx_lm import load

    model, _ = load(str(base), adapter_path=str(adapter) if adapter else None)
    out = model(mx.array(TOKENS))[0].astype(mx.float32)
    return torch.from_numpy(np.array(out))


def test_mlx_to_peft_same_logits(llama_base_fp32, tmp_path, run_cli):
    adapter = make_mlx_adapter(
        llama_base_fp32,
        tmp_path / "mlx",
        num_layers=1,
        rank=6,
        scale=3.5,
        keys=["self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj"],
    )
    code, out, err = run_cli("convert", adapter, "--to", "peft", "-o", tmp_path / "peft", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert (doc["from"], doc["to"]) == ("mlx-lm", "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["r"] == 6 and cfg["lora_alpha"] == 6 * 3.5
    assert cfg["target_modules"] == ["mlp.up_proj", "self_attn.q_proj", "self_attn.v_proj"]
    assert cfg["layers_to_transform"] == [1]
    want = mlx_logits(llama_base_fp32, adapter)
    got = peft_logits(llama_base_fp32, tmp_path / "peft")
    assert (want - mlx_logits(llama_base_fp32, None)).abs().max() > 1e-2  # the adapter acts
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_mlx_dora_to_peft_merges_like_fuse(llama_base_fp32, tmp_path, run_cli):
    adapter = make_mlx_adapter(llama_base_fp32, tmp_path / "mlx", fine_tune_type="dora")
    assert run_cli("convert", adapter, "--to", "peft", "-o", tmp_path / "peft")[0] == 0
    torch.testing.assert_close(
        peft_logits(llama_base_fp32, tmp_path / "peft"),
        mlx_logits(llama_base_fp32, adapter),
        rtol=1e-4,
        atol=1e-4,
    )


@pytest.mark.parametrize(
    "lora",
    [
        dict(target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]),
        dict(
            target_modules=["q_proj", "k_proj", "gate_proj", "embed_tokens"],
            rank_pattern={"k_proj": 2},
            alpha_pattern={"gate_proj": 3.0},
            layers_to_transform=[1],
        ),
        dict(target_modules=["q_proj", "up_proj"], use_rslora=True, r=8, lora_alpha=4),
        dict(target_modules=["q_proj", "v_proj"], use_dora=True),
    ],
    ids=["plain", "patterns-last-layer-embedding", "rslora", "dora"],
)
def test_peft_to_mlx_same_logits(llama_base_fp32, tmp_path, run_cli, lora):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(llama_base_fp32, dtype=torch.float32)
    peft_adapter(base, tmp_path / "peft", **lora)
    code, _, err = run_cli(
        "convert",
        tmp_path / "peft",
        "--to",
        "mlx",
        "--base",
        llama_base_fp32,
        "-o",
        tmp_path / "mlx",
    )
    assert code == 0, err
    cfg = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())
    assert cfg["num_layers"] == (1 if lora.get("layers_to_transform") else -1)
    want = peft_logits(llama_base_fp32, tmp_path / "peft")
    got = mlx_logits(llama_base_fp32, tmp_path / "mlx")
    assert (want - mlx_logits(llama_base_fp32, None)).abs().max() > 1e-2  # the adapter acts
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # and back: PEFT → mlx → PEFT gives the original numbers
    assert run_cli("convert", tmp_path / "mlx", "--to", "peft", "-o", tmp_path / "back")[0] == 0
    torch.testing.assert_close(
        peft_logits(llama_base_fp32, tmp_path / "back"), want, rtol=1e-5, atol=1e-5
    )


def test_to_mlx_refusals(tmp_path, run_cli):
    model = tiny_model("llama", dtype=torch.float32)
    peft_adapter(model, tmp_path / "a", target_modules=["q_proj"], modules_to_save=["lm_head"])
    code, _, err = run_cli("convert", tmp_path / "a", "--to", "mlx", "-o", tmp_path / "o")
    assert code == 2 and "no mlx-lm LoRA form" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
    peft_adapter(model, tmp_path / "b", target_modules=["q_proj"], lora_bias=True)
    code, _, err = run_cli("convert", tmp_path / "b", "--to", "mlx", "-o", tmp_path / "o")
    assert code == 2 and "lora_bias" in err


def test_full_mlx_to_peft_refused(llama_base_fp32, tmp_path, run_cli):
    adapter = make_mlx_adapter(
        llama_base_fp32, tmp_path / "mlx", fine_tune_type="full", num_layers=1
    )
    code, _, err = run_cli("convert", adapter, "-o", tmp_path / "peft")
    assert code == 2 and "lora merge" in err
    assert load_folder(adapter)  # input untouched


def test_peft_moe_target_parameters_to_mlx(tmp_path, run_cli):
    """transformers v5 MoE LoRA (fused gate_up_proj / down_proj) → mlx SwitchLinear LoRAs."""
    from eco_helpers import make_base
    from transformers import AutoModelForCausalLM

    base = make_base(
        tmp_path / "base",
        "qwen2",
        dtype=torch.float32,
        model_type="qwen3_moe",
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        head_dim=8,
        extra_config={"num_experts": 4, "rope_theta": 10000.0},
    )
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    require_fused_experts(model)
    peft_adapter(
        model,
        tmp_path / "peft",
        target_modules=["q_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )
    code, _, err = run_cli(
        "convert", tmp_path / "peft", "--to", "mlx", "--base", base, "-o", tmp_path / "mlx"
    )
    assert code == 0, err
    cfg = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())
    assert set(cfg["lora_parameters"]["keys"]) == {
        "self_attn.q_proj",
        "mlp.switch_mlp.gate_proj",
        "mlp.switch_mlp.up_proj",
        "mlp.switch_mlp.down_proj",
    }
    want = peft_logits(base, tmp_path / "peft")
    got = mlx_logits(base, tmp_path / "mlx")
    assert (want - mlx_logits(base, None)).abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
