"""Device selection: CUDA when asked for and present, a clean refusal otherwise."""

from __future__ import annotations

import pytest
import torch

from lora_cli.errors import UsageError
from lora_cli.merge.run import resolve_device


def test_auto_and_cpu() -> None:
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda:0" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("spec", ["cuda", "cuda:1", "CUDA:0"])
def test_missing_cuda_is_a_usage_error(spec: str) -> None:
    with pytest.raises(UsageError, match="no CUDA device"):
        resolve_device(spec)


@pytest.mark.parametrize("spec", ["tpu", "gpu", "cuda:x", ""])
def test_unknown_devices(spec: str) -> None:
    with pytest.raises(UsageError):
        resolve_device(spec)
