"""MoE ``target_parameters`` LoRAs: fused in memory (transformers v5), per expert on disk."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import dtype_kw, require_fused_experts, ulp_diff
from safetensors.torch import load_file, save_file
from torch import nn

from lora_cli.stages.merge import merge


def tiny_mixtral():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "mixtral",
        hidden_size=32,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        num_local_experts=3,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, **dtype_kw(torch.bfloat16)).eval()


@pytest.mark.parametrize(
    "params", [["experts.gate_up_proj", "experts.down_proj"], ["experts.gate_up_proj"]]
)
def test_fused_expert_lora_splits_into_per_expert_disk_tensors(tmp_path: Path, params) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model

    model = tiny_mixtral()
    require_fused_experts(model)
    model.save_pretrained(tmp_path / "base")
    on_disk = load_file(tmp_path / "base" / "model.safetensors")
    assert "model.layers.0.block_sparse_moe.experts.2.w3.weight" in on_disk  # per expert
    cfg = LoraConfig(
        r=2,
        lora_alpha=6,
        target_modules=["q_proj"],
        target_parameters=params,
        init_lora_weights=False,
    )
    torch.manual_seed(1)
    get_peft_model(copy.deepcopy(model), cfg).save_pretrained(tmp_path / "adapter")

    result = merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", device="cpu")
    per_layer = 3 * (3 if len(params) == 2 else 2) + 1
    assert result.counts["merge"] == 2 * per_layer

    base = copy.deepcopy(model)
    oracle = PeftModel.from_pretrained(base, tmp_path / "adapter").merge_and_unload()
    oracle.save_pretrained(tmp_path / "peft")  # back to the per-expert disk layout
    theirs = load_file(tmp_path / "peft" / "model.safetensors")
    ours = load_file(tmp_path / "out" / "model.safetensors")
    assert ours.keys() == on_disk.keys()
    changed = 0
    for name, t in ours.items():
        assert ulp_diff(t, theirs[name]) <= 1, name
        changed += not torch.equal(t, on_disk[name])
    assert changed == result.counts["merge"]


class FusedExperts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.Module()
        self.experts.gate_up_proj = nn.Parameter(torch.randn(4, 12, 8))
        self.experts.down_proj = nn.Parameter(torch.randn(4, 8, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.einsum("eoi,bi->beo", self.experts.gate_up_proj, x)[..., :6]
        return torch.einsum("eoi,bei->bo", self.experts.down_proj, torch.relu(h))


def test_fused_expert_tensors_on_disk(tmp_path: Path) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(0)
    model = FusedExperts().to(torch.bfloat16)
    (tmp_path / "base").mkdir()
    save_file(model.state_dict(), tmp_path / "base" / "model.safetensors")
    cfg = LoraConfig(
        r=3,
        lora_alpha=5,
        target_modules=[],
        target_parameters=["experts.gate_up_proj", "experts.down_proj"],
        init_lora_weights=False,
        rank_pattern={"down_proj": 2},
    )
    get_peft_model(copy.deepcopy(model), cfg).save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["rank_pattern"]
    merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", device="cpu")
    ours = load_file(tmp_path / "out" / "model.safetensors")
    oracle = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "adapter")
    theirs = oracle.merge_and_unload().state_dict()
    for name, t in ours.items():
        assert not torch.equal(t, model.state_dict()[name]), name
        assert ulp_diff(t, theirs[name]) <= 1, name
