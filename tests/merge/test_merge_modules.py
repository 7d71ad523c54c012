"""Merging into plain nn.Module state dicts (no config.json): convs, a projector, an LM."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import ulp_diff
from safetensors.torch import load_file, save_file
from torch import nn

from lora_cli.stages.merge import merge


class VisionLM(nn.Module):
    """A small multimodal-style model: vision convs → projector → language model."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 3, padding=1)
        self.pointwise = nn.Conv2d(8, 8, 1)
        self.temporal = nn.Conv1d(8, 8, 3, padding=1)
        self.volume = nn.Conv3d(2, 4, (1, 1, 3), padding=(0, 0, 1))
        self.projector = nn.Linear(8, 16)
        self.embed = nn.Embedding(32, 16)
        self.block = nn.Linear(16, 16)
        self.head = nn.Linear(16, 32)

    def forward(self, image: torch.Tensor, ids: torch.Tensor, vol: torch.Tensor) -> torch.Tensor:
        x = self.pointwise(self.patch(image)).mean(dim=(2, 3))  # (B, 8)
        x = self.temporal(x[:, :, None].repeat(1, 1, 4)).mean(-1)
        v = self.volume(vol).mean()
        h = self.embed(ids) + self.projector(x)[:, None, :] + v
        return self.head(torch.tanh(self.block(h)))


INPUTS = (
    torch.randn(2, 3, 6, 6),
    torch.tensor([[1, 4, 9], [3, 30, 2]]),
    torch.randn(1, 2, 2, 2, 5),
)


def build(tmp_path: Path, dtype: torch.dtype, targets: list[str], **lora):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = VisionLM().to(dtype).eval()
    (tmp_path / "base").mkdir()
    save_file(model.state_dict(), tmp_path / "base" / "model.safetensors")
    torch.manual_seed(1)
    cfg = LoraConfig(r=4, lora_alpha=6, target_modules=targets, init_lora_weights=False, **lora)
    peft_model = get_peft_model(copy.deepcopy(model), cfg).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    return model, peft_model


@pytest.mark.parametrize("use_dora", [False, True])
def test_module_without_config_matches_peft(tmp_path: Path, use_dora: bool) -> None:
    from peft import PeftModel

    targets = ["patch", "pointwise", "temporal", "projector", "embed", "block", "head"]
    model, _ = build(tmp_path, torch.bfloat16, targets, use_dora=use_dora)
    result = merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", device="cpu")
    assert result.counts["merge"] == len(targets)
    ours = load_file(tmp_path / "out" / "model.safetensors")
    fresh = copy.deepcopy(model)
    theirs = PeftModel.from_pretrained(fresh, tmp_path / "adapter").merge_and_unload().state_dict()
    for name in targets:
        key = f"{name}.weight"
        assert not torch.equal(ours[key], model.state_dict()[key]), key
        assert ulp_diff(ours[key], theirs[key]) <= 1, key
    for key, value in model.state_dict().items():
        if key.split(".")[0] not in targets:
            assert torch.equal(ours[key], value), key


def test_conv3d_1x1xk_kernel_that_peft_cannot_merge(tmp_path: Path) -> None:
    """PEFT 0.21.2's 1×1 shortcut crashes on (1,1,k) Conv3d kernels; the forward pass is the
    oracle here: our merged weights must reproduce the unmerged adapter's outputs."""
    model, peft_model = build(tmp_path, torch.float32, ["volume", "block"])
    with pytest.raises(RuntimeError):
        copy.deepcopy(peft_model).merge_and_unload()
    merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", device="cpu")
    merged = copy.deepcopy(model)
    merged.load_state_dict(load_file(tmp_path / "out" / "model.safetensors"))
    with torch.no_grad():
        expected = peft_model(*INPUTS)
        assert not torch.allclose(expected, model(*INPUTS), atol=1e-4)
        torch.testing.assert_close(merged(*INPUTS), expected, atol=1e-5, rtol=1e-5)
