"""Codecs for quantized base weights: FP8 block-scaled, compressed-tensors INT4/FP8, MXFP4.

Used by the reader (``io/quantized.py`` presents a quantized weight as the bf16 tensor
its producer's own dequantizer gives) and by the writer side of ``--quantize keep``
(fresh scales by the producer's rules); never by the merge math. The formulas and their
sources are in docs/quantized-bases.md §2:

* FP8 block: ``W = fp32(q) · fp32(s[i//b0, j//b1])`` rounded once to bf16; a ragged last
  block uses its scale for the partial rows/columns. Re-quantized with ``s = amax/448``
  (power of two, rounded up, when the base's scales are), ``q = clamp(W/s, ±448)`` cast
  with round-to-nearest-even. Always clamp: older casts gave NaN above 448.
* compressed-tensors: ``(q − zp) · s`` computed in the scale's dtype; INT4 symmetric
  scales are ``absmax/7.5`` in the weight's dtype, ``q = round(clamp(W/s, −8, 7))`` (half
  to even), packed offset-binary (q + 8), eight per int32, low nibble first.
* MXFP4: ``lut[nibble] · 2^(e−127)``, low nibble = even element; re-quantized with the
  block scale ``amax/6`` rounded up to a power of two and E2M1 round-half-even.
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# E2M1 rounding boundaries between code k and k+1; a tie goes to the even code.
_FP4_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def expand_blocks(s: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """A ``(ceil(r/b0), ceil(c/b1))`` scale grid broadcast to ``shape`` (ragged edges sliced)."""
    rows, cols = shape
    grid = s.float().repeat_interleave(block[0], 0)[:rows]
    return grid.repeat_interleave(block[1], 1)[:, :cols]


# --------------------------------------------------------------------------- FP8 block


def fp8_block_dequant(
    q: torch.Tensor,
    s: torch.Tensor,
    block: tuple[int, int],
    out_dtype: torch.dtype,
    first_row: int = 0,
) -> torch.Tensor:
    """DeepSeek/Qwen3/FineGrainedFP8 ``weight × weight_scale_inv``, rounded once.

    ``q`` may be rows ``[first_row, first_row + len(q))`` of the weight, with ``s`` the
    scale rows those rows fall in (so big tensors decode in row blocks)."""
    rows, cols = q.shape
    top = first_row // block[0]
    want = (_cdiv(first_row + rows, block[0]) - top, _cdiv(cols, block[1]))
    if tuple(s.shape) != want:
        raise ValueError(f"scale grid {list(s.shape)} does not fit weight {[rows, cols]} ({block})")
    out = torch.empty(q.shape, dtype=out_dtype)
    scales = s.float()
    row_block = torch.arange(first_row, first_row + rows) // block[0] - top
    full = cols // block[1] * block[1]  # columns in whole blocks; the rest is the ragged edge
    step = max(1, (1 << 22) // max(cols, 1))  # ~16 MB of fp32 temporaries per chunk
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        x, srow = q[r0:r1].float(), scales[row_block[r0:r1]]
        if full:
            blocks = x[:, :full].reshape(r1 - r0, full // block[1], block[1])
            blocks.mul_(srow[:, : full // block[1], None])
            out[r0:r1, :full] = blocks.reshape(r1 - r0, full)
        if full < cols:
            out[r0:r1, full:] = x[:, full:] * srow[:, -1:]
    return out


def is_power_of_two(s: torch.Tensor) -> bool:
    """Whether every non-zero scale is an exact power of two (DeepSeek V3.1, ue8m0)."""
    f = s.float()
    mantissa, _ = torch.frexp(f[f != 0])
    return bool((mantissa.abs() == 0.5).all())


def pow2_ceil(x: torch.Tensor) -> torch.Tensor:
    """The smallest power of two ≥ x (x > 0), in fp32: exponent bits rounded up."""
    bits = x.float().contiguous().view(torch.int32)
    return ((bits + 0x007FFFFF) & 0x7F800000).view(torch.float32)


def fp8_block_quant(
    w: torch.Tensor,
    block: tuple[int, int],
    scale_dtype: torch.dtype,
    *,
    pow2: bool,
    weight_dtype: torch.dtype = torch.float8_e4m3fn,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh ``(q, scale_inv)`` for a 2-D weight: ``s = amax/448`` per block (zero padding
    leaves amax unchanged); a zero block gets scale 1; quantized with the scale as stored."""
    rows, cols = w.shape
    grid = (_cdiv(rows, block[0]), _cdiv(cols, block[1]))
    w32 = w.float()
    padded = torch.zeros(grid[0] * block[0], grid[1] * block[1])
    padded[:rows, :cols] = w32.abs()
    amax = padded.reshape(grid[0], block[0], grid[1], block[1]).amax(dim=(1, 3))
    s = amax / FP8_MAX
    s = torch.where(amax == 0, torch.ones_like(s), s)
    if pow2 or scale_dtype == torch.float8_e8m0fnu:
        s = pow2_ceil(s)
    stored = s.to(scale_dtype)
    q = (w32 / expand_blocks(stored, (rows, cols), block)).clamp(-FP8_MAX, FP8_MAX)
    return q.to(weight_dtype), stored


# --------------------------------------------------------------------------- compressed-tensors


def unpack_int4(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """int32 words → signed values in [−8, 7] (offset binary, column 8j+i at bits 4i..4i+3)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    nibbles = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & 0xF
    return nibbles.reshape(packed.shape[0], -1)[:, :cols].to(torch.int8) - 8


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Signed values in [−8, 7] of shape (rows, cols) → int32 ``(rows, ceil(cols/8))``."""
    rows, cols = q.shape
    words = _cdiv(cols, 8)
    nib = torch.zeros(rows, words * 8, dtype=torch.int64)
    nib[:, :cols] = q.to(torch.int64) + 8
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    packed = (nib.reshape(rows, words, 8) << shifts).sum(-1)
    return packed.to(torch.int64).where(packed < 2**31, packed - 2**32).to(torch.int32)


def expand_groups(s: torch.Tensor, cols: int, g_idx: torch.Tensor | None) -> torch.Tensor:
    """Per-(row, group) scales → per element; ``g_idx`` maps columns to groups (actorder)."""
    if s.dim() < 2 or s.shape[-1] == 1:  # tensor (1,) or channel (out, 1): broadcasts
        return s.reshape(-1, 1)
    if g_idx is not None:
        return s[:, g_idx.long()]
    group = _cdiv(cols, s.shape[1])
    return s.repeat_interleave(group, 1)[:, :cols]


def ct_dequant(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    *,
    block: tuple[int, int] | None,
    g_idx: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """compressed-tensors ``_dequantize``: ``(q − zp) · s`` in the scale's dtype, then cast."""
    rows, cols = q.shape
    if block is not None:
        s32 = expand_blocks(scale, (rows, cols), block)
        zp = expand_blocks(zero_point, (rows, cols), block) if zero_point is not None else None
    else:
        s32 = expand_groups(scale, cols, g_idx).float()
        zp = expand_groups(zero_point, cols, g_idx).float() if zero_point is not None else None
    x = q.float() if zp is None else q.float() - zp
    return (x * s32).to(scale.dtype).to(out_dtype)


def ct_int_quant(
    w: torch.Tensor, group: int, scale_dtype: torch.dtype, bits: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric group quantization as compressed-tensors does it: ``s = absmax/((qmax−qmin)/2)``
    in the scale dtype (a zero scale becomes its eps), ``q = round(clamp(w/s))``."""
    qmax, qmin = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))
    rows, cols = w.shape
    x = w.to(scale_dtype)
    groups = x.reshape(rows, cols // group, group)
    lo = groups.amin(-1).clamp(max=0)
    hi = groups.amax(-1).clamp(min=0)
    s = torch.maximum(lo.abs(), hi) / ((qmax - qmin) / 2)
    s = torch.where(s == 0, torch.full_like(s, torch.finfo(scale_dtype).eps), s)
    scaled = groups / s.unsqueeze(-1)
    q = torch.round(scaled.clamp(qmin, qmax)).to(torch.int8).reshape(rows, cols)
    return q, s


def ct_float_quant(
    w: torch.Tensor,
    scale_shape: tuple[int, ...],
    block: tuple[int, int] | None,
    scale_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 ``float-quantized`` (tensor, channel or block strategy): ``s = absmax/448``."""
    rows, cols = w.shape
    x = w.to(scale_dtype)
    if block is not None:
        grid = (_cdiv(rows, block[0]), _cdiv(cols, block[1]))
        padded = torch.zeros(grid[0] * block[0], grid[1] * block[1], dtype=scale_dtype)
        padded[:rows, :cols] = x.abs()
        amax = padded.reshape(grid[0], block[0], grid[1], block[1]).amax(dim=(1, 3))
    elif len(scale_shape) == 2 and scale_shape[0] == rows and scale_shape[1] == 1:
        amax = x.abs().amax(1, keepdim=True)
    else:
        amax = x.abs().amax().reshape(scale_shape)
    s = amax / FP8_MAX
    s = torch.where(s == 0, torch.full_like(s, torch.finfo(scale_dtype).eps), s)
    full = expand_blocks(s, (rows, cols), block) if block else expand_groups(s, cols, None)
    q = (x / full.to(scale_dtype)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, s


# --------------------------------------------------------------------------- MXFP4


def mxfp4_dequant(
    blocks: torch.Tensor, scales: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """``(…, G, 16)`` bytes + ``(…, G)`` E8M0 exponents → ``(…, G·32)`` values (exact)."""
    lut = torch.tensor(FP4_VALUES + tuple(-v for v in FP4_VALUES), dtype=torch.float32)
    lo, hi = blocks & 0x0F, blocks >> 4
    codes = torch.stack((lo, hi), dim=-1).reshape(*blocks.shape[:-1], 32).long()
    exp = scales.to(torch.int32) - 127
    vals = torch.ldexp(lut[codes], exp.unsqueeze(-1).float())
    return vals.reshape(*blocks.shape[:-2], -1).to(out_dtype)


def mxfp4_quant(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(…, n)`` values, n a multiple of 32 → ``(…, n/32, 16)`` blocks + ``(…, n/32)`` scales,
    as the triton_kernels downcast (ROUND_UP scale, E2M1 round-half-even, saturate at 6)."""
    x = w.float().reshape(*w.shape[:-1], -1, 32)
    amax = x.abs().amax(-1)
    ds = pow2_ceil(amax / 6.0)
    exponent = (ds.view(torch.int32) >> 23).to(torch.uint8)
    inv = torch.where(ds == 0, torch.zeros_like(ds), 1.0 / ds)
    scaled = x * inv.unsqueeze(-1)
    mag = scaled.abs()
    code = torch.zeros_like(mag, dtype=torch.uint8)
    for k, bound in enumerate(_FP4_BOUNDS):
        code += (mag > bound if k % 2 == 0 else mag >= bound).to(torch.uint8)
    code = code | ((scaled < 0) & (code > 0)).to(torch.uint8) << 3
    pairs = code.reshape(*code.shape[:-1], 16, 2)
    packed = pairs[..., 0] | (pairs[..., 1] << 4)
    return packed, exponent
