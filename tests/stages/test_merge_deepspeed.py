"""``lora merge`` of DeepSpeed ZeRO checkpoints against DeepSpeed's own zero_to_fp32 followed
by PEFT's merge_and_unload, and against the unmerged PeftModel's logits."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import peft_oracle, ulp_diff
from safetensors.torch import load_file

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _zero_to_fp32(folder: Path) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(folder))


def _merged(folder: Path) -> dict:
    return load_file(folder / "model.safetensors")


def _check_against_oracle(out: Path, unmerged, expected: dict) -> None:
    from transformers import AutoModelForCausalLM

    got = _merged(out)
    assert set(got) == set(expected) - {"lm_head.weight"} or set(got) == set(expected)
    for name, value in got.items():
        assert value.dtype == expected[name].dtype, name
        assert ulp_diff(value, expected[name]) <= 1, name
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.arange(24).reshape(2, 12) % 128
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, unmerged(input_ids=ids).logits)


@pytest.mark.parametrize(
    "variant", ["zero2", "zero3", "zero3-bf16-trainable-only"], ids=lambda v: v
)
def test_zero_merge_matches_zero_to_fp32_and_peft(deepspeed_2ranks, tmp_path, run_cli, variant):
    root = deepspeed_2ranks
    ckpt = root / variant
    out = tmp_path / "merged"
    code, _, err = run_cli("merge", ckpt, "-o", out, "--base", root / "base", "-q")
    assert code == 0, err
    unmerged, expected = peft_oracle(root / "base", ckpt, _zero_to_fp32(ckpt))
    _check_against_oracle(out, unmerged, expected)
    # the trained embedding made it (it is not in what save_pretrained writes)
    base = load_file(root / "base" / "model.safetensors")
    assert not torch.equal(_merged(out)["model.embed_tokens.weight"],
                           base["model.embed_tokens.weight"])  # fmt: skip


@pytest.mark.parametrize("variant", ["zero1", "zero3-subgroups"])
def test_zero_merge_three_ranks(deepspeed_3ranks, tmp_path, run_cli, variant):
    root = deepspeed_3ranks
    ckpt = root / variant
    out = tmp_path / "merged"
    code, _, err = run_cli("merge", ckpt, "-o", out, "--base", root / "base", "-q")
    assert code == 0, err
    unmerged, expected = peft_oracle(root / "base", ckpt, _zero_to_fp32(ckpt))
    _check_against_oracle(out, unmerged, expected)


def test_zero_merge_without_base_uses_checkpoint_weights(deepspeed_2ranks, tmp_path, run_cli):
    ckpt = deepspeed_2ranks / "zero3"
    out = tmp_path / "merged"
    code, _, err = run_cli("merge", ckpt, "-o", out, "-q")
    assert code == 0, err
    with_base = tmp_path / "with-base"
    assert (
        run_cli("merge", ckpt, "-o", with_base, "--base", deepspeed_2ranks / "base", "-q")[0] == 0
    )
    a, b = _merged(out), _merged(with_base)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not (out / "config.json").exists()


def test_bf16_optimizer_uses_module_weights(deepspeed_2ranks, tmp_path, run_cli):
    """No zero_stage: zero_to_fp32 refuses; the 16-bit ``module`` is complete."""
    from lora_cli.io.torch_zip import TorchZipFile

    ckpt = deepspeed_2ranks / "bf16-optimizer"
    with pytest.raises(ValueError, match="not a zero checkpoint"):
        _zero_to_fp32(ckpt)
    out = tmp_path / "merged"
    code, stdout, err = run_cli("merge", ckpt, "-o", out, "--base", deepspeed_2ranks / "base",
                                "--json")  # fmt: skip
    assert code == 0, err
    assert "BF16_Optimizer" in stdout
    with TorchZipFile(ckpt / "global_step2" / "mp_rank_00_model_states.pt") as z:
        assert z.unwrapped == "module"
        state = {k: z.read(k) for k in z.records}
    unmerged, expected = peft_oracle(deepspeed_2ranks / "base", ckpt, state)
    _check_against_oracle(out, unmerged, expected)


def test_adapter_config_is_required(deepspeed_2ranks, tmp_path, run_cli):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(deepspeed_2ranks / "zero2", ckpt)
    (ckpt / "adapter_config.json").unlink()
    code, _, err = run_cli("merge", ckpt, "-o", tmp_path / "out")
    assert code == 2 and "adapter_config.json" in err and "--adapter-config" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    code, _, err = run_cli("merge", ckpt, "-o", tmp_path / "out", "--adapter-config",
                           deepspeed_2ranks / "zero2" / "adapter_config.json", "-q")  # fmt: skip
    assert code == 0, err


def test_tied_trainable_tokens_under_zero3(deepspeed_3ranks, tmp_path, run_cli):
    """shared_params: lm_head.token_adapter.* alias the embedding's; the token rows are
    replaced once and the model stays tied (config and a single embedding tensor)."""
    import json

    root = deepspeed_3ranks
    ckpt = root / "zero3-tied-tokens"
    out = tmp_path / "merged"
    code, _, err = run_cli("merge", ckpt, "-o", out, "--base", root / "base-tied", "-q")
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    unmerged, expected = peft_oracle(root / "base-tied", ckpt, _zero_to_fp32(ckpt))
    assert "lm_head.weight" not in _merged(out)
    _check_against_oracle(out, unmerged, expected)
