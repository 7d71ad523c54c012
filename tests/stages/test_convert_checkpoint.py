"""``lora convert`` of training checkpoints: a plain model's DeepSpeed checkpoint becomes
the safetensors model zero_to_fp32 gives; a PeftModel's becomes a PEFT adapter folder that
holds the trained embedding too (the recovery for ZeRO-3 "empty adapter" saves)."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def test_plain_zero_checkpoint_converts_like_zero_to_fp32(deepspeed_3ranks, tmp_path, run_cli):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt = deepspeed_3ranks / "plain-zero2"
    out = tmp_path / "model"
    code, stdout, err = run_cli("convert", ckpt, "-o", out, "--json", "--max-shard-size", "40KB")
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["kind"] == "checkpoint" and doc["verified"]
    assert (out / "model.safetensors.index.json").is_file()
    got = {}
    for f in out.glob("*.safetensors"):
        got.update(load_file(f))
    expected = get_fp32_state_dict_from_zero_checkpoint(str(ckpt))
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], expected[k]) for k in got)


def test_zero3_peft_checkpoint_converts_to_an_adapter_with_the_trained_embedding(
    deepspeed_2ranks, tmp_path, run_cli
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root = deepspeed_2ranks
    adapter = tmp_path / "adapter"
    code, stdout, err = run_cli("convert", root / "zero3", "-o", adapter, "--json")
    assert code == 0, err
    assert json.loads(stdout)["kind"] == "adapter"
    keys = set(load_file(adapter / "adapter_model.safetensors"))
    assert "base_model.model.model.embed_tokens.weight" in keys
    assert "base_model.model.lm_head.weight" in keys  # the modules_to_save copy, PEFT's form
    assert not any(".default." in k for k in keys)
    # merging base + recovered adapter gives exactly what merging the checkpoint gives
    a, b = tmp_path / "via-adapter", tmp_path / "via-ckpt"
    assert run_cli("merge", root / "base", adapter, "-o", a, "-q")[0] == 0
    assert run_cli("merge", root / "zero3", "--base", root / "base", "-o", b, "-q")[0] == 0
    ma, mb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert set(ma) == set(mb) and all(torch.equal(ma[k], mb[k]) for k in ma)
    # and PEFT itself loads it, trained embedding included
    base = AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload().state_dict()
    torch.testing.assert_close(merged["model.embed_tokens.weight"], mb["model.embed_tokens.weight"])
