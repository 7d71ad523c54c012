"""Block geometry of the FP8 codec against transformers' own dequantizer, and the row-block
codec path against the whole-tensor one.

Scales are drawn at random per block (not derived from the weight), so a decoder that
applies any block's scale to another block's elements (the ragged column edge taking the
first column block's scale, rows and columns of a non-square block swapped) is caught.
"""

from __future__ import annotations

import pytest
import torch

from lora_cli.io import quant

SHAPES = [(256, 200), (130, 300)]
BLOCKS = [(128, 128), (128, 64), (64, 128)]


def _random_fp8(rows: int, cols: int, block: tuple[int, int], seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(rows, cols, generator=gen) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    grid = (-(-rows // block[0]), -(-cols // block[1]))
    s = torch.rand(grid, generator=gen) * 0.01 + 1e-4  # a distinct scale per block
    return q, s


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("shape", SHAPES)
def test_fp8_block_dequant_matches_transformers_on_ragged_and_non_square_blocks(
    shape, block
) -> None:
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    q, s = _random_fp8(*shape, block)
    theirs = _dequantize_fp8_weight(q, s, list(block), torch.float32)
    assert torch.equal(quant.fp8_block_dequant(q, s, block, torch.float32), theirs)
    ours = quant.fp8_block_dequant(q, s, block, torch.bfloat16)
    assert torch.equal(ours, theirs.to(torch.bfloat16))


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("shape", SHAPES)
def test_fp8_block_quant_round_trips_on_ragged_and_non_square_blocks(shape, block) -> None:
    """Re-encoding a decoded weight gives back its scales and bytes, whatever the geometry
    (a quantizer whose amax or scale grid mixed up blocks would not)."""
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    torch.manual_seed(1)
    w = torch.randn(*shape) * torch.rand(1, shape[1]) * 4  # column-dependent magnitudes
    q, s = quant.fp8_block_quant(w, block, torch.float32, pow2=False)
    assert tuple(s.shape) == (-(-shape[0] // block[0]), -(-shape[1] // block[1]))
    decoded = _dequantize_fp8_weight(q, s, list(block), torch.float32)
    q2, s2 = quant.fp8_block_quant(decoded, block, torch.float32, pow2=False)
    assert torch.equal(s2, s)
    assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8))


def _two_shards(tmp_path, weights: dict, scales: dict, config: dict):
    """Weights in one shard, their scales (and packing tensors) in another, with an index:
    the row-block reader must find a scale wherever it lives."""
    import json

    from safetensors.torch import save_file

    save_file(weights, tmp_path / "model-00001-of-00002.safetensors")
    save_file(scales, tmp_path / "model-00002-of-00002.safetensors")
    weight_map = dict.fromkeys(weights, "model-00001-of-00002.safetensors")
    weight_map |= dict.fromkeys(scales, "model-00002-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": weight_map}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def _codec_checkpoints(tmp_path):
    """One small checkpoint per codec and geometry: (folder, config, names)."""
    gen = torch.Generator().manual_seed(5)
    out = []
    for block in [(128, 64), (64, 128)]:  # FP8 block, ragged on both axes, non-square
        q, s = _random_fp8(300, 200, block)
        folder = tmp_path / f"fp8-{block[0]}x{block[1]}"
        folder.mkdir()
        config = {"quantization_config": {"quant_method": "fp8", "weight_block_size": list(block)}}
        out.append(
            (_two_shards(folder, {"a.weight": q}, {"a.weight_scale_inv": s}, config), config)
        )
    ct = {"quant_method": "compressed-tensors", "config_groups": {}}
    w = torch.randn(130, 96, generator=gen).to(torch.bfloat16)
    packed_q, packed_s = quant.ct_int_quant(w, 32, torch.bfloat16)
    fp8_rows = torch.randn(130, 300, generator=gen).to(torch.bfloat16)
    ch_q, ch_s = quant.ct_float_quant(fp8_rows, (130, 1), None, torch.bfloat16)
    blk_q, blk_s = quant.ct_float_quant(fp8_rows, (3, 3), (64, 128), torch.bfloat16)
    folder = tmp_path / "ct"
    folder.mkdir()
    group = {"weights": {"block_structure": [64, 128]}}
    config = {"quantization_config": {**ct, "config_groups": {"group_0": group}}}
    weights = {"p.weight_packed": quant.pack_int4(packed_q), "c.weight": ch_q, "b.weight": blk_q}
    scales = {
        "p.weight_scale": packed_s,
        "p.weight_shape": torch.tensor([130, 96]),
        "c.weight_scale": ch_s,
        "b.weight_scale": blk_s,
    }
    out.append((_two_shards(folder, weights, scales, config), config))
    blocks, scales4 = quant.mxfp4_quant(torch.randn(5, 48, 64, generator=gen))
    folder = tmp_path / "mxfp4"
    folder.mkdir()
    config = {"quantization_config": {"quant_method": "mxfp4"}}
    weights = {"m.experts.down_proj_blocks": blocks}
    out.append(
        (_two_shards(folder, weights, {"m.experts.down_proj_scales": scales4}, config), config)
    )
    return out


def test_row_blocks_decode_and_encode_like_the_whole_tensor(tmp_path) -> None:
    """Every codec, ragged and non-square blocks, scales in the other shard: rows decode to
    the whole tensor's rows, and re-encoding aligned row blocks gives the whole encoding's
    weight rows and scale rows, bit for bit."""
    from lora_cli.io.reader import open_source
    from lora_cli.sources.quantized import DequantizedSource, detect

    seen = set()
    for folder, config in _codec_checkpoints(tmp_path):
        with open_source(folder) as raw:
            scheme = detect(raw, config)
            assert scheme.tensors and not scheme.unsupported
            view = DequantizedSource(raw, scheme, set(scheme.tensors))
            for name, qt in scheme.tensors.items():
                seen.add((qt.scheme, qt.block))
                assert view.reads_rows(name)
                whole = view.read(name)
                for rows in [(0, 7), (5, 130), (63, 129), (1, qt.shape[0])]:
                    rows = (min(rows[0], qt.shape[0] - 1), min(rows[1], qt.shape[0]))
                    got = view.read(name, rows=rows)
                    assert torch.equal(got, whole[rows[0] : rows[1]]), (name, rows)
                unit = qt.row_unit(raw)
                assert unit is not None, name
                merged = (whole.float() * 1.01 + 0.001).to(torch.bfloat16)
                want = qt.encode(merged, raw)
                step = unit * 2 if unit > 1 else 3
                weights, scales = [], []
                for r0 in range(0, qt.shape[0], step):
                    part = qt.encode(merged[r0 : r0 + step], raw)
                    weights.append(part["weight"])
                    scales.append(part["scale"])
                    assert torch.equal(
                        qt.decode_parts(part, r0), qt.decode_parts(want)[r0 : r0 + step]
                    )
                assert torch.equal(
                    torch.cat(weights).view(torch.uint8), want["weight"].view(torch.uint8)
                )
                assert torch.equal(torch.cat(scales).float(), want["scale"].float()), name
    assert seen == {
        ("fp8-block", (128, 64)),
        ("fp8-block", (64, 128)),
        ("ct-pack-quantized", None),
        ("ct-float-quantized", None),
        ("ct-float-quantized", (64, 128)),
        ("mxfp4", None),
    }
