"""Train the tiny LoRA model under DeepSpeed for 2 steps and save checkpoints.

Run as ``python -m torch.distributed.run --nproc_per_node W ds_train.py OUT VARIANTS_JSON``
with ``DS_ACCELERATOR=cpu`` (gloo). Each variant is trained from the same seed and saved
to ``OUT/<name>/`` with ``engine.save_checkpoint``; rank 0 also writes
``adapter_config.json`` there and the untrained base to ``OUT/base/``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ckpt_workers.common import batch, param_groups, peft_model, save_base, tiny_llama  # noqa: E402


def run_variant(out: Path, v: dict, rank: int) -> None:
    import deepspeed

    model = tiny_llama(tied=v.get("tokens", False), **v.get("sizes", {}))
    if rank == 0:
        save_base(model, out / ("base-tied" if v.get("tokens") else "base"))
    folder = out / v["name"]
    if v.get("plain"):  # full fine-tuning, no LoRA
        pm = model
    else:
        pm = peft_model(model, tokens=v.get("tokens", False))
        if rank == 0:
            folder.mkdir(parents=True, exist_ok=True)
            pm.peft_config["default"].save_pretrained(str(folder))
    zero: dict = {"stage": v["stage"]}
    if "sub_group_size" in v:
        zero["sub_group_size"] = v["sub_group_size"]
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bool(v.get("bf16"))},
    }
    if v.get("bf16_optimizer"):
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    optimizer = torch.optim.AdamW(param_groups(pm), lr=1e-2)
    engine, *_ = deepspeed.initialize(model=pm, optimizer=optimizer, config=config)
    for step in range(2):
        out_ = engine(input_ids=batch(rank, step), labels=batch(rank, step))
        engine.backward(out_.loss)
        engine.step()
    engine.save_checkpoint(str(folder), exclude_frozen_parameters=bool(v.get("exclude_frozen")))
    torch.distributed.barrier()


def main() -> None:
    import faulthandler

    faulthandler.dump_traceback_later(240, exit=True)
    import deepspeed
    import deepspeed.comm.torch  # noqa: F401 (the attribute is shadowed by the torch package)

    # DeepSpeed's CPU shared-memory allreduce is a JIT-compiled extension behind a
    # machine-wide file lock; gloo alone is enough for these tiny runs.
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    out = Path(sys.argv[1])
    variants = json.loads(sys.argv[2])
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    for v in variants:
        run_variant(out, v, rank)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
