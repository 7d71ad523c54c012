"""Tensor arithmetic for ``validate``: NaN/Inf counts, ulp distances and the tolerant,
chunked comparison that decides whether two tensors agree.

Kept apart from the checks so that the definition of "equal within tolerance" lives in
one place and can be tested on its own.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lora_cli.io.dtypes import FLOAT_DTYPES

if TYPE_CHECKING:
    import torch

DEFAULT_ULPS = 1
CHUNK = 1 << 22  # elements per comparison/scan chunk: bounded temporaries on huge tensors


def count_nonfinite(t: torch.Tensor) -> tuple[int, int]:
    """(NaN count, ±Inf count) of a floating point tensor, in bounded chunks."""
    import torch

    flat = t.reshape(-1)
    nan = inf = 0
    for i in range(0, flat.numel(), CHUNK):
        c = flat[i : i + CHUNK]
        if c.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            c = c.float()
        nan += int(torch.isnan(c).sum())
        inf += int(torch.isinf(c).sum())
    return nan, inf


_INT_VIEW = {1: "int8", 2: "int16", 4: "int32", 8: "int64"}


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise distance in units of last place between two float tensors of one dtype,
    as float64 (exact below 2**53). +0 and -0 are 0 apart; NaN positions are meaningless
    (callers mask them)."""
    import torch

    if a.dtype != b.dtype or a.shape != b.shape:
        raise ValueError(f"ulp_distance needs one dtype and shape ({a.dtype} {b.dtype})")
    int_type = getattr(torch, _INT_VIEW[a.element_size()])
    bits = a.element_size() * 8
    mask = (1 << (bits - 1)) - 1
    ai = a.contiguous().view(int_type).to(torch.int64)
    bi = b.contiguous().view(int_type).to(torch.int64)
    # sign-magnitude → a monotonic integer line
    am = torch.where(ai < 0, -(ai & mask), ai)
    bm = torch.where(bi < 0, -(bi & mask), bi)
    same_sign = (am >= 0) == (bm >= 0)
    # with equal signs the int64 difference cannot overflow; across zero add magnitudes
    return torch.where(
        same_sign, (am - bm).abs().to(torch.float64), am.abs().double() + bm.abs().double()
    )


def max_ulp(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest ulp distance between two float tensors of one dtype (NaN pairs ignored)."""
    import torch

    fa, fb = a.reshape(-1), b.reshape(-1)
    worst = 0
    for i in range(0, fa.numel(), CHUNK):
        ca, cb = fa[i : i + CHUNK], fb[i : i + CHUNK]
        d = ulp_distance(ca, cb)
        d = torch.where(torch.isnan(ca.double()) | torch.isnan(cb.double()), 0.0, d)
        if d.numel():
            worst = max(worst, int(d.max()))
    return worst


@dataclass
class Diff:
    identical: bool  # bit for bit
    max_abs: float
    max_ulp: int | None
    bad: int  # elements outside the tolerance

    @staticmethod
    def combine(diffs: Iterable[Diff]) -> Diff:
        out = Diff(True, 0.0, 0, 0)
        for d in diffs:
            out.identical &= d.identical
            out.max_abs = max(out.max_abs, d.max_abs)
            if out.max_ulp is not None:
                out.max_ulp = None if d.max_ulp is None else max(out.max_ulp, d.max_ulp)
            out.bad += d.bad
        return out


def compare(got: torch.Tensor, exp: torch.Tensor, dtype: str, atol: float, rtol: float) -> Diff:
    """Compare two tensors of one dtype and shape, chunk by chunk.

    Floating point: an element is within tolerance when it is at most ``DEFAULT_ULPS``
    ulp away or ``|got - exp| <= atol + rtol * |exp|``; NaN must meet NaN. Other dtypes
    must be bit-identical.
    """
    import torch

    g, e = got.reshape(-1), exp.reshape(-1)
    if g.dtype != e.dtype or g.numel() != e.numel():
        raise ValueError("compare needs one dtype and size")
    floating = dtype in FLOAT_DTYPES
    integer = dtype[0] in "IU"
    identical = True
    max_abs = 0.0
    worst_ulp: int | None = 0 if floating else None
    bad = 0
    for i in range(0, g.numel(), CHUNK):
        cg, ce = g[i : i + CHUNK], e[i : i + CHUNK]
        iv = getattr(torch, _INT_VIEW[g.element_size()])
        same = cg.view(iv) == ce.view(iv)
        if bool(same.all()):
            continue
        identical = False
        if not floating:
            bad += int((~same).sum())
            if integer:
                diff = (cg.to(torch.float64) - ce.to(torch.float64)).abs()
                max_abs = max(max_abs, float(diff.max()))
            else:
                max_abs = math.inf
            continue
        g64, e64 = cg.to(torch.float64), ce.to(torch.float64)
        nan_g, nan_e = torch.isnan(g64), torch.isnan(e64)
        nan_mismatch = nan_g != nan_e
        diff = torch.where(same | (nan_g & nan_e), 0.0, (g64 - e64).abs())
        diff = torch.where(nan_mismatch | torch.isnan(diff), math.inf, diff)
        ulp = torch.where(nan_g | nan_e, 0.0, ulp_distance(cg, ce))
        within = (ulp <= DEFAULT_ULPS) | (diff <= atol + rtol * e64.abs())
        within &= ~nan_mismatch
        bad += int((~within).sum())
        max_abs = max(max_abs, float(diff.max()))
        if worst_ulp is not None:
            worst_ulp = None if bool(nan_mismatch.any()) else max(worst_ulp, int(ulp.max()))
    return Diff(identical, max_abs, worst_ulp, bad)
