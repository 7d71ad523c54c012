"""Quantized versions of the bench's synthetic bf16 base (imported by ``scripts/bench.py``).

Issue 19's targets compare a merge into a quantized base with the merge of the same adapter
into the bf16 base it was made from, in the same run; so each quantized base here is the
bf16 base with every projection weight encoded by the producers' rules (``lora_cli.io.quant``,
which the test suite checks against the producers' own code), shard by shard:

* ``fp8``: DeepSeek/Qwen3 block FP8, ``weight`` float8_e4m3fn + F32 ``weight_scale_inv`` per
  128×128 block (``quant_method: fp8``);
* ``int4``: compressed-tensors ``pack-quantized`` INT4, symmetric, group 32 (Kimi-K2's scheme),
  ``weight_packed`` int32 + bf16 ``weight_scale`` + ``weight_shape``;
* ``mxfp4``: gpt-oss's MXFP4, of the gpt-oss-shaped base (``scripts/bench_gptoss.py``; MXFP4
  stores only fused 3-D experts, which the Llama-shaped base has none of): each
  ``…experts.gate_up_proj``/``down_proj`` (E, in, out) becomes ``<name>_blocks`` uint8
  (E, out, in/32, 16) + ``<name>_scales`` uint8 E8M0 (E, out, in/32), encoded expert by expert;
  the attention, router, biases, embeddings and head stay bf16, as in gpt-oss checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

SCHEMES = ("fp8", "int4", "mxfp4")
BLOCK = (128, 128)
INT4_GROUP = 32


def _quant_config(scheme: str) -> dict[str, Any]:
    if scheme == "mxfp4":
        from bench_gptoss import QUANTIZATION_CONFIG

        return QUANTIZATION_CONFIG
    if scheme == "fp8":
        return {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": list(BLOCK),
        }
    weights = {
        "num_bits": 4,
        "type": "int",
        "symmetric": True,
        "strategy": "group",
        "group_size": INT4_GROUP,
        "dynamic": False,
        "observer": "minmax",
    }
    group = {"targets": ["Linear"], "weights": weights, "input_activations": None}
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {**group, "format": "pack-quantized"}},
        "ignore": ["lm_head"],
    }


def _encode(scheme: str, name: str, w: Any) -> dict[str, Any]:
    """The raw tensors that store projection weight ``name`` in ``scheme``."""
    import torch

    from lora_cli.io import quant

    if scheme == "mxfp4":  # (E, in, out) → blocks along in, expert by expert
        encoded = [quant.mxfp4_quant(w[e].T) for e in range(w.shape[0])]
        return {
            f"{name}_blocks": torch.stack([blocks for blocks, _ in encoded]),
            f"{name}_scales": torch.stack([scales for _, scales in encoded]),
        }
    if scheme == "fp8":
        q, s = quant.fp8_block_quant(w, BLOCK, torch.float32, pow2=False)
        return {name: q, f"{name}_scale_inv": s}
    module = name.removesuffix(".weight")
    q, s = quant.ct_int_quant(w, INT4_GROUP, torch.bfloat16)
    return {
        f"{module}.weight_packed": quant.pack_int4(q),
        f"{module}.weight_scale": s,
        f"{module}.weight_shape": torch.tensor(list(w.shape)),
    }


def _quantized(scheme: str, name: str) -> bool:
    """Whether ``scheme`` stores tensor ``name`` quantized: every projection weight (FP8,
    INT4), the fused experts only (MXFP4)."""
    if scheme == "mxfp4":
        from bench_gptoss import is_expert

        return is_expert(name)
    return name.endswith("_proj.weight")


def ensure_quant_base(
    workdir: Path,
    size: str,
    expected: dict[str, Any],
    base: Path,
    config: dict[str, Any],
    scheme: str,
) -> Path:
    """Generate (or reuse) the ``scheme`` version of ``base``; ``expected`` is the bf16
    base's spec stamp (the cache is rebuilt when it changes)."""
    from safetensors.torch import load_file, save_file

    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantized base {scheme!r}")
    path = workdir / f"base-{size}-{scheme}"
    stamp = workdir / f"base-{size}-{scheme}.spec.json"
    expected = {**expected, "quant": scheme, "block": list(BLOCK), "group": INT4_GROUP}
    try:
        if json.loads(stamp.read_text()) == expected and path.is_dir():
            return path
    except (OSError, ValueError):
        pass
    stamp.unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)
    tmp = workdir / f"base-{size}-{scheme}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weight_map: dict[str, str] = {}
    for shard in sorted(base.glob("*.safetensors")):
        tensors = load_file(str(shard))
        for name in [n for n in tensors if _quantized(scheme, n)]:
            tensors.update(_encode(scheme, name, tensors.pop(name)))
        weight_map.update(dict.fromkeys(tensors, shard.name))
        save_file(tensors, str(tmp / shard.name), metadata={"format": "pt"})
        del tensors
    config = {**config, "quantization_config": _quant_config(scheme)}
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    index = {"metadata": {}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    tmp.rename(path)
    stamp.write_text(json.dumps(expected))
    return path
