"""Small but faithful quantized checkpoints, built at test time from tiny bf16 models.

* DeepSeek-shaped FP8: MLA with the real 576-row ``kv_a_proj_with_mqa`` (ragged for
  128×128 blocks), per-expert routed experts, F32 ``weight_scale_inv`` (or BF16/F16), and
  layer 1's scales in a second shard away from their weights.
* Kimi-shaped compressed-tensors ``pack-quantized`` INT4 (group 32) routed experts, packed
  by compressed-tensors itself.
* gpt-oss-shaped MXFP4 expert pair (``*_blocks``/``*_scales``).

The goldens come from the independent oracles: compressed-tensors' ``convert_checkpoint``
with ``FP8BlockDequantizer`` / ``CompressedTensorsDequantizer``, and transformers'
``convert_moe_packed_tensors``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

DEEPSEEK = dict(
    hidden_size=256,
    intermediate_size=256,
    moe_intermediate_size=128,
    num_hidden_layers=2,
    first_k_dense_replace=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    n_routed_experts=4,
    num_experts_per_tok=2,
    n_shared_experts=1,
    n_group=1,
    topk_group=1,
    kv_lora_rank=512,
    q_lora_rank=128,
    qk_rope_head_dim=64,
    qk_nope_head_dim=32,
    v_head_dim=32,
    vocab_size=64,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)


def tiny_deepseek(path: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("deepseek_v3", **DEEPSEEK)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(path)
    return path


def tiny_gpt_oss(path: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "gpt_oss",
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        num_local_experts=2,
        num_experts_per_tok=1,
        vocab_size=64,
        max_position_embeddings=64,
        layer_types=["full_attention"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "experts" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(path)
    return path


def _is_deepseek_linear(name: str, t: torch.Tensor) -> bool:
    skip = ("embed_tokens", "lm_head", "norm", "mlp.gate.")
    return t.dim() == 2 and name.endswith(".weight") and not any(s in name for s in skip)


def fp8_quantize_deepseek(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's rule, written out here: per 128×128 block s = amax/448, q = w/s in e4m3."""
    rows, cols = w.shape
    gr, gc = -(-rows // block), -(-cols // block)
    s = torch.empty(gr, gc)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    w32 = w.float()
    for i in range(gr):
        for j in range(gc):
            tile = w32[i * block : (i + 1) * block, j * block : (j + 1) * block]
            s[i, j] = tile.abs().max() / 448.0
            q[i * block : (i + 1) * block, j * block : (j + 1) * block] = (
                (tile / s[i, j]).clamp(-448, 448).to(torch.float8_e4m3fn)
            )
    return q, s


def fp8_block_base(bf16: Path, out: Path, scale_dtype: torch.dtype = torch.float32) -> Path:
    """An FP8 block checkpoint in two shards; layer 1's scales sit in the second one."""
    state = load_file(bf16 / "model.safetensors")
    first: dict[str, torch.Tensor] = {}
    second: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if _is_deepseek_linear(name, t):
            q, s = fp8_quantize_deepseek(t)
            first[name] = q
            (second if "layers.1." in name else first)[f"{name}_scale_inv"] = s.to(scale_dtype)
        else:  # (a shard of scales only would have nothing of its own)
            (second if "layers.1." in name else first)[name] = t
    out.mkdir()
    save_file(first, out / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    save_file(second, out / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    weight_map = {n: "model-00001-of-00002.safetensors" for n in first}
    weight_map.update({n: "model-00002-of-00002.safetensors" for n in second})
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    config = json.loads((bf16 / "config.json").read_text())
    config["quantization_config"] = {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    }
    (out / "config.json").write_text(json.dumps(config))
    return out


KIMI_IGNORE = [
    "lm_head",
    "re:.*self_attn.*",
    "re:.*shared_experts.*",
    "re:.*mlp\\.(gate|up|gate_up|down)_proj.*",
]


def ct_int4_base(bf16: Path, out: Path) -> Path:
    """Kimi-K2-shaped: routed experts pack-quantized INT4, symmetric, group 32, by
    compressed-tensors' own qparams, quantize and pack functions."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32)
    state = load_file(bf16 / "model.safetensors")
    new: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if ".mlp.experts." in name and name.endswith(".weight"):
            module = name.removesuffix(".weight")
            rows, cols = t.shape
            groups = t.reshape(rows, cols // 32, 32)
            scale, zp = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
            q = quantize(t, scale, zp, args, dtype=torch.int8)
            new[f"{module}.weight_packed"] = pack_to_int32(q, 4)
            new[f"{module}.weight_scale"] = scale
            new[f"{module}.weight_shape"] = torch.tensor(t.shape)
        else:
            new[name] = t
    out.mkdir()
    save_file(new, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((bf16 / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": 4,
                    "type": "int",
                    "symmetric": True,
                    "strategy": "group",
                    "group_size": 32,
                    "dynamic": False,
                    "observer": "minmax",
                },
                "input_activations": None,
                "output_activations": None,
                "format": "pack-quantized",
            }
        },
        "ignore": KIMI_IGNORE,
        "kv_cache_scheme": None,
    }
    (out / "config.json").write_text(json.dumps(config))
    return out


def mxfp4_base(bf16: Path, out: Path) -> Path:
    """gpt-oss-shaped: expert tensors as MXFP4 blocks (out×in, grouped along in)."""
    from lora_cli.io.quant import mxfp4_quant

    state = load_file(bf16 / "model.safetensors")
    new: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = mxfp4_quant(t.transpose(1, 2).contiguous())  # (E, out, in)
            new[f"{name}_blocks"] = blocks
            new[f"{name}_scales"] = scales
        else:
            new[name] = t
    out.mkdir()
    save_file(new, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((bf16 / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
    }
    (out / "config.json").write_text(json.dumps(config))
    return out


def mxfp4_golden(base: Path, out: Path) -> Path:
    """transformers' own MXFP4 decode into the bf16 parameter layout."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    state = load_file(base / "model.safetensors")
    new = {}
    for name, t in state.items():
        if name.endswith("_scales"):
            continue
        if name.endswith("_blocks"):
            param = name.removesuffix("_blocks")
            new[param] = convert_moe_packed_tensors(
                t, state[f"{param}_scales"], dtype=torch.bfloat16
            ).contiguous()
        else:
            new[name] = t
    out.mkdir()
    save_file(new, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((base / "config.json").read_text())
    config.pop("quantization_config")
    (out / "config.json").write_text(json.dumps(config))
    return out


def ct_dequantizers() -> tuple[Any, Any]:
    """compressed-tensors' (CompressedTensorsDequantizer, FP8BlockDequantizer), the oracle;
    skips where the installed release predates them (test-oldest resolves an old one)."""
    try:
        from compressed_tensors.entrypoints.convert.converters import (
            CompressedTensorsDequantizer,
            FP8BlockDequantizer,
        )
    except ImportError:
        from importlib.metadata import version

        pytest.skip(
            f"compressed-tensors {version('compressed-tensors')} has no dequantizing "
            "converters (the oracle these tests compare with)"
        )
    return CompressedTensorsDequantizer, FP8BlockDequantizer


def ct_golden(base: Path, out: Path, kind: str) -> Path:
    """compressed-tensors' dequantizers (the converters ``convert_checkpoint`` runs, called
    on the whole tiny state dict: its file writer trips on column-ragged blocks, whose
    dequantized slices are not contiguous): the bf16 golden of a quantized base."""
    CompressedTensorsDequantizer, FP8BlockDequantizer = ct_dequantizers()
    converter = (
        FP8BlockDequantizer.from_pretrained(base)
        if kind == "fp8"
        else CompressedTensorsDequantizer(base)
    )
    tensors = converter.process(load_folder(base))
    out.mkdir()
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        out / "model.safetensors",
        metadata={"format": "pt"},
    )
    config = json.loads((base / "config.json").read_text())
    config.pop("quantization_config")
    (out / "config.json").write_text(json.dumps(config))
    return out


def load_folder(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
