"""The suite's PEFT oracle runs at the thread count of lora's merge math, whatever torch's
ambient count (tests/peft_oracle.py): a bit-identity comparison cannot forget to pin it."""

from __future__ import annotations

import copy

import torch
from conftest import tiny_model
from peft_oracle import unpinned_peft_merges

from lora_cli.merge.run import CPU_MATH_THREADS


def _threads_seen_by_merge(peft_model) -> list[int]:
    """torch's thread count inside every LoRA layer merge of ``merge_and_unload``."""
    from peft.tuners.lora import LoraLayer

    seen: list[int] = []
    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            merge = module.merge

            def spy(*args, _merge=merge, **kwargs):
                seen.append(torch.get_num_threads())
                return _merge(*args, **kwargs)

            module.merge = spy
    peft_model.merge_and_unload()
    return seen


def test_every_peft_merge_runs_at_lora_math_threads() -> None:
    from peft import LoraConfig, get_peft_model

    model = tiny_model("llama", torch.float32)
    lora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    before = torch.get_num_threads()
    torch.set_num_threads(3)  # as torch would pick on a 3-core runner
    try:
        pinned = _threads_seen_by_merge(get_peft_model(copy.deepcopy(model), lora))
        with unpinned_peft_merges():
            ambient = _threads_seen_by_merge(get_peft_model(copy.deepcopy(model), lora))
        assert torch.get_num_threads() == 3, "the caller's thread count is restored"
    finally:
        torch.set_num_threads(before)
    assert pinned and set(pinned) == {CPU_MATH_THREADS}, pinned
    assert ambient and set(ambient) == {3}, ambient


def test_the_pinned_count_is_the_one_the_merge_workers_use() -> None:
    """run.py's CPU workers run at ``CPU_MATH_THREADS`` (the constant the oracle reads)."""
    import inspect

    from lora_cli.merge import run

    source = inspect.getsource(run)
    assert "else CPU_MATH_THREADS" in source and "initargs=(intra,)" in source
