"""Quantized bases merge in row blocks, bit for bit as the whole-tensor path does.

Each base is merged twice, in both modes (bf16 and ``--quantize keep``): once with blocks
so large that every tensor goes whole, once with blocks so small that every touched tensor
streams through (FP8 weights ``block[0]`` rows at a time, including DeepSeek's ragged
576-row ``kv_a_proj_with_mqa`` and layer 1's scales in the other shard; INT4 rows; MXFP4
one expert at a time). The outputs and the fidelity reports must be identical, and the
streamed run must never decode a touched tensor whole.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from quant_helpers import (
    ct_int4_base,
    fp8_block_base,
    load_folder,
    mxfp4_base,
    raw_bytes,
    tiny_deepseek,
    tiny_gpt_oss,
)

from lora_cli.stages.merge import merge


def _adapter(bf16: Path, out: Path, **lora) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.bfloat16)
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **lora)
    get_peft_model(model, config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("rowblocks")
    deepseek = tiny_deepseek(root / "deepseek")
    moe = {"target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]}
    ds_adapter = _adapter(
        deepseek, root / "ds-adapter", target_modules=["q_a_proj", "kv_a_proj_with_mqa"], **moe
    )
    gpt_oss = tiny_gpt_oss(root / "gpt-oss")
    return {
        "fp8": (fp8_block_base(deepseek, root / "fp8"), ds_adapter),
        "int4": (ct_int4_base(deepseek, root / "int4"), ds_adapter),
        "mxfp4": (
            mxfp4_base(gpt_oss, root / "mxfp4"),
            _adapter(gpt_oss, root / "oss-adapter", target_modules=["q_proj"], **moe),
        ),
    }


def _merge(base: Path, adapter: Path, out: Path, quantize: str) -> list:
    result = merge(base, adapter, out, device="cpu", quantize=quantize)
    return sorted(result.quantized, key=lambda r: r["tensor"])


@pytest.mark.parametrize("quantize", ["bf16", "keep"])
@pytest.mark.parametrize("scheme", ["fp8", "int4", "mxfp4"])
def test_row_block_merge_equals_whole_tensor_merge(
    bases, tmp_path, monkeypatch, scheme, quantize
) -> None:
    import lora_cli.merge.run as run
    from lora_cli.sources.quantized import QuantizedTensor

    base, adapter = bases[scheme]
    monkeypatch.setattr(run, "BLOCK_BYTES", 1 << 40)  # everything whole
    whole_report = _merge(base, adapter, tmp_path / "whole", quantize)

    decoded: list[tuple[str, tuple[int, int] | None]] = []
    decode = QuantizedTensor.decode

    def spy(self, raw, rows=None, device=None):
        decoded.append((self.name, rows))
        return decode(self, raw, rows, device)

    monkeypatch.setattr(QuantizedTensor, "decode", spy)
    monkeypatch.setattr(run, "BLOCK_BYTES", 2048)  # every touched tensor streams
    blocked_report = _merge(base, adapter, tmp_path / "blocks", quantize)

    whole, blocked = load_folder(tmp_path / "whole"), load_folder(tmp_path / "blocks")
    assert whole.keys() == blocked.keys()
    for name, t in whole.items():
        assert raw_bytes(blocked[name]) == raw_bytes(t), name
    assert blocked_report == whole_report
    assert (quantize == "keep") == bool(whole_report)
    # every touched quantized tensor was decoded in blocks, never whole
    assert decoded and all(rows is not None for _, rows in decoded), decoded
    names = {n for n, _ in decoded}
    if scheme == "fp8":
        assert "model.layers.1.self_attn.kv_a_proj_with_mqa.weight" in names  # 576 rows
    if scheme == "mxfp4":  # one expert per block (2 experts, a few KiB each)
        assert {rows[1] - rows[0] for _, rows in decoded} == {1}
    config = json.loads((tmp_path / "blocks" / "config.json").read_text())
    assert config == json.loads((tmp_path / "whole" / "config.json").read_text())


def _sample_densely(monkeypatch) -> None:
    """Sampling on for these tiny tensors: every 2nd granule of one scale unit."""
    import lora_cli.merge.requant as requant

    monkeypatch.setattr(requant, "SAMPLE_ALL", 0)
    monkeypatch.setattr(requant, "SAMPLE_VALUES", 1)
    monkeypatch.setattr(requant, "SAMPLE_EVERY", 2)


@pytest.mark.parametrize("scheme", ["fp8", "int4", "mxfp4"])
def test_sampled_fidelity_is_the_same_whole_or_in_blocks(
    bases, tmp_path, monkeypatch, scheme
) -> None:
    import lora_cli.merge.run as run

    base, adapter = bases[scheme]
    every_row = _merge(base, adapter, tmp_path / "all", "keep")
    _sample_densely(monkeypatch)
    monkeypatch.setattr(run, "BLOCK_BYTES", 1 << 40)
    whole = _merge(base, adapter, tmp_path / "whole", "keep")
    monkeypatch.setattr(run, "BLOCK_BYTES", 2048)
    blocked = _merge(base, adapter, tmp_path / "blocks", "keep")
    assert whole == blocked
    assert [r["cosine"] for r in whole] != [r["cosine"] for r in every_row]  # it sampled


def test_fp8_keep_cosine_is_the_cosine_of_the_sampled_rows(bases, tmp_path, monkeypatch) -> None:
    """The reported cosine, recomputed in fp64 from the written files by transformers'
    own FP8 dequantizer: intended = bf16 merge − base, achieved = kept weight − base, over
    the sampled granules (128-row scale blocks 0, 2, 4…, DeepSeek's ragged last one too)."""
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    base, adapter = bases["fp8"]
    _sample_densely(monkeypatch)
    reports = _merge(base, adapter, tmp_path / "keep", "keep")
    _merge(base, adapter, tmp_path / "bf16", "bf16")
    raw, kept = load_folder(base), load_folder(tmp_path / "keep")
    merged = load_folder(tmp_path / "bf16")

    def decode(folder: dict, name: str) -> torch.Tensor:
        q, s = folder[name], folder[f"{name}_scale_inv"]
        return _dequantize_fp8_weight(q, s, [128, 128], torch.float32).to(torch.bfloat16)

    checked = 0
    for report in reports:
        name = report["tensor"]
        rows = torch.arange(merged[name].shape[0])
        sampled = (rows // 128) % 2 == 0
        b = decode(raw, name).double()[sampled]
        intended = merged[name].double()[sampled] - b
        got = decode(kept, name).double()[sampled] - b
        cosine = float((intended * got).sum() / (intended.norm() * got.norm()))
        assert report["cosine"] == pytest.approx(cosine, abs=2e-6), name
        checked += merged[name].shape[0] > 128
    assert checked  # some tensor had unsampled rows


@pytest.mark.parametrize("scheme", ["fp8", "int4", "mxfp4"])
def test_finished_groups_hold_no_rows(bases, tmp_path, monkeypatch, scheme) -> None:
    """Every re-quantized group lives as long as the plan; once written it must hold none
    of its tensor (INT4's scales are 1/16 of the weights: kept, a 1.6 GiB merge's RSS grew
    by 40 MiB)."""
    import lora_cli.merge.quantized as quantized
    import lora_cli.merge.run as run

    groups: list = []
    real = quantized.requantize_actions

    def spy(plan, view):
        real(plan, view)
        groups.extend(plan.quantized)

    monkeypatch.setattr(quantized, "requantize_actions", spy)
    monkeypatch.setattr(run, "BLOCK_BYTES", 2048)
    base, adapter = bases[scheme]
    _merge(base, adapter, tmp_path / "out", "keep")
    assert groups and all(g._scale is None and not g._parts for g in groups)
