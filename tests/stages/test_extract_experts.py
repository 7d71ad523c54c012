"""``lora extract`` of fused MoE experts (transformers v5 ``experts.gate_up_proj`` /
``down_proj``) as PEFT ``target_parameters``: round trips through PEFT-made adapters merged
by PEFT, PEFT loading and merging the output, ``lora merge`` reading it, and refusals.

Three storage layouts: Mixtral (per expert on disk as ``block_sparse_moe.experts.{e}.w1/w3/w2``,
(E, out, in) in memory), Qwen3-MoE (per expert as ``mlp.experts.{e}.gate_proj/up_proj/
down_proj``) and gpt-oss (fused on disk, (E, in, out): ``is_transposed``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from tests.conftest import dtype_kw, load_owned, require_fused_experts, save_model
from tests.hostile_harness import assert_refused
from tests.stages.test_extract import merge_equals_peft

PREFIX = "base_model.model."
MOE = {
    "mixtral": dict(num_local_experts=3),
    "qwen3_moe": dict(num_experts=3, moe_intermediate_size=24, head_dim=8, mlp_only_layers=[]),
    "gpt_oss": dict(num_local_experts=3, head_dim=8, layer_types=["full_attention"] * 2),
}


def tiny_moe(kind: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        kind, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, num_experts_per_tok=2, max_position_embeddings=64,
        tie_word_embeddings=False, **MOE[kind],
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, **dtype_kw(torch.bfloat16)).eval()
    require_fused_experts(model)
    return model


def _peft_merge(base_dir: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """PEFT's merge_and_unload, saved by transformers (the per-expert disk layout) and read
    back: what a TUNED made by PEFT holds on disk."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, **dtype_kw(torch.bfloat16))
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    folder = adapter.parent / (adapter.name + "-merged")
    merged.save_pretrained(folder)
    return load_owned(folder / "model.safetensors")


def _extract(run_cli, *args) -> dict:
    code, stdout, stderr = run_cli("extract", *args, "--json")
    assert code == 0, stderr
    return json.loads(stdout)


@pytest.fixture(scope="module", params=sorted(MOE))
def moe_pair(request, tmp_path_factory):
    """BASE, a PEFT adapter (r=4, non-zero B) on both fused expert parameters and q_proj,
    and TUNED = PEFT's merge of it, saved by transformers."""
    import copy

    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp(request.param)
    model = tiny_moe(request.param)
    base = save_model(model, root / "base")
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False,
        target_parameters=["experts.gate_up_proj", "experts.down_proj"],
    )  # fmt: skip
    torch.manual_seed(1)
    get_peft_model(copy.deepcopy(model), lora).save_pretrained(root / "a")
    tuned_state = _peft_merge(base, root / "a")
    return request.param, model, base, root / "a-merged", tuned_state


def test_fused_experts_round_trip_through_peft(moe_pair, tmp_path, run_cli):
    """Extracted at the adapter's rank: PEFT loads the target_parameters adapter, its merge
    gives TUNED back within bf16 rounding, and `lora merge` equals PEFT's merge bit for bit."""
    from peft import PeftConfig

    kind, model, base, tuned, tuned_state = moe_pair
    out = tmp_path / "out"
    doc = _extract(run_cli, base, tuned, "-o", out, "--rank", "4", "--exact", "--dtype", "fp32")
    kinds = {m["module"]: m["kind"] for m in doc["modules"]}
    params = [
        f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("down_proj", "gate_up_proj")
    ]
    assert sorted(m for m, k in kinds.items() if k == "expert") == params
    assert doc["modules_to_save"] == [] and doc["dropped"] == []
    assert all(m["rank"] == 4 for m in doc["modules"])
    assert doc["totals"]["max_error"] < 0.01  # rank-4 changes: bf16 rounding only
    cfg = PeftConfig.from_pretrained(out)
    assert sorted(cfg.target_parameters) == params
    assert sorted(cfg.target_modules) == [f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)]
    keys = load_owned(out / "adapter_model.safetensors")
    experts = f"{PREFIX}model.layers.0.mlp.experts"
    # gate_up_proj registers first: PEFT nests it inside down_proj's wrapper
    e, h, i = 3, 32, 24
    assert keys[f"{experts}.base_layer.lora_A.weight"].shape == (e * 4, h)
    assert keys[f"{experts}.base_layer.lora_B.weight"].shape == (2 * i, 4 * e)
    assert keys[f"{experts}.lora_A.weight"].shape == (e * 4, i)  # down_proj: in = I

    again = _peft_merge(base, out)
    start = load_owned(base / "model.safetensors")
    assert again.keys() == tuned_state.keys() == start.keys()
    changed = 0
    for name, want in tuned_state.items():
        got, want, w = again[name].float(), want.float(), start[name].float()
        changed += not torch.equal(want, w)
        rounding = torch.finfo(torch.bfloat16).eps * (want.norm() + (want - w).norm())
        assert (got - want).norm() <= rounding, name
    # q_proj and every expert of both parameters (Mixtral: w1, w3, w2 each) in both layers
    assert changed == 2 * (1 + (2 if kind == "gpt_oss" else 3 * e))

    ours = merge_equals_peft(run_cli, base, out, tmp_path / "merged", again)
    assert ours.keys() == again.keys()

    code, stdout, _ = run_cli("validate", out, "--base", base, "--tuned", tuned, "--json")
    assert code == 0
    worst = max(t["error"] for t in json.loads(stdout)["tensors"])
    assert worst < 0.01


def _optimal_error(matrices: list[torch.Tensor], r: int) -> float:
    """Eckart–Young per expert, totalled over experts as ‖·‖_F of the whole parameter."""
    residual = total = 0.0
    for m in matrices:
        s = torch.linalg.svd(m.double(), full_matrices=False).S
        residual += float((s[r:] ** 2).sum())
        total += float((s**2).sum())
    return (residual / total) ** 0.5


def test_fused_experts_below_rank_error_is_eckart_young_per_expert(moe_pair, tmp_path, run_cli):
    """At rank 2 of rank-4 changes the reported error is the per-expert optimum: the factors
    are per expert (PEFT's layout), not one SVD of the stacked experts."""
    kind, model, base, tuned, tuned_state = moe_pair
    doc = _extract(run_cli, base, tuned, "-o", tmp_path / "out", "--rank", "2", "--exact",
                   "--dtype", "fp32")  # fmt: skip
    fused = dict(model.named_parameters())
    name = "model.layers.1.mlp.experts.gate_up_proj"
    base_param = fused[name].detach().float()
    split = {  # an expert's gate and up rows, as TUNED stores them
        "mixtral": ("model.layers.1.block_sparse_moe.experts.{}.{}.weight", ("w1", "w3")),
        "qwen3_moe": ("model.layers.1.mlp.experts.{}.{}.weight", ("gate_proj", "up_proj")),
    }
    if kind in split:
        fmt, leaves = split[kind]
        pieces = [[fmt.format(e, w) for w in leaves] for e in range(3)]
        tuned_param = torch.stack([torch.cat([tuned_state[n] for n in p]) for p in pieces])
    else:
        tuned_param = tuned_state[name]
    deltas = list(tuned_param.float() - base_param)
    by_module = {m["module"]: m for m in doc["modules"]}
    assert by_module[name]["rank"] == 2
    assert by_module[name]["error"] == pytest.approx(_optimal_error(deltas, 2), rel=1e-3)


def test_fused_experts_rank_auto_takes_the_largest_expert_rank(moe_pair, tmp_path, run_cli):
    from peft import PeftConfig

    _, _, base, tuned, _ = moe_pair
    out = tmp_path / "out"
    doc = _extract(run_cli, base, tuned, "-o", out, "--rank", "auto", "--energy", "0.999999",
                   "--max-rank", "3", "--exact", "--dtype", "fp32")  # fmt: skip
    ranks = {m["module"]: m["rank"] for m in doc["modules"]}
    assert set(ranks.values()) == {3}  # rank-4 changes: every expert needs all 3
    cfg = PeftConfig.from_pretrained(out)
    assert cfg.r == 3
    doc = _extract(run_cli, base, tuned, "-o", tmp_path / "low", "--rank", "auto",
                   "--energy", "0.2", "--max-rank", "3", "--exact")  # fmt: skip
    assert all(m["rank"] < 3 for m in doc["modules"])


def test_rank_auto_pads_experts_that_need_less(tmp_path, run_cli):
    """--rank auto: a parameter's rank is the largest any expert needs (PEFT has one r per
    target); an expert needing less keeps zero columns, an unchanged one zero factors. The
    ranks differ per parameter, so rank_pattern names a target parameter: PEFT reads it,
    merges back to TUNED, and `lora merge` equals PEFT bit for bit."""
    model = tiny_moe("gpt_oss")
    base = save_model(model, tmp_path / "base")
    g = torch.Generator().manual_seed(5)

    def low_rank(e: int, i: int, o: int, ranks: list[int]) -> torch.Tensor:
        return torch.stack([0.05 * torch.randn(i, r, generator=g) @ torch.randn(r, o, generator=g)
                            for r in ranks])  # fmt: skip

    params = dict(model.named_parameters())
    gate_up, down = (
        "model.layers.0.mlp.experts.gate_up_proj",
        "model.layers.1.mlp.experts.down_proj",
    )
    with torch.no_grad():
        params[gate_up].add_(low_rank(3, 32, 48, [1, 3, 0]).to(torch.bfloat16))
        params[down].add_(low_rank(3, 24, 32, [1, 1, 1]).to(torch.bfloat16))
    tuned = save_model(model, tmp_path / "tuned")
    out = tmp_path / "out"
    doc = _extract(run_cli, base, tuned, "-o", out, "--rank", "auto", "--energy", "0.9999",
                   "--max-rank", "8", "--exact", "--dtype", "fp32")  # fmt: skip
    assert {m["module"]: m["rank"] for m in doc["modules"]} == {gate_up: 3, down: 1}
    assert doc["totals"]["max_error"] < 0.01
    a = load_owned(out / "adapter_model.safetensors")[
        f"{PREFIX}model.layers.0.mlp.experts.lora_A.weight"
    ]
    assert a.reshape(3, 3, 32)[0, 1:].abs().max() == 0  # expert 0: rank 1 of 3
    assert a.reshape(3, 3, 32)[2].abs().max() == 0  # expert 2 unchanged
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == {re.escape(down): 1} and cfg["r"] == 3
    again = _peft_merge(base, out)
    want, start = load_owned(tuned / "model.safetensors"), load_owned(base / "model.safetensors")
    for name in (gate_up, down):
        got, w, s0 = again[name].float(), want[name].float(), start[name].float()
        rounding = torch.finfo(torch.bfloat16).eps * (w.norm() + (w - s0).norm())
        assert (got - w).norm() <= rounding, name
    merge_equals_peft(run_cli, base, out, tmp_path / "merged", again)


def test_dry_run_lists_fused_parameters(moe_pair, run_cli):
    _, _, base, tuned, _ = moe_pair
    code, stdout, stderr = run_cli("extract", base, tuned, "--dry-run", "--json")
    assert code == 0, stderr
    low = {m["tensor"]: m for m in json.loads(stdout)["low_rank"]}
    assert low["model.layers.0.mlp.experts.gate_up_proj"]["kind"] == "expert"
    assert not any(".experts.0." in t for t in low)


def test_changed_expert_tensor_of_no_fused_parameter_refused(tmp_path):
    """A 3-D expert tensor the model class does not have (a checkpoint of another layout):
    PEFT could not load it, so a change to it is refused in one line."""
    from safetensors.torch import save_file

    model = tiny_moe("gpt_oss")
    base = save_model(model, tmp_path / "base")
    state = load_owned(base / "model.safetensors")
    odd = torch.zeros(3, 4, 4, dtype=torch.bfloat16)
    for name, value in (("base2", odd), ("tuned", odd + 1)):
        folder = tmp_path / name
        folder.mkdir()
        extra = {"model.layers.0.mlp.experts.scales_proj": value}
        save_file(state | extra, folder / "model.safetensors", metadata={"format": "pt"})
        (folder / "config.json").write_text((base / "config.json").read_text())
    base2, tuned, out = tmp_path / "base2", tmp_path / "tuned", tmp_path / "out"
    assert_refused(["extract", base2, tuned, "-o", out], [base2, tuned], dest=out,
                   names=["experts.scales_proj", "MoE expert"])  # fmt: skip


def test_changed_expert_bias_ships_the_experts_module_whole(tmp_path, run_cli):
    """gpt-oss: a changed ``gate_up_proj_bias`` is no LoRA target (PEFT's ParamWrapper has no
    bias), so layer 0's experts module ships whole in modules_to_save (its fused weights' LoRA
    with it), layer 1's changed weights as target_parameters; PEFT merges back to TUNED."""
    model = tiny_moe("gpt_oss")
    base = save_model(model, tmp_path / "base")
    g = torch.Generator().manual_seed(9)
    params = dict(model.named_parameters())
    layer0, layer1 = "model.layers.0.mlp.experts", "model.layers.1.mlp.experts"
    with torch.no_grad():
        params[f"{layer0}.gate_up_proj_bias"].add_(0.1)
        params[f"{layer0}.gate_up_proj"].add_(0.01)
        change = 0.05 * torch.randn(3, 32, 2, generator=g) @ torch.randn(3, 2, 48, generator=g)
        params[f"{layer1}.gate_up_proj"].add_(change.to(torch.bfloat16))
    tuned = save_model(model, tmp_path / "tuned")
    out = tmp_path / "out"
    doc = _extract(run_cli, base, tuned, "-o", out, "--rank", "2", "--exact", "--dtype", "fp32")
    assert doc["modules_to_save"] == [layer0]
    assert [m["module"] for m in doc["modules"]] == [f"{layer1}.gate_up_proj"]
    again = _peft_merge(base, out)
    want, start = load_owned(tuned / "model.safetensors"), load_owned(base / "model.safetensors")
    for name, w in want.items():
        got, w, s0 = again[name].float(), w.float(), start[name].float()
        rounding = torch.finfo(torch.bfloat16).eps * (w.norm() + (w - s0).norm())
        assert (got - w).norm() <= rounding, name
