"""PEFT as the oracle, at the product's thread count.

torch chooses kernels by its intra-op thread count (on an AMD EPYC a conv delta is
im2col + GEMM at one thread but oneDNN with fused multiply-add at two or more), so a bit for
bit comparison is only fair when PEFT's merge runs at the thread count lora's merge math
runs at (``lora_cli.merge.run.CPU_MATH_THREADS``). Rather than trusting every test to
remember, ``pin_peft_merges`` (called once by conftest.py) wraps PEFT's merge entry points
so that every merge in the suite runs pinned; a new comparison cannot be unpinned by
accident. ``unpinned_peft_merges`` is the one deliberate way out, for a diagnostic that
wants PEFT at torch's ambient thread count (the PEFT suite's "thread-dependent" count).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.util
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

from lora_cli.merge.run import CPU_MATH_THREADS, torch_threads

# Methods that compute merged weights (every other merge path in PEFT goes through them).
MERGE_ENTRY_POINTS = ("merge_and_unload", "merge_adapter", "_unload_and_optionally_merge")
_state = threading.local()


def product_threads(n: int = CPU_MATH_THREADS) -> contextlib.AbstractContextManager[None]:
    """torch at ``n`` intra-op threads inside (the merge's own switch), the caller's count
    restored after."""
    return torch_threads(n)


@contextlib.contextmanager
def unpinned_peft_merges() -> Iterator[None]:
    """PEFT merges at torch's ambient thread count inside (diagnostics only: never the
    reference a bit-identity assertion compares with)."""
    before = getattr(_state, "unpinned", False)
    _state.unpinned = True
    try:
        yield
    finally:
        _state.unpinned = before


def _pinned(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if getattr(_state, "unpinned", False):
            return method(*args, **kwargs)
        with product_threads():
            return method(*args, **kwargs)

    wrapper.__lora_pinned__ = True  # type: ignore[attr-defined]
    return wrapper


def _subclasses(cls: type) -> Iterator[type]:
    yield cls
    for sub in cls.__subclasses__():
        yield from _subclasses(sub)


def pin_peft_merges() -> list[str]:
    """Wrap every merge entry point of PEFT's models and tuners (imported now: the tuner
    modules register their classes on ``import peft``). Idempotent; returns what it wrapped."""
    import peft
    from peft.tuners.tuners_utils import BaseTuner

    wrapped = []
    for root in (peft.PeftModel, BaseTuner):
        for cls in _subclasses(root):
            for name in MERGE_ENTRY_POINTS:
                method = cls.__dict__.get(name)
                if callable(method) and not getattr(method, "__lora_pinned__", False):
                    setattr(cls, name, _pinned(method))
                    wrapped.append(f"{cls.__qualname__}.{name}")
    return wrapped


class _PinOnImport(importlib.abc.MetaPathFinder):
    """Runs ``pin_peft_merges`` right after ``import peft`` completes, wherever it happens
    (module level or inside a test), so a run that never imports PEFT never pays for it."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != "peft":
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_pin(module: Any) -> None:
            exec_module(module)
            pin_peft_merges()

        spec.loader.exec_module = exec_then_pin  # type: ignore[method-assign]
        return spec


def pin_peft_merges_on_import() -> None:
    """Pin now if PEFT is loaded, else as soon as it is (conftest.py calls this once)."""
    if "peft" in sys.modules:
        pin_peft_merges()
    elif not any(isinstance(f, _PinOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PinOnImport())
