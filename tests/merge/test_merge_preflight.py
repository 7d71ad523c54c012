"""Preflight: every problem is found before a byte is written; names resolve by rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import load_owned, peft_adapter, save_model, tiny_model
from safetensors.torch import load_file, save_file

from lora_cli.errors import MergeError
from lora_cli.stages.merge import DryRun, merge


def make(tmp_path: Path, kind: str = "llama", **lora) -> tuple[Path, Path]:
    lora.setdefault("target_modules", ["q_proj", "v_proj"])
    model = tiny_model(kind)
    base = save_model(model, tmp_path / "base")
    peft_adapter(model, tmp_path / "adapter", **lora)
    return base, tmp_path / "adapter"


def edit_config(adapter: Path, **changes) -> None:
    path = adapter / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def nothing_written(tmp_path: Path) -> None:
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if ".lora-tmp-" in p.name]


def test_adapter_with_more_layers_than_base(tmp_path: Path, run_cli) -> None:
    base_dir = save_model(tiny_model("llama"), tmp_path / "base")
    bigger = tiny_model("llama", num_hidden_layers=3)
    peft_adapter(bigger, tmp_path / "adapter", target_modules=["q_proj", "v_proj"])
    code, out, err = run_cli("merge", base_dir, tmp_path / "adapter", "-o", tmp_path / "out")
    assert code == 2
    line = err.strip()
    assert line.count("\n") == 0 and line.startswith("error:")
    assert "layers.2.self_attn" in line and "2 adapter tensors do not fit" in line
    assert "different model or layer count" in line
    nothing_written(tmp_path)


def test_adapter_for_another_model_size(tmp_path: Path) -> None:
    save_model(tiny_model("llama"), tmp_path / "base")
    other = tiny_model("llama", hidden_size=48, intermediate_size=64)
    peft_adapter(other, tmp_path / "adapter", target_modules=["q_proj"])
    with pytest.raises(MergeError, match="does not fit.*different model size"):
        merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", device="cpu")
    nothing_written(tmp_path)


def test_many_offenders_are_listed_then_counted(tmp_path: Path) -> None:
    base, adapter = make(tmp_path, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    tensors = load_owned(adapter / "adapter_model.safetensors")
    renamed = {k.replace("self_attn", "attention"): v for k, v in tensors.items()}
    save_file(renamed, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MergeError) as info:
        merge(base, adapter, tmp_path / "out", device="cpu")
    msg = str(info.value)
    assert "8 adapter tensors do not fit" in msg and "(and 5 more)" in msg
    nothing_written(tmp_path)


def test_empty_adapter_is_an_error_not_a_noop(tmp_path: Path) -> None:
    base, adapter = make(tmp_path)
    save_file({}, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    assert (adapter / "adapter_model.safetensors").stat().st_size == 40  # the ZeRO-3 save
    with pytest.raises(MergeError, match="no LoRA"):
        merge(base, adapter, tmp_path / "out", device="cpu")
    nothing_written(tmp_path)


@pytest.mark.parametrize(
    "changes, reason",
    [
        ({"init_lora_weights": "pissa"}, "mutates the base"),
        ({"init_lora_weights": "olora"}, "mutates the base"),
        ({"alora_invocation_tokens": [1, 2]}, "aLoRA"),
        ({"layer_replication": [[0, 2]]}, "layer_replication"),
        ({"megatron_config": {"tp": 2}}, "Megatron"),
        ({"peft_type": "IA3"}, "not LORA"),
    ],
)
def test_unmergeable_adapters_are_refused(tmp_path: Path, changes: dict, reason: str) -> None:
    base, adapter = make(tmp_path)
    edit_config(adapter, **changes)
    with pytest.raises(MergeError, match=reason):
        merge(base, adapter, tmp_path / "out", device="cpu")
    nothing_written(tmp_path)


def test_zero_size_and_nan_tensors_are_refused(tmp_path: Path) -> None:
    base, adapter = make(tmp_path)
    tensors = load_owned(adapter / "adapter_model.safetensors")
    key = next(k for k in tensors if "lora_B" in k)
    broken = dict(tensors, **{key: torch.empty(0)})
    save_file(broken, adapter / "adapter_model.safetensors")
    with pytest.raises(MergeError, match="ZeRO-3"):
        merge(base, adapter, tmp_path / "out", device="cpu")
    tensors[key][0, 0] = float("nan")
    save_file(tensors, adapter / "adapter_model.safetensors")
    with pytest.raises(MergeError, match=r"1 NaN/Inf"):
        merge(base, adapter, tmp_path / "out", device="cpu")
    nothing_written(tmp_path)


def test_grouped_conv_is_refused(tmp_path: Path) -> None:
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    save_file({"conv.weight": torch.randn(8, 2, 3, 3)}, base_dir / "model.safetensors")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file(
        {
            "base_model.model.conv.lora_A.weight": torch.randn(4, 8, 3, 3),
            "base_model.model.conv.lora_B.weight": torch.randn(8, 4, 1, 1),
        },
        adapter / "adapter_model.safetensors",
    )
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 4})
    )
    with pytest.raises(MergeError, match="groups > 1"):
        merge(base_dir, adapter, tmp_path / "out", device="cpu")


def test_dry_run_writes_nothing_and_lists_the_plan(tmp_path: Path, run_cli) -> None:
    base, adapter = make(tmp_path)
    result = merge(base, adapter, tmp_path / "out", dry_run=True, device="cpu")
    assert isinstance(result, DryRun)
    doc = result.to_json()
    assert doc["counts"]["merge"] == 4 and doc["counts"]["copy"] > 0
    assert "model.layers.0.self_attn.q_proj.weight" in doc["tensors"]["merge"]
    code, out, _ = run_cli("merge", base, adapter, "--dry-run", "--json")
    assert code == 0 and json.loads(out)["schema"] == "lora-merge-plan/1"
    nothing_written(tmp_path)


def _rename_base(base: Path, fn) -> None:
    tensors = load_owned(base / "model.safetensors")
    save_file({fn(k): v for k, v in tensors.items()}, base / "model.safetensors", {"format": "pt"})


@pytest.mark.parametrize(
    "kind, rename, rule",
    [
        ("gpt2", lambda k: k.removeprefix("transformer."), "strip 'transformer.'"),
        (
            "llama",
            lambda k: k.replace("model.", "model.language_model.", 1),
            "model.language_model",
        ),
        (
            "llama",
            lambda k: k.replace("model.", "language_model.model.", 1),
            "language_model.model",
        ),
    ],
)
def test_name_resolution_rules(tmp_path: Path, kind: str, rename, rule: str) -> None:
    lora = {"target_modules": ["c_attn"] if kind == "gpt2" else ["q_proj"]}
    base, adapter = make(tmp_path, kind, **lora)
    reference = merge(base, adapter, tmp_path / "ref", device="cpu")
    assert reference.rule == "identity"
    expected = {rename(k): v for k, v in load_file(tmp_path / "ref" / "model.safetensors").items()}
    _rename_base(base, rename)
    result = merge(base, adapter, tmp_path / "out", device="cpu")
    assert rule in result.rule
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got)


def test_ms_swift_regex_target_modules(tmp_path: Path) -> None:
    """The regex string is never used to find targets; the tensor keys are."""
    base, adapter = make(tmp_path)
    edit_config(adapter, target_modules="^(model)(?!.*(lm_head|output|emb|wte|shared)).*")
    (adapter / "additional_config.json").write_text('{"lora_dtype": null}')
    result = merge(base, adapter, tmp_path / "out", device="cpu")
    assert result.counts["merge"] == 4


def test_dtype_and_max_shard_size_replan_the_layout(tmp_path: Path) -> None:
    base, adapter = make(tmp_path)
    merge(base, adapter, tmp_path / "out", dtype="fp32", max_shard_size="20KB", device="cpu")
    out = tmp_path / "out"
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and all(p.stat().st_size < 60_000 for p in shards)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = {k: v for p in shards for k, v in load_file(p).items()}
    assert set(index["weight_map"]) == set(tensors)
    assert all(t.dtype == torch.float32 for t in tensors.values())
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "float32"
    assert config.get("torch_dtype", "float32") == "float32"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)  # loads as is


def test_pickled_base_merges_into_safetensors(tmp_path: Path) -> None:
    model = tiny_model("llama")
    base = save_model(model, tmp_path / "base", safe=False)
    peft_adapter(model, tmp_path / "adapter", target_modules=["q_proj"])
    safe_base = save_model(model, tmp_path / "safe-base")
    merge(base, tmp_path / "adapter", tmp_path / "out", device="cpu")
    merge(safe_base, tmp_path / "adapter", tmp_path / "ref", device="cpu")
    got = load_file(tmp_path / "out" / "model.safetensors")
    ref = load_file(tmp_path / "ref" / "model.safetensors")
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in got)
