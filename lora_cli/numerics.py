"""Numeric checks shared by every layer (sources, merge, validate), so none of them imports
another's module for one; torch is never imported here (a tensor's own methods suffice)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def all_finite(t: torch.Tensor) -> bool:
    """Whether ``t`` holds no NaN/Inf: the merge's last check before a value is written,
    and a quantized base's check of its scales before they multiply a weight.

    A NaN or Inf anywhere makes the sum non-finite, and ``sum`` is one vectorized pass
    in the tensor's own dtype (``isfinite(t).all()`` is ~25× slower on CPU for bf16).
    A finite tensor whose sum overflows its dtype takes the exact, slower test.
    """
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if math.isfinite(float(t.sum())):
        return True
    return bool(t.isfinite().all())
