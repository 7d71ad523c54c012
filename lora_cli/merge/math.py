"""The merge arithmetic: the one place that turns LoRA factors into merged tensors.

Everything here works on torch tensors that are already on the compute device
(CPU or CUDA; nothing is moved elsewhere) and returns results in the base
tensor's dtype on the base tensor's device. It reproduces PEFT 0.21.2
``merge_and_unload()`` including its rounding order per layer type (see
docs/peft-lora-semantics.md §3):

* the delta is ``(B32 @ A32) * float(s)``, matmul first, then scale; adapter
  factors are upcast to fp32 from whatever dtype they were stored in, which is
  what PEFT's default ``autocast_adapter_dtype=True`` does on load;
* Linear / GPT-2 ``Conv1D`` / ConvNd: ``round(W32 + Δ)`` (one rounding);
* Embedding, ``target_parameters``, MiCA, BD-LoRA and an ``nn.MultiheadAttention``'s
  ``in_proj_weight``: ``W + round(Δ)`` (two roundings);
* an ``nn.MultiheadAttention``'s ``out_proj``: PEFT 0.21.2 adds its delta twice,
  ``round((W + round(Δ)) + Δ)``, in its merge and in its unmerged forward alike;
* ConvNd deltas are computed like PEFT, ``convNd(A.transpose(0, 1), B)`` (a 1×1 Conv2d
  kernel as a matmul): the same sum in another order, which shows in fp32 bases;
* DoRA: ``round(m / ‖W32 + Δ‖ ⊙ (W32 + Δ))`` (one rounding);
* ``lora_bias``: ``round(b32 + s·b_B)``;
* trainable tokens: the rows are replaced, not added to.

Several adapters (``lora merge BASE A1 A2 …``) are combined as PEFT's
``add_weighted_adapter(combination_type="cat")``: their factors are stacked into one
adapter of scale 1 (``merge_weighted``), so the merged weight is rounded once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from lora_cli.errors import MergeError
from lora_cli.numerics import all_finite  # noqa: F401  (merge/run.py checks each value with it)
from lora_cli.scratch import scratch

Kind = Literal["linear", "embedding", "conv"]
ExpertLayout = Literal["out_in", "in_out"]
# How the delta is added (PEFT's order per layer and variant): "once" = round(W32 + Δ),
# "delta" = W + round(Δ), "mha_out" = round((W + round(Δ)) + Δ) (PEFT 0.21.2's
# nn.MultiheadAttention out_proj, which gets its delta twice).
Rounding = Literal["once", "delta", "mha_out"]

KINDS: tuple[str, ...] = ("linear", "embedding", "conv")
ROUNDINGS: tuple[str, ...] = ("once", "delta", "mha_out")
EXPERT_LAYOUTS: tuple[str, ...] = ("out_in", "in_out")

# Dtypes a merged floating point tensor may have; PEFT casts the delta to these
# (ALLOWED_COMPUTE_DTYPES) and the in-place add rounds into them.
_MERGE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------- shapes


def _shape(x: torch.Tensor | Sequence[int]) -> tuple[int, ...]:
    return tuple(int(d) for d in (x.shape if isinstance(x, torch.Tensor) else x))


def check_shapes(
    kind: Kind,
    base_shape: Sequence[int],
    a_shape: Sequence[int],
    b_shape: Sequence[int],
    *,
    fan_in_fan_out: bool = False,
) -> int:
    """Check that A and B fit a base weight of ``base_shape``; return the rank.

    Works on shapes only, so a planner can call it with header information.
    ``kind`` is ``"linear"`` (A ``(r,in)``, B ``(out,r)``, W ``(out,in)`` or
    ``(in,out)`` with ``fan_in_fan_out``), ``"embedding"`` (A ``(r,num)``,
    B ``(dim,r)``, W ``(num,dim)``) or ``"conv"`` (A ``(r,in,*k)``,
    B ``(out,r,1,...)``, W ``(out,in,*k)``). Raises ``MergeError`` otherwise,
    including for grouped convolutions, which PEFT cannot merge.
    """
    w, a, b = _shape(base_shape), _shape(a_shape), _shape(b_shape)
    where = f"base {list(w)}, A {list(a)}, B {list(b)}"
    if kind not in KINDS:
        raise MergeError(f"unknown layer kind {kind!r}", hint=f"expected one of {KINDS}")
    if fan_in_fan_out and kind != "linear":
        raise MergeError(f"fan_in_fan_out only applies to linear layers, not {kind}")
    if kind in ("linear", "embedding"):
        if len(w) != 2 or len(a) != 2 or len(b) != 2:
            raise MergeError(f"{kind} LoRA needs 2-D base, A and B ({where})")
        r = a[0]
        if b[1] != r:
            raise MergeError(
                f"LoRA rank mismatch: A has {a[0]} rows, B has {b[1]} columns ({where})"
            )
        if kind == "linear":
            expected = (a[1], b[0]) if fan_in_fan_out else (b[0], a[1])
        else:
            expected = (a[1], b[0])
        if w != expected:
            hint = None
            if kind == "linear" and w == expected[::-1]:
                hint = "the base looks transposed: check fan_in_fan_out (GPT-2 style Conv1D)"
            raise MergeError(f"LoRA factors do not fit the {kind} base weight ({where})", hint=hint)
    else:
        if len(w) < 3 or len(a) != len(w) or len(b) != len(w):
            raise MergeError(f"conv LoRA needs A and B with the base's rank ({where})")
        r = a[0]
        if b[1] != r or any(d != 1 for d in b[2:]):
            raise MergeError(f"conv LoRA B must be (out, r, 1, ...) ({where})")
        if b[0] != w[0] or a[2:] != w[2:]:
            raise MergeError(f"LoRA factors do not fit the conv base weight ({where})")
        if a[1] != w[1]:
            raise MergeError(
                f"conv base has {w[1]} input channels per group but A has {a[1]} ({where})",
                hint="grouped convolutions (groups > 1) cannot be merged",
            )
    if r <= 0:
        raise MergeError(f"LoRA rank must be positive ({where})")
    return r


# --------------------------------------------------------------------------- helpers


def _f32(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` as fp32 on ``device`` (no copy when it already is)."""
    return t.to(device=device, dtype=torch.float32)


def _check_float(w: torch.Tensor) -> None:
    if w.dtype not in _MERGE_DTYPES:
        raise MergeError(
            f"cannot merge into a {w.dtype} tensor",
            hint="only fp16, bf16, fp32 and fp64 base weights can be merged (dequantize first)",
        )


def _work_copy(w: torch.Tensor) -> torch.Tensor:
    """A fresh fp32 (fp64 for fp64 bases) copy of ``w`` that may be modified in place.

    ``W32 + Δ`` computed on it and rounded once equals PEFT's in-place
    ``W.data += Δ`` (torch adds a bf16 and an fp32 tensor in fp32).
    """
    _check_float(w)
    dtype = torch.promote_types(w.dtype, torch.float32)
    # contiguous like PEFT's parameters: the DoRA norm's reduction order depends on the layout
    return w.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)


# --------------------------------------------------------------------------- delta


def lora_delta(
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float,
    *,
    kind: Kind,
    base_shape: Sequence[int],
    fan_in_fan_out: bool = False,
) -> torch.Tensor:
    """The fp32 delta ``(B32 @ A32) * s`` in the base tensor's layout, on A's device.

    Linear: ``(out,in)``, transposed to ``(in,out)`` with ``fan_in_fan_out``;
    embedding: ``(B @ A)ᵀ``; conv: see ``_conv_delta``. The result may be a
    transposed (non-contiguous) view.
    """
    check_shapes(kind, base_shape, A.shape, B.shape, fan_in_fan_out=fan_in_fan_out)
    device = A.device
    a32, b32 = _f32(A, device), _f32(B, device)
    delta = _conv_delta(a32, b32, _shape(base_shape)) if kind == "conv" else b32 @ a32
    delta.mul_(scale)  # scale after the matmul, in fp32: same bits as PEFT's `* scaling`
    if kind == "embedding" or fan_in_fan_out:
        delta = delta.T
    return delta


def _conv_delta(a32: torch.Tensor, b32: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``Δ[o,i,…] = Σ_k B[o,k] A[k,i,…]`` summed the way PEFT's ``_ConvNd`` does.

    A 1×1 Conv2d kernel is a squeezed matmul; every other kernel is
    ``convNd(A.transpose(0, 1), B).transpose(0, 1)``. Both are the same sum, but a
    convolution kernel orders it differently from a matmul, and an fp32 base shows the
    difference. PEFT 0.21.2's 1×1 test also fires on (1,1,k) Conv3d kernels and then
    crashes (issue #3768); the convolution gives the right delta for those.
    """
    import torch.nn.functional as F

    if len(shape) == 4 and shape[2:4] == (1, 1):
        r = a32.shape[0]
        return (b32.reshape(b32.shape[0], r) @ a32.reshape(r, -1)).reshape(shape)
    conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}.get(len(shape))
    if conv is None:
        raise MergeError(f"no convolution for a {len(shape)}-D kernel {list(shape)}")
    return conv(a32.transpose(0, 1), b32).transpose(0, 1)


def block_diagonal(w: torch.Tensor, nblocks: int) -> torch.Tensor:
    """BD-LoRA's compact factor as the full matrix: ``block_diag(*chunk(w, nblocks))``."""
    if w.dim() != 2 or nblocks <= 0 or w.shape[0] % nblocks:
        raise MergeError(f"BD-LoRA factor {list(w.shape)} does not split into {nblocks} row blocks")
    return torch.block_diag(*torch.chunk(w, nblocks, dim=0))


# --------------------------------------------------------------------------- merge


def merge_weight(
    W: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float,
    *,
    kind: Kind,
    fan_in_fan_out: bool = False,
    magnitude: torch.Tensor | None = None,
    rounding: Rounding = "once",
    inplace: bool = False,
) -> torch.Tensor:
    """Merge one LoRA (or DoRA, when ``magnitude`` is given) into ``W``; returns a new tensor.

    ``inplace=True`` lets the CPU linear path write the result over ``W`` (the
    runner owns that buffer); other paths still return a new tensor.

    Rounding as PEFT 0.21.2: linear and conv ``round(W32 + Δ)``; embedding
    ``W + round(Δ)``; ``rounding`` picks a variant's order instead (``"delta"``:
    ``W + round(Δ)`` for MiCA, BD-LoRA, an MHA ``in_proj_weight``; ``"mha_out"``:
    ``round((W + round(Δ)) + Δ)``); DoRA ``round(f ⊙ (W32 + Δ))`` with
    ``f = m / ‖W32 + Δ‖`` (norm per output row for linear, per column of the stored
    ``(in,out)`` tensor with ``fan_in_fan_out``, per embedding column for embedding,
    per output channel for conv).
    """
    _check_float(W)
    if rounding not in ROUNDINGS:
        raise MergeError(f"unknown rounding {rounding!r}", hint=f"expected one of {ROUNDINGS}")
    if (
        magnitude is None
        and rounding == "once"
        and kind == "linear"
        and not fan_in_fan_out
        and W.device.type == "cpu"
    ):
        check_shapes(kind, W.shape, A.shape, B.shape)
        return _merge_linear_blocked(W, A, B, scale, inplace=inplace)
    delta = lora_delta(A, B, scale, kind=kind, base_shape=W.shape, fan_in_fan_out=fan_in_fan_out)
    delta = delta.to(W.device)

    if magnitude is None:
        if kind == "embedding" or rounding != "once":
            # PEFT casts these deltas to the base dtype before adding them.
            first = W + delta.to(W.dtype)
            if rounding != "mha_out":
                return first
            merged = _work_copy(first)  # then lora.Linear.merge adds Δ once more
            merged += delta
            return merged.to(W.dtype)
        merged = _work_copy(W)
        merged += delta
        del delta
        return merged.to(W.dtype)

    out_dim = W.shape[1] if kind == "embedding" or fan_in_fan_out else W.shape[0]
    if magnitude.numel() != out_dim:
        raise MergeError(
            f"DoRA magnitude has {magnitude.numel()} elements, expected {out_dim} "
            f"for a {kind} base of shape {list(W.shape)}"
        )

    merged = _work_copy(W)
    merged += delta
    del delta
    # the norm of the unmerged weight plus delta: with one adapter that is ``merged``
    norm = _dora_norm(merged, kind=kind, fan_in_fan_out=fan_in_fan_out)
    factor = _f32(magnitude, W.device).reshape(-1) / norm
    if kind == "conv":
        factor = factor.view((-1,) + (1,) * (W.dim() - 1))
    elif kind == "embedding" or fan_in_fan_out:
        factor = factor.view(1, -1)
    else:
        factor = factor.view(-1, 1)
    merged.mul_(factor)
    return merged.to(W.dtype)


def weighted_factors(
    factors: Sequence[tuple[torch.Tensor, torch.Tensor, float, float]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``cat`` combination: ``(A_cat, B_cat)`` with ``B_cat @ A_cat = Σ w·s·B@A``.

    ``factors`` holds ``(A, B, weight, scale)`` per adapter, in adapter order. Rows of
    ``A_cat`` are ``(A32 · w) · s`` (PEFT scales A, in that order) and columns of
    ``B_cat`` are ``B32``: one matmul then sums every adapter's delta in fp32. Kept in
    fp32 like any loaded adapter (PEFT's own ``cat`` adapter takes the base dtype, which
    on a bf16 base rounds the factors and the delta once more).
    """
    device = factors[0][0].device
    a = torch.cat([_f32(A, device) * w * s for A, _, w, s in factors], dim=0)
    b = torch.cat([_f32(B, device) for _, B, _, _ in factors], dim=1)
    return a, b


def merge_weighted(
    W: torch.Tensor,
    factors: Sequence[tuple[torch.Tensor, torch.Tensor, float, float]],
    *,
    kind: Kind,
    fan_in_fan_out: bool = False,
    inplace: bool = False,
) -> torch.Tensor:
    """Merge several weighted LoRAs into ``W`` at once: the stacked factors of
    ``weighted_factors`` merged with scale 1, so with PEFT's rounding for ``kind``
    (linear/conv ``round(W32 + Σ w·s·B@A)``, embedding ``W + round(Σ …)``)."""
    a, b = weighted_factors(factors)
    return merge_weight(W, a, b, 1.0, kind=kind, fan_in_fan_out=fan_in_fan_out, inplace=inplace)


_BLOCK_ELEMENTS = 1 << 17  # 512 KiB of fp32 per temporary: stays in a core's L2
# Fewest rows a block of a delta's matmul may have. The CPU GEMM computes a product of one
# to three rows by another kernel (a matrix-vector path) whose fp32 sums differ by an ulp
# from the rows of a full-height product, which is what PEFT computes. Measured with
# torch 2.13 on an AMD EPYC at one thread: blocks of 1-3 rows differ from `B @ A`, blocks
# of 4 and more do not; 16 keeps a margin for wider micro-kernels. A short tail is merged
# into the block before it instead (``row_spans``).
MIN_GEMM_ROWS = 16


def row_spans(total: int, step: int, minimum: int = MIN_GEMM_ROWS) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges of ``step`` rows covering ``total``, the last one taking a
    tail shorter than ``minimum`` (or than ``step``, if smaller), so that no block's matmul
    falls to the few-row kernel."""
    step = max(1, step)
    spans = [(r, min(r + step, total)) for r in range(0, total, step)]
    if len(spans) > 1 and spans[-1][1] - spans[-1][0] < min(minimum, step):
        spans[-2:] = [(spans[-2][0], total)]
    return spans


def _merge_linear_blocked(
    W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, *, inplace: bool = False
) -> torch.Tensor:
    """``round(W32 + (B32 @ A32) * s)`` a block of rows at a time, on the CPU.

    Same operations per element as the whole-tensor path (matmul, then scale,
    then add, then one rounding), but the fp32 temporaries are a cache-sized
    block instead of two full-size copies: memory traffic drops to reading W and
    writing the result once, which is what makes a CPU merge run near disk speed.
    """
    a32, b32 = _f32(A, W.device), _f32(B, W.device)
    out = W if inplace else torch.empty_like(W, memory_format=torch.contiguous_format)
    rows = max(MIN_GEMM_ROWS, _BLOCK_ELEMENTS // max(1, W.shape[1]))
    spans = row_spans(W.shape[0], rows)
    most = max(stop - start for start, stop in spans)
    work_dtype = torch.promote_types(W.dtype, torch.float32)
    delta = scratch("merge.delta", (most, W.shape[1]), torch.float32)
    work = scratch("merge.work", (most, W.shape[1]), work_dtype)
    for start, stop in spans:
        d, w = delta[: stop - start], work[: stop - start]
        torch.matmul(b32[start:stop], a32, out=d)
        d.mul_(scale)
        w.copy_(W[start:stop])
        w.add_(d)
        out[start:stop].copy_(w)
    return out


def _dora_norm(s: torch.Tensor, *, kind: Kind, fan_in_fan_out: bool) -> torch.Tensor:
    """L2 norm of ``s = W + Δ`` per output unit (1-D), computed the way PEFT does."""
    if kind == "conv":
        return s.norm(p=2, dim=tuple(range(1, s.dim()))).reshape(-1)
    if kind == "embedding" or fan_in_fan_out:
        # PEFT takes the norm over dim 1 of the transposed sum ``Wᵀ + Δᵀ``, which
        # keeps Wᵀ's strides: the reduction runs over the stored tensor's dim 0,
        # and the reduction order (hence the bits) depends on that.
        return torch.linalg.norm(s, dim=0)
    return torch.linalg.norm(s, dim=1)


def merge_bias(b: torch.Tensor, lora_b_bias: torch.Tensor, scale: float) -> torch.Tensor:
    """``lora_bias``: ``round(b32 + s · b_B32)`` (one rounding); returns a new tensor."""
    _check_float(b)
    if b.shape != lora_b_bias.shape or b.dim() != 1:
        raise MergeError(
            f"lora_B bias shape {list(lora_b_bias.shape)} does not fit the base bias "
            f"{list(b.shape)}"
        )
    merged = _work_copy(b)
    merged += _f32(lora_b_bias, b.device) * scale
    return merged.to(b.dtype)


def replace_rows(W: torch.Tensor, indices: Sequence[int], rows: torch.Tensor) -> torch.Tensor:
    """Trainable tokens: ``W'[indices[i]] = rows[i]`` cast to W's dtype; returns a new tensor."""
    idx = [int(i) for i in indices]
    if W.dim() != 2 or rows.dim() != 2:
        raise MergeError("trainable tokens need a 2-D weight and a 2-D delta")
    if rows.shape != (len(idx), W.shape[1]):
        raise MergeError(
            f"trainable token delta {list(rows.shape)} does not fit {len(idx)} indices "
            f"into a weight of shape {list(W.shape)}"
        )
    if len(set(idx)) != len(idx):
        raise MergeError("trainable token indices contain duplicates")
    bad = [i for i in idx if not 0 <= i < W.shape[0]]
    if bad:
        raise MergeError(f"trainable token indices {bad} out of range for {W.shape[0]} rows")
    index = torch.tensor(idx, dtype=torch.long, device=W.device)
    return W.index_copy(0, index, rows.to(device=W.device, dtype=W.dtype))


# --------------------------------------------------------------------------- target_parameters


def expert_layout(
    param_shape: Sequence[int],
    a_shape: Sequence[int],
    b_shape: Sequence[int],
    *,
    layout: ExpertLayout | None = None,
) -> tuple[int, int, str]:
    """For a ``target_parameters`` tensor: ``(num_experts, rank per expert, layout)``.

    ``layout`` is ``"out_in"`` for ``(E,out,in)`` (Mixtral, Qwen-MoE on
    transformers v5) or ``"in_out"`` for ``(E,in,out)`` (GPT-OSS). It is read
    from the shapes; when ``in == out`` the shapes cannot tell, and the caller
    must pass it. A 2-D parameter is ``(out,in)`` with one expert.
    """
    p, a, b = _shape(param_shape), _shape(a_shape), _shape(b_shape)
    where = f"parameter {list(p)}, A {list(a)}, B {list(b)}"
    if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
        raise MergeError(f"target_parameters LoRA needs A (r·E, in) and B (out, r·E) ({where})")
    if layout is not None and layout not in EXPERT_LAYOUTS:
        raise MergeError(
            f"unknown expert layout {layout!r}", hint=f"expected one of {EXPERT_LAYOUTS}"
        )
    n_in, n_out = a[1], b[0]
    want = {"out_in": (n_out, n_in), "in_out": (n_in, n_out)}
    if len(p) == 2:
        experts = 1
        fits = ["out_in"] if p == want["out_in"] else []
    elif len(p) == 3:
        experts = p[0]
        fits = [name for name, dims in want.items() if p[1:] == dims]
    else:
        raise MergeError(f"target_parameters supports 2-D and 3-D parameters ({where})")
    if not fits:
        raise MergeError(f"LoRA factors do not fit the parameter ({where})")
    if layout is None:
        if len(fits) > 1:
            raise MergeError(
                f"cannot tell whether the expert tensor is (E,out,in) or (E,in,out) ({where})",
                hint="in == out: pass the layout from the architecture",
            )
        layout = fits[0]
    elif layout not in fits:
        raise MergeError(f"layout {layout!r} does not fit the shapes ({where})")
    if experts <= 0 or a[0] % experts:
        raise MergeError(f"A has {a[0]} rows, not a multiple of {experts} experts ({where})")
    return experts, a[0] // experts, layout


def expert_delta(
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float,
    *,
    param_shape: Sequence[int],
    layout: ExpertLayout | None = None,
    expert_rows: tuple[int, int] | None = None,
) -> torch.Tensor:
    """The fp32 ``target_parameters`` delta in the parameter's layout, on A's device.

    ``A_e = A.reshape(E, r, in)[e]`` (expert-major) and
    ``B_e = B.reshape(out, r, E)[:, :, e]`` (expert-minor);
    ``Δ[e] = s · B_e @ A_e``, transposed per expert for ``(E,in,out)``.
    ``expert_rows``: only experts ``[e0, e1)`` of a 3-D parameter (streamed in blocks).
    """
    experts, r, layout = expert_layout(param_shape, A.shape, B.shape, layout=layout)
    device = A.device
    a32, b32 = _f32(A, device), _f32(B, device)
    if len(param_shape) == 2:
        delta = b32 @ a32
    else:
        a3 = a32.reshape(experts, r, a32.shape[-1])
        b3 = b32.reshape(b32.shape[0], r, experts)
        if expert_rows is not None:
            a3, b3 = a3[expert_rows[0] : expert_rows[1]], b3[:, :, expert_rows[0] : expert_rows[1]]
        out = "eoi" if layout == "out_in" else "eio"
        delta = torch.einsum(f"ore,eri->{out}", b3, a3)
    delta.mul_(scale)
    return delta


def add_rounded(P: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``P + round(Δ)``: the delta is cast to P's dtype first (two roundings); new tensor."""
    _check_float(P)
    if P.shape != delta.shape:
        raise MergeError(f"delta shape {list(delta.shape)} does not fit {list(P.shape)}")
    return P + delta.to(device=P.device, dtype=P.dtype)


def merge_expert_param(
    P: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float,
    *,
    layout: ExpertLayout | None = None,
    expert_rows: tuple[int, int] | None = None,
    param_shape: Sequence[int] | None = None,
    inplace: bool = False,
) -> torch.Tensor:
    """Merge a ``target_parameters`` LoRA into the parameter: ``P + round(Δ)``.
    ``expert_rows``: ``P`` holds only experts ``[e0, e1)`` of a ``param_shape`` tensor.
    ``inplace``: the CPU path may write the result over ``P`` (the runner's own buffer)."""
    _check_float(P)
    shape = P.shape if expert_rows is None else param_shape
    assert shape is not None
    if len(shape) != 3 or P.device.type != "cpu" or P.dim() != 3:
        delta = expert_delta(A, B, scale, param_shape=shape, layout=layout, expert_rows=expert_rows)
        return add_rounded(P, delta)
    return _merge_experts_blocked(P, A, B, scale, shape, layout, expert_rows, inplace)


def _merge_experts_blocked(
    P: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float,
    shape: Sequence[int],
    layout: ExpertLayout | None,
    expert_rows: tuple[int, int] | None,
    inplace: bool,
) -> torch.Tensor:
    """``P + round(Δ)`` an expert's block of rows at a time: a gpt-oss expert's fp32 delta
    is 66 MB, which put a merge's peak RSS at 650 MiB. Each block's product is the einsum
    of that expert's factor slices (measured: bit for bit the rows of the whole einsum, at
    1 and 4 threads; blocks keep ``MIN_GEMM_ROWS`` rows)."""
    experts, r, layout = expert_layout(shape, A.shape, B.shape, layout=layout)
    first = expert_rows[0] if expert_rows else 0
    want = (expert_rows[1] - first if expert_rows else experts, *shape[1:])
    if tuple(P.shape) != tuple(want):
        raise MergeError(f"delta shape {list(want)} does not fit {list(P.shape)}")
    a3 = _f32(A, P.device).reshape(experts, r, A.shape[-1])
    b3 = _f32(B, P.device).reshape(B.shape[0], r, experts)
    out = (
        P
        if inplace and P.is_contiguous()
        else torch.empty_like(P, memory_format=torch.contiguous_format)
    )
    rows, cols = P.shape[1], P.shape[2]
    spans = row_spans(rows, max(MIN_GEMM_ROWS, _BLOCK_ELEMENTS // max(1, cols)))
    for i in range(P.shape[0]):
        e = first + i
        for start, stop in spans:
            if layout == "out_in":  # Δ[e][o0:o1] = B_e[o0:o1] @ A_e
                delta = torch.einsum("or,ri->oi", b3[start:stop, :, e], a3[e])
            else:  # Δ[e] = (B_e @ A_e)ᵀ: rows i0:i1 are A_e's columns i0:i1
                delta = torch.einsum("or,ri->io", b3[:, :, e], a3[e][:, start:stop])
            delta.mul_(scale)
            torch.add(P[i, start:stop], delta.to(P.dtype), out=out[i, start:stop])
    return out


def merge_expert_slice(
    W: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float,
    *,
    experts: int,
    expert: int,
    rows: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Merge one expert's share of a fused ``(E,out,in)`` delta into a per-expert tensor.

    transformers v5 fuses MoE experts in memory but writes them per expert on disk
    (``experts.{e}.w1/w3/w2``); the adapter targets the fused parameter. This computes
    only expert ``e``'s ``(out, in)`` block (rows ``rows`` of it, for the gate or up
    half of ``gate_up_proj``) so memory stays at one per-expert tensor, then adds it
    with the same two roundings as ``merge_expert_param``: ``W + round(Δ[e][rows])``.
    """
    _check_float(W)
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1] or A.shape[0] % experts:
        raise MergeError(
            f"target_parameters LoRA A {list(A.shape)} / B {list(B.shape)} does not split "
            f"into {experts} experts"
        )
    r = A.shape[0] // experts
    a_e = _f32(A, W.device).reshape(experts, r, A.shape[1])[expert]
    b3 = _f32(B, W.device).reshape(B.shape[0], r, experts)
    b_e = b3[rows[0] : rows[1], :, expert] if rows else b3[:, :, expert]
    delta = torch.einsum("or,ri->oi", b_e, a_e)
    delta.mul_(scale)
    return add_rounded(W, delta)
