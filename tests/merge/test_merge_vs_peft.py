"""`lora merge` against PEFT's own merge_and_unload() and the unmerged PeftModel's logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import (
    dtype_kw,
    peft_adapter,
    peft_merged_state,
    save_model,
    tiny_model,
    ulp_diff,
)
from safetensors.torch import load_file

from lora_cli.stages.merge import merge

IDS = torch.tensor([[1, 5, 9, 33, 2, 17, 60, 3]])


def merged_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_matches_peft(ours: dict, theirs: dict, base: dict, changed_min: int = 1) -> None:
    assert set(ours) <= set(theirs), set(ours) - set(theirs)
    changed = 0
    for name, t in ours.items():
        ref = theirs[name]
        assert t.dtype == ref.dtype and t.shape == ref.shape, name
        assert ulp_diff(t, ref) <= 1, f"{name}: {ulp_diff(t, ref)} ulp from PEFT"
        if not torch.equal(t, base[name]):
            changed += 1
    assert changed >= changed_min, "the merge changed nothing: the test would prove nothing"


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


def run_case(tmp_path: Path, kind: str, dtype=torch.bfloat16, safe=True, **lora):
    model = tiny_model(kind, dtype)
    base_dir = save_model(model, tmp_path / "base")
    adapter_dir = tmp_path / "adapter"
    peft_model = peft_adapter(model, adapter_dir, safe=safe, **lora)
    result = merge(base_dir, adapter_dir, tmp_path / "out", device="cpu")
    return model, peft_model, base_dir, adapter_dir, result


CASES = {
    "llama-linear": ("llama", dict(target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"])),
    "llama-embed-lm_head": ("llama", dict(target_modules=["embed_tokens", "lm_head", "o_proj"])),
    "llama-dora": ("llama", dict(target_modules=["q_proj", "up_proj"], use_dora=True)),
    "llama-rslora-patterns": (
        "llama",
        dict(
            target_modules=["q_proj", "k_proj", "v_proj"],
            use_rslora=True,
            rank_pattern={"k_proj": 2},
            alpha_pattern={"layers.1.self_attn.v_proj": 3},
        ),
    ),
    "llama-modules-to-save": (
        "llama",
        dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
    ),
    "qwen2-bias": (
        "qwen2",
        dict(target_modules=["q_proj", "k_proj", "v_proj"], lora_bias=True, bias="all"),
    ),
    "gpt2-conv1d": ("gpt2", dict(target_modules=["c_attn", "c_proj", "c_fc"])),
    "gpt2-conv1d-dora": ("gpt2", dict(target_modules=["c_attn", "c_proj"], use_dora=True)),
    "llama-embed-dora": ("llama", dict(target_modules=["embed_tokens"], use_dora=True)),
    "llama-trainable-tokens": (
        "llama",
        dict(target_modules=["q_proj"], trainable_token_indices=[3, 7, 60]),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_equals_peft(tmp_path: Path, case: str) -> None:
    kind, lora = CASES[case]
    model, peft_model, base_dir, adapter_dir, result = run_case(tmp_path, kind, **lora)
    ours = merged_tensors(tmp_path / "out")
    base = {k: v for k, v in model.state_dict().items()}
    theirs = peft_merged_state(base_dir, adapter_dir)
    assert_matches_peft(ours, theirs, base)
    assert result.counts["merge"] + result.counts["replace"] + result.counts["rows"] >= 1


@pytest.mark.parametrize("case", ["llama-linear", "gpt2-conv1d", "llama-dora", "qwen2-bias"])
def test_merged_folder_logits_equal_unmerged_peft(tmp_path: Path, case: str) -> None:
    from transformers import AutoModelForCausalLM

    kind, lora = CASES[case]
    model, peft_model, _, _, _ = run_case(tmp_path, kind, dtype=torch.float32, **lora)
    out = tmp_path / "out"
    merged = AutoModelForCausalLM.from_pretrained(out, **dtype_kw(torch.float32)).eval()
    expected = logits(peft_model)
    assert not torch.allclose(expected, logits(model), atol=1e-3), "adapter has no effect"
    torch.testing.assert_close(logits(merged), expected, atol=2e-4, rtol=1e-4)


def test_bin_only_adapter_merges_like_safetensors(tmp_path: Path) -> None:
    """Seed case: loaders that know only one of adapter_model.bin / .safetensors."""
    kind, lora = CASES["llama-linear"]
    model, _, base_dir, adapter_dir, _ = run_case(tmp_path, kind, safe=False, **lora)
    assert (adapter_dir / "adapter_model.bin").is_file()
    assert not (adapter_dir / "adapter_model.safetensors").exists()
    ours = merged_tensors(tmp_path / "out")
    assert_matches_peft(ours, peft_merged_state(base_dir, adapter_dir), model.state_dict())


@pytest.mark.parametrize("target", [["lm_head"], ["embed_tokens"], ["embed_tokens", "lm_head"]])
def test_tied_embeddings_are_untied_and_match_unmerged_logits(tmp_path: Path, target) -> None:
    """PEFT's in-place merge adds the lm_head delta to the shared embedding; we untie."""
    from transformers import AutoModelForCausalLM

    model, peft_model, _, _, result = run_case(
        tmp_path, "llama-tied", dtype=torch.float32, target_modules=target
    )
    assert result.untied
    out = tmp_path / "out"
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    tensors = merged_tensors(out)
    assert "lm_head.weight" in tensors and "model.embed_tokens.weight" in tensors
    merged = AutoModelForCausalLM.from_pretrained(out, **dtype_kw(torch.float32)).eval()
    torch.testing.assert_close(logits(merged), logits(peft_model), atol=2e-4, rtol=1e-4)


def test_tied_model_untouched_embeddings_stay_tied(tmp_path: Path) -> None:
    _, _, _, _, result = run_case(tmp_path, "llama-tied", target_modules=["q_proj"])
    out = tmp_path / "out"
    assert not result.untied
    assert "lm_head.weight" not in merged_tensors(out)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True


def test_untouched_tensors_are_byte_identical_and_layout_kept(tmp_path: Path) -> None:
    model = tiny_model("llama")
    base_dir = save_model(model, tmp_path / "base", max_shard_size="20KB")
    peft_adapter(model, tmp_path / "adapter", target_modules=["q_proj"])
    merge(base_dir, tmp_path / "adapter", tmp_path / "out", device="cpu")
    base_files = sorted(p.name for p in base_dir.glob("*.safetensors"))
    assert len(base_files) > 1
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == base_files
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    base_index = json.loads((base_dir / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == base_index["weight_map"]
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in merged_tensors(tmp_path / "out").values()
    )
    ours, base = merged_tensors(tmp_path / "out"), merged_tensors(base_dir)
    for name, t in base.items():
        if "q_proj" not in name:
            assert torch.equal(t.view(torch.uint8), ours[name].view(torch.uint8)), name
        else:
            assert not torch.equal(t, ours[name]), name


@pytest.mark.parametrize(
    "case, streamed", [("llama-linear", True), ("llama-embed-lm_head", True), ("llama-dora", False)]
)
def test_row_block_streaming_gives_the_same_bytes(
    tmp_path: Path, monkeypatch, case: str, streamed: bool
) -> None:
    """Big projections are merged in row blocks; the result must not depend on it."""
    import lora_cli.merge.run as run

    kind, lora = CASES[case]
    model, _, base_dir, adapter_dir, _ = run_case(tmp_path, kind, **lora)
    whole = merged_tensors(tmp_path / "out")
    blocks: list[int] = []
    real = run.row_blocks

    def spy(plan, act):
        got = real(plan, act)
        blocks.append(len(got or []))
        return got

    monkeypatch.setattr(run, "BLOCK_BYTES", 100)  # a few rows per block
    monkeypatch.setattr(run, "row_blocks", spy)
    merge(base_dir, adapter_dir, tmp_path / "blocks", device="cpu")
    assert (max(blocks) > 1) == streamed  # DoRA norms need whole rows sets: never split
    got = merged_tensors(tmp_path / "blocks")
    assert got.keys() == whole.keys()
    for name, t in whole.items():
        assert torch.equal(t.view(torch.uint8), got[name].view(torch.uint8)), name
    assert_matches_peft(got, peft_merged_state(base_dir, adapter_dir), model.state_dict())
