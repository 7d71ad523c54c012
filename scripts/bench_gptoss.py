"""A gpt-oss-shaped synthetic model for the bench (imported by ``scripts/bench.py``).

Issue 19 asks for MXFP4 rows, and MXFP4 is how gpt-oss stores its fused 3-D experts only, which
the Llama-shaped bench model has none of. So this is a second synthetic model with gpt-oss's
tensor names, orientations and widths (hidden = intermediate = 2880, head_dim 64, 64 query and
8 key/value heads, attention biases and sinks, a router, experts ``gate_up_proj`` (E, H, 2I)
and ``down_proj`` (E, I, H) stored (in, out) as transformers 5 writes them), with the expert count
and layer count chosen to hit the bench's sizes.

The bf16 checkpoint is the MXFP4 one decoded: every expert value is rounded through MXFP4
(``lora_cli.io.quant``, the encoder the test suite checks against transformers' decoder) when it
is generated, so ``scripts/bench_quant.py``'s MXFP4 version of it re-encodes it losslessly and
"the bf16-base merge of the same model" is exactly that (as gpt-oss-20b-BF16 is to gpt-oss-20b).

Adapters: ``qv`` (attention q, v) and ``all-linear`` (attention q, k, v, o plus both expert
tensors through PEFT ``target_parameters``, the widely copied gpt-oss recipe), with the key
names and factor layouts PEFT 0.21 saves: a ``ParamWrapper`` per parameter, nested in
registration order (``experts.base_layer.lora_*`` = gate_up_proj, ``experts.lora_*`` =
down_proj), ``lora_A`` (r·E, in), ``lora_B`` (out, r·E).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MODEL = "gpt-oss"
VERSION = 1  # bump when this module's output changes: cached gpt-oss inputs are then rebuilt
ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
TARGET_MODULES = {"all-linear": ATTN_MODULES, "qv": ("q_proj", "v_proj")}
TARGET_PARAMETERS = {
    "all-linear": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    "qv": [],
}
# The quantization_config every gpt-oss checkpoint ships (docs/quantized-bases.md §1.5).
QUANTIZATION_CONFIG = {
    "quant_method": "mxfp4",
    "modules_to_not_convert": [
        "model.layers.*.self_attn",
        "model.layers.*.mlp.router",
        "model.embed_tokens",
        "lm_head",
    ],
}


@dataclass(frozen=True)
class OssSpec:
    """Shape of one synthetic gpt-oss checkpoint."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    experts: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_shard_bytes: int


# bf16 sizes: small 1.60 GiB (8 experts, 3 layers: one gate_up_proj is 265 MB), large 6.15 GiB
# (24 experts, 5 layers: 796 MB), at gpt-oss-20b's widths; quick ~6 MiB in several shards.
OSS_SIZES: dict[str, OssSpec] = {
    "quick": OssSpec("quick", 256, 256, 2, 4, 4, 2, 64, 2048, 3_000_000),
    "small": OssSpec("small", 2880, 2880, 3, 8, 64, 8, 64, 32000, 1_000_000_000),
    "large": OssSpec("large", 2880, 2880, 5, 24, 64, 8, 64, 32000, 2_000_000_000),
}


def tensor_shapes(spec: OssSpec) -> list[tuple[str, tuple[int, ...]]]:
    """gpt-oss tensor names and shapes (transformers 5's on-disk layout), layer by layer."""
    h, i, e = spec.hidden, spec.intermediate, spec.experts
    q, kv = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (spec.vocab, h))]
    for n in range(spec.layers):
        p = f"model.layers.{n}"
        out += [
            (f"{p}.input_layernorm.weight", (h,)),
            (f"{p}.self_attn.q_proj.weight", (q, h)),
            (f"{p}.self_attn.q_proj.bias", (q,)),
            (f"{p}.self_attn.k_proj.weight", (kv, h)),
            (f"{p}.self_attn.k_proj.bias", (kv,)),
            (f"{p}.self_attn.v_proj.weight", (kv, h)),
            (f"{p}.self_attn.v_proj.bias", (kv,)),
            (f"{p}.self_attn.o_proj.weight", (h, q)),
            (f"{p}.self_attn.o_proj.bias", (h,)),
            (f"{p}.self_attn.sinks", (spec.heads,)),
            (f"{p}.post_attention_layernorm.weight", (h,)),
            (f"{p}.mlp.router.weight", (e, h)),
            (f"{p}.mlp.router.bias", (e,)),
            (f"{p}.mlp.experts.gate_up_proj", (e, h, 2 * i)),
            (f"{p}.mlp.experts.gate_up_proj_bias", (e, 2 * i)),
            (f"{p}.mlp.experts.down_proj", (e, i, h)),
            (f"{p}.mlp.experts.down_proj_bias", (e, h)),
        ]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (spec.vocab, h))]
    return out


def config(spec: OssSpec) -> dict[str, Any]:
    """A GptOssForCausalLM config.json (transformers 5 loads the bf16 checkpoint with it)."""
    return {
        "architectures": ["GptOssForCausalLM"],
        "model_type": "gpt_oss",
        "attention_bias": True,
        "attention_dropout": 0.0,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "hidden_size": spec.hidden,
        "initializer_range": 0.02,
        "intermediate_size": spec.intermediate,
        "layer_types": ["sliding_attention", "full_attention"] * (spec.layers // 2)
        + ["sliding_attention"] * (spec.layers % 2),
        "max_position_embeddings": 131072,
        "num_attention_heads": spec.heads,
        "num_experts_per_tok": min(4, spec.experts),
        "num_hidden_layers": spec.layers,
        "num_key_value_heads": spec.kv_heads,
        "num_local_experts": spec.experts,
        "output_router_logits": False,
        "rms_norm_eps": 1e-05,
        "rope_parameters": {
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "factor": 32.0,
            "original_max_position_embeddings": 4096,
            "rope_theta": 150000.0,
            "rope_type": "yarn",
            "truncate": False,
        },
        "router_aux_loss_coef": 0.9,
        "sliding_window": 128,
        "swiglu_limit": 7.0,
        "tie_word_embeddings": False,
        "use_cache": True,
        "vocab_size": spec.vocab,
        "eos_token_id": spec.vocab - 2,  # (gpt-oss: 200002 and 199999 of 201088)
        "pad_token_id": spec.vocab - 1,
        "dtype": "bfloat16",
    }


def is_expert(name: str) -> bool:
    """A fused expert weight (the tensors gpt-oss stores in MXFP4)."""
    return name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))


def round_through_mxfp4(t: Any) -> Any:
    """``t`` (E, in, out) with every value replaced by its MXFP4 value, expert by expert (the
    blocks run along ``in``, as gpt-oss stores them (E, out, in/32, 16))."""
    from lora_cli.io.quant import mxfp4_dequant, mxfp4_quant

    for e in range(t.shape[0]):
        blocks, scales = mxfp4_quant(t[e].T)
        t[e] = mxfp4_dequant(blocks, scales, t.dtype).T
    return t


def fill(name: str, t: Any) -> Any:
    """Finish a generated tensor: norms near 1.0, experts exactly representable in MXFP4."""
    if name.endswith("norm.weight"):
        return t.add_(1.0)
    return round_through_mxfp4(t) if is_expert(name) else t


def adapter_factors(spec: OssSpec, kind: str) -> list[tuple[str, int, int, int | None]]:
    """(PEFT module key, out, in, experts or None) of every LoRA pair in a ``kind`` adapter."""
    h, i, e = spec.hidden, spec.intermediate, spec.experts
    q, kv = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
    shapes = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q)}
    out: list[tuple[str, int, int, int | None]] = []
    for layer in range(spec.layers):
        p = f"base_model.model.model.layers.{layer}"
        for mod in TARGET_MODULES[kind]:
            out.append((f"{p}.self_attn.{mod}", *shapes[mod], None))
        if TARGET_PARAMETERS[kind]:  # gate_up_proj registered first: the inner wrapper
            out.append((f"{p}.mlp.experts.base_layer", 2 * i, h, e))
            out.append((f"{p}.mlp.experts", h, i, e))
    return out


def probes(spec: OssSpec, kind: str) -> list[dict[str, Any]]:
    """Merged values ``check_output`` recomputes: the first and the last target, and for
    ``all-linear`` the first and last expert of both expert tensors of the last layer."""
    last = spec.layers - 1
    mods = TARGET_MODULES[kind]
    out: list[dict[str, Any]] = [
        {
            "tensor": f"model.layers.{layer}.self_attn.{mod}.weight",
            "module": f"base_model.model.model.layers.{layer}.self_attn.{mod}",
            "expert": None,
        }
        for layer, mod in ((0, mods[0]), (last, mods[-1]))
    ]
    if TARGET_PARAMETERS[kind]:
        experts = f"base_model.model.model.layers.{last}.mlp.experts"
        for expert in (0, spec.experts - 1):
            for leaf, module in (("gate_up_proj", f"{experts}.base_layer"), ("down_proj", experts)):
                out.append(
                    {
                        "tensor": f"model.layers.{last}.mlp.experts.{leaf}",
                        "module": module,
                        "expert": expert,
                        "experts": spec.experts,
                    }
                )
    return out


def untouched(kind: str) -> str:
    """A weight the ``kind`` adapter leaves alone (must come out bit-identical)."""
    return (
        "model.embed_tokens.weight"
        if kind == "all-linear"
        else "model.layers.0.self_attn.k_proj.weight"
    )


def adapter_config_fields(kind: str) -> dict[str, Any]:
    return {
        "target_modules": list(TARGET_MODULES[kind]),
        "target_parameters": list(TARGET_PARAMETERS[kind]),
    }
