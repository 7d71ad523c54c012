"""``lora merge`` of an FSDP2 torch.distributed.checkpoint folder against torch's
dcp_to_torch_save followed by PEFT's merge_and_unload, and the unmerged model's logits."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import peft_oracle, ulp_diff
from safetensors.torch import load_file


def _dcp_to_torch_save(folder: Path, tmp_path: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(folder), str(tmp_path / "oracle.pt"))
    return torch.load(tmp_path / "oracle.pt")["model"]


def test_dcp_reader_matches_dcp_to_torch_save(fsdp_3ranks, tmp_path):
    from lora_cli.sources.dcp import open_dcp

    folder = fsdp_3ranks / "ckpt" / "pytorch_model_fsdp_0"
    expected = _dcp_to_torch_save(folder, tmp_path)
    source, details = open_dcp(folder)
    with source:
        assert set(source.names()) == set(expected)
        for name, value in expected.items():
            assert torch.equal(source.read(name), value), name
    assert details["prefix_stripped"] == "model." and len(details["files"]) == 3


def test_fsdp_merge_matches_peft(fsdp_3ranks, tmp_path, run_cli):
    from transformers import AutoModelForCausalLM

    ckpt = fsdp_3ranks / "ckpt"
    out = tmp_path / "merged"
    code, stdout, err = run_cli("merge", ckpt, "-o", out, "--base", fsdp_3ranks / "base", "--json")
    assert code == 0, err
    assert "pytorch_model_fsdp_0" in stdout
    state = _dcp_to_torch_save(ckpt / "pytorch_model_fsdp_0", tmp_path)
    unmerged, expected = peft_oracle(fsdp_3ranks / "base", ckpt, state)
    got = load_file(out / "model.safetensors")
    assert set(got) == set(expected)
    for name, value in got.items():
        assert ulp_diff(value, expected[name]) <= 1, name
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.arange(24).reshape(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, unmerged(input_ids=ids).logits)
