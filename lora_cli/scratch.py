"""Per-thread reusable temporaries for the merge math and the quantization codecs.

A fresh multi-MiB tensor is a fresh ``mmap`` (page faults and zeroing on every touch: the
largest cost of re-quantizing a block, profiled), or, once glibc has raised its mmap
threshold, a hole in a malloc arena that other allocations split: a ``--quantize keep``
merge's resident memory grew by ~1.4 MiB per tensor from that alone (measured on the
1.64 GiB bench base). Work buffers that live as long as their thread have neither cost.
A caller owns a named buffer only until its next call with that name, so results that
leave a function are never views of one.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_buffers = threading.local()
# Largest buffer a thread keeps (32 MiB of fp32): row blocks and chunks fit many times over;
# a whole big tensor decoded at once (a format without row blocks, a per-tensor scale) gets
# a fresh tensor instead, so its size is not held for the rest of the run.
KEEP_ELEMENTS = 1 << 23


def scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A contiguous tensor of ``shape`` and ``dtype`` that this thread reuses under ``name``
    (its contents are whatever the last user left); above ``KEEP_ELEMENTS``, a fresh one."""
    import torch

    elements = 1
    for d in shape:
        elements *= d
    if elements > KEEP_ELEMENTS:
        return torch.empty(shape, dtype=dtype)
    key = (name, dtype)
    buf = getattr(_buffers, "table", None)
    if buf is None:
        buf = _buffers.table = {}
    have = buf.get(key)
    if have is None or have.numel() < elements:
        have = buf[key] = torch.empty(elements, dtype=dtype)
    return have[:elements].view(shape)


def work_buffer(
    name: str, shape: tuple[int, ...], dtype: torch.dtype, like: torch.Tensor
) -> torch.Tensor:
    """A work buffer on ``like``'s device: this thread's reusable one on the CPU, a fresh one
    from the caching allocator on a GPU (which already reuses its blocks)."""
    import torch

    if like.device.type == "cpu":
        return scratch(name, shape, dtype)
    return torch.empty(shape, dtype=dtype, device=like.device)
