"""The quantization codecs against the producers' and loaders' own code."""

from __future__ import annotations

import pytest
import torch
from quant_helpers import ct_dequantizers

from lora_cli.io import quant


def _fp8_base(rows: int, cols: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    return quant.fp8_block_quant(torch.randn(rows, cols), (128, 128), torch.float32, pow2=False)


@pytest.mark.parametrize("shape", [(256, 384), (576, 256), (200, 72)])
def test_fp8_block_dequant_matches_transformers_and_compressed_tensors(shape) -> None:
    _, FP8BlockDequantizer = ct_dequantizers()
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    q, s = _fp8_base(*shape)
    ours = quant.fp8_block_dequant(q, s, (128, 128), torch.bfloat16)
    tf = _dequantize_fp8_weight(q, s, [128, 128], torch.float32).to(torch.bfloat16)
    ct = FP8BlockDequantizer()._create_dequantized_weight(q, s)
    assert torch.equal(ours, tf)
    assert torch.equal(ours, ct)


def test_fp8_requantize_of_an_untouched_tensor_reproduces_its_bytes() -> None:
    q, s = _fp8_base(576, 256)
    w = quant.fp8_block_dequant(q, s, (128, 128), torch.float32)
    q2, s2 = quant.fp8_block_quant(w, (128, 128), torch.float32, pow2=False)
    assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(s2, s)


def test_fp8_power_of_two_scales_and_saturation() -> None:
    w = torch.randn(130, 260) * 3
    w[0, 0] = 1e6  # would be inf/NaN in an unclamped e4m3 cast
    q, s = quant.fp8_block_quant(w, (128, 128), torch.float32, pow2=True)
    assert quant.is_power_of_two(s)
    assert not torch.isnan(q.float()).any()
    assert (s.float() >= w.abs().reshape(-1).max() / 448 / 2**20).all()
    _, e8 = quant.fp8_block_quant(w, (128, 128), torch.float8_e8m0fnu, pow2=False)
    assert e8.dtype == torch.float8_e8m0fnu
    assert torch.equal(e8.float(), s)  # e8m0 holds the rounded-up power of two exactly
    plain = quant.fp8_block_quant(w, (128, 128), torch.float32, pow2=False)[1]
    assert not quant.is_power_of_two(plain)


def test_int4_pack_matches_compressed_tensors() -> None:
    from compressed_tensors.compressors.pack_quantized.helpers import (
        pack_to_int32,
        unpack_from_int32,
    )

    torch.manual_seed(0)
    q = torch.randint(-8, 8, (6, 36), dtype=torch.int8)  # 36 columns: a partly filled word
    packed = quant.pack_int4(q)
    assert torch.equal(packed, pack_to_int32(q, 4))
    assert torch.equal(quant.unpack_int4(packed, 36), q)
    assert torch.equal(unpack_from_int32(packed, 4, torch.Size((6, 36))), q)
    # offset binary: nibble 8 is zero (a two's-complement decoder would read -8)
    assert torch.equal(quant.unpack_int4(torch.tensor([[0x88888888 - 2**32]]), 8), q[:1, :8] * 0)


def test_int4_quant_matches_compressed_tensors() -> None:
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32)
    torch.manual_seed(1)
    w = (torch.randn(64, 128) * 0.02).to(torch.bfloat16)
    w[3, :32] = 0  # a zero group: the scale becomes eps
    groups = w.reshape(64, 4, 32)
    scale, zp = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
    q, s = quant.ct_int_quant(w, 32, torch.bfloat16)
    assert torch.equal(s, scale)
    assert torch.equal(q, quantize(w, scale, zp, args, dtype=torch.int8))


@pytest.mark.parametrize("chunk", [1 << 18, 100])  # whole, and rows of 1 (96 values)
def test_mxfp4_dequant_matches_transformers(monkeypatch, chunk) -> None:
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    monkeypatch.setattr(quant, "MXFP4_CHUNK", chunk)
    torch.manual_seed(0)
    blocks = torch.randint(0, 256, (2, 6, 3, 16), dtype=torch.uint8)
    scales = torch.randint(110, 135, (2, 6, 3), dtype=torch.uint8)
    ours = quant.mxfp4_dequant(blocks, scales, torch.bfloat16)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)
    assert torch.equal(ours.transpose(1, 2), theirs)
    assert torch.equal(quant.mxfp4_dequant(blocks, scales, torch.bfloat16, transpose=True), theirs)


def test_mxfp4_chunks_encode_as_the_whole(monkeypatch) -> None:
    """Encoding a transposed expert view a few rows at a time gives the whole-tensor bytes."""
    torch.manual_seed(2)
    w = (torch.randn(3, 96, 40) * 0.1).to(torch.bfloat16).transpose(1, 2)  # (E, 40, 96) view
    whole = quant.mxfp4_quant(w.contiguous())
    monkeypatch.setattr(quant, "MXFP4_CHUNK", 200)  # 2 rows a chunk
    chunked = quant.mxfp4_quant(w)
    assert all(torch.equal(a, b) for a, b in zip(whole, chunked, strict=True))
    assert whole[0].shape == (3, 40, 3, 16) and whole[1].shape == (3, 40, 3)


def test_mxfp4_quant_rounding_rules() -> None:
    # block max 6 → scale 2^0; ties go to the even E2M1 code
    values = [6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.1, -5.9, 7.0] + [0.0] * 21
    blocks, scales = quant.mxfp4_quant(torch.tensor([values]))
    assert scales.tolist() == [[128]]  # amax 7 → 7/6 rounds up to 2
    blocks, scales = quant.mxfp4_quant(torch.tensor([values[:10] + [0.0] * 22]))
    assert scales.tolist() == [[127]]
    got = quant.mxfp4_dequant(blocks, scales, torch.float32)[0, :10].tolist()
    assert got == [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 0.0, -6.0]


def test_mxfp4_requantize_keeps_values() -> None:
    torch.manual_seed(0)
    blocks, scales = quant.mxfp4_quant(torch.randn(2, 6, 64))
    values = quant.mxfp4_dequant(blocks, scales, torch.float32)
    again = quant.mxfp4_dequant(*quant.mxfp4_quant(values), torch.float32)
    # values survive; bytes may not (a block whose max became 3·2^k re-encodes as 6·2^(k-1),
    # and -0 comes back as +0), which is why untouched tensors are copied, never re-encoded
    assert torch.equal(again, values)


@pytest.mark.parametrize("rows", [(0, 576), (100, 300), (500, 576), (128, 256), (7, 8)])
def test_quantized_view_decodes_row_blocks(tmp_path, rows) -> None:
    """Big quantized tensors merge in row blocks: rows decode exactly like the whole."""
    from safetensors.torch import save_file

    from lora_cli.io.reader import open_source
    from lora_cli.sources.quantized import DequantizedSource, detect

    q, s = _fp8_base(576, 200)
    torch.manual_seed(2)
    packed = quant.pack_int4(torch.randint(-8, 8, (576, 64), dtype=torch.int8))
    scale = (torch.rand(576, 2) / 10).to(torch.bfloat16)
    save_file(
        {
            "a.weight": q,
            "a.weight_scale_inv": s,
            "b.weight_packed": packed,
            "b.weight_scale": scale,
            "b.weight_shape": torch.tensor([576, 64]),
        },
        tmp_path / "model.safetensors",
    )
    config = {"quantization_config": {"quant_method": "compressed-tensors"}}
    with open_source(tmp_path / "model.safetensors") as raw:
        scheme = detect(raw, config)
        view = DequantizedSource(raw, scheme, {"a.weight", "b.weight"})
        for name in ("a.weight", "b.weight"):
            assert view.reads_rows(name)
            whole = view.read(name)
            assert torch.equal(view.read(name, rows=rows), whole[rows[0] : rows[1]])


@pytest.mark.parametrize("strategy", ["block", "channel", "tensor"])
def test_ct_float_quantized_matches_compressed_tensors(strategy) -> None:
    """FP8 ``float-quantized`` (tinker's FP8 export, RedHat FP8 models): scale and bytes as
    compressed-tensors' own quantize makes them, and its dequantize read back exactly."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    extra = {"block_structure": [128, 128]} if strategy == "block" else {}
    args = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy=strategy, **extra)
    torch.manual_seed(0)
    w = (torch.randn(576, 200) * 0.02).to(torch.bfloat16)
    if strategy == "block":
        padded = torch.zeros(640, 256, dtype=torch.bfloat16)
        padded[:576, :200] = w
        blocks = padded.reshape(5, 128, 2, 128)
        lo, hi = blocks.amin(dim=(1, 3)), blocks.amax(dim=(1, 3))
    elif strategy == "channel":
        lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    else:
        lo, hi = w.amin().reshape(1), w.amax().reshape(1)
    scale, zp = calculate_qparams(lo, hi, args)
    q = quantize(w, scale, zp, args, dtype=torch.float8_e4m3fn)
    block = (128, 128) if strategy == "block" else None
    ours_q, ours_s = quant.ct_float_quant(w, tuple(scale.shape), block, torch.bfloat16)
    assert torch.equal(ours_s, scale)
    assert torch.equal(ours_q.view(torch.uint8), q.view(torch.uint8))
    decoded = quant.ct_dequant(q, scale, None, block=block, g_idx=None, out_dtype=torch.bfloat16)
    assert torch.equal(decoded, dequantize(q, scale, zp, args).to(torch.bfloat16))


def test_fp8_to_float_is_torchs_cast_for_every_code() -> None:
    """The E4M3 bit move (8× faster on the CPU) gives every code's fp32 bits, NaN as NaN,
    on strided views too."""
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    ref, ours = codes.float(), quant.fp8_to_float(codes)
    assert torch.equal(ref.isnan(), ours.isnan()) and int(ours.isnan().sum()) == 2
    finite = ~ref.isnan()
    assert torch.equal(ref[finite].view(torch.int32), ours[finite].view(torch.int32))
    grid = codes.view(16, 16)
    assert torch.equal(
        quant.fp8_to_float(grid[:, ::3]).nan_to_num(), grid[:, ::3].float().nan_to_num()
    )
    assert quant.fp8_to_float(codes[:0]).numel() == 0


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_int4_quant_rounds_the_quotient_in_the_scale_dtype(scale_dtype) -> None:
    """``w / s`` is rounded to the scale dtype before round-half-even, as compressed-tensors
    computes it in that dtype: over 2^18 values some quotients round across a .5."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32)
    gen = torch.Generator().manual_seed(5)
    w = (torch.randn(256, 1024, generator=gen) * torch.rand(256, 1, generator=gen)).to(scale_dtype)
    groups = w.reshape(256, 32, 32)
    scale, zp = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
    q, s = quant.ct_int_quant(w, 32, scale_dtype)
    assert torch.equal(s, scale)
    assert torch.equal(q, quantize(w, scale, zp, args, dtype=torch.int8))


def _codec_outputs(device: str) -> list[torch.Tensor]:
    """Every codec's output for one weight (ragged FP8 blocks, INT4 groups, MXFP4), on
    ``device``, copied back to the CPU."""
    gen = torch.Generator().manual_seed(3)
    w = (torch.randn(576, 320, generator=gen) * 0.05).to(torch.bfloat16).to(device)
    q, s = quant.fp8_block_quant(w, (128, 128), torch.float32, pow2=False)
    qi, si = quant.ct_int_quant(w, 32, torch.bfloat16)
    packed = quant.pack_int4(qi)
    blocks, scales = quant.mxfp4_quant(w.reshape(2, 288, 320))
    out = [q, s, quant.fp8_block_dequant(q, s, (128, 128), torch.bfloat16), qi, si, packed]
    out += [quant.unpack_int4(packed, 320), blocks, scales]
    out.append(quant.mxfp4_dequant(blocks, scales, torch.bfloat16))
    return [t.cpu() for t in out]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_codecs_on_cuda_equal_the_cpu_bit_for_bit() -> None:
    """`--device cuda` decodes and re-encodes on the GPU: elementwise codecs, so the bytes
    must be the CPU's (the LoRA product itself is cuBLAS's, not compared here)."""
    for cpu, gpu in zip(_codec_outputs("cpu"), _codec_outputs("cuda"), strict=True):
        assert cpu.dtype == gpu.dtype and cpu.shape == gpu.shape
        assert cpu.view(torch.uint8).equal(gpu.view(torch.uint8))


def test_work_buffers_are_reused_but_big_ones_are_not_kept() -> None:
    """Row blocks reuse one buffer per name and thread; a whole big tensor's buffer is
    fresh, so a run does not hold its size to the end."""
    from lora_cli import scratch as scratch_module

    small = scratch_module.scratch("test.buffer", (64, 64), torch.float32)
    again = scratch_module.scratch("test.buffer", (32, 64), torch.float32)
    assert again.data_ptr() == small.data_ptr()
    big = (scratch_module.KEEP_ELEMENTS + 1,)
    first = scratch_module.scratch("test.big", big, torch.uint8)
    table = scratch_module._buffers.table
    assert ("test.big", torch.uint8) not in table and first.shape == big
    assert ("test.buffer", torch.float32) in table
