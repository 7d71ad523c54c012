"""Train the tiny LoRA model under FSDP2 (``fully_shard`` on a gloo CPU mesh) for 2 steps and
save it through torch.distributed.checkpoint, as accelerate's SHARDED_STATE_DICT does.

Run as ``python -m torch.distributed.run --nproc_per_node W fsdp_train.py OUT``; writes
``OUT/ckpt/pytorch_model_fsdp_0/`` (``{"model": state_dict}``: every key gets ``model.``),
``OUT/ckpt/adapter_config.json`` and the untrained base in ``OUT/base/``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from ckpt_workers.common import batch, param_groups, peft_model, save_base, tiny_llama  # noqa: E402


def main() -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = tiny_llama()
    if rank == 0:
        save_base(model, out / "base")
    pm = peft_model(model)
    folder = out / "ckpt"
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        pm.peft_config["default"].save_pretrained(str(folder))
    mesh = init_device_mesh("cpu", (world,))
    for layer in pm.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(pm, mesh=mesh)
    optimizer = torch.optim.AdamW(param_groups(pm), lr=1e-2)
    for step in range(2):
        loss = pm(input_ids=batch(rank, step), labels=batch(rank, step)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    state = get_model_state_dict(pm)
    dcp.save({"model": state}, checkpoint_id=str(folder / "pytorch_model_fsdp_0"))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
