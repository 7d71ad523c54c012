#!/usr/bin/env python
"""Benchmark `lora merge` against `cp -r` (the I/O floor) and the PEFT `merge_and_unload` path.

Why this exists: the claim we want to check (docs/peers-and-performance.md §0, §4, §8) is that a
streaming LoRA merge is disk-bound, i.e. close to the cost of copying the checkpoint, and that it
needs O(largest tensor) memory where the usual PEFT path needs the whole model. So every run
measures the same three things side by side, in the same process tree and the same session:

* ``cp -r BASE OUT``                                   -- what pure I/O costs on this machine;
* ``lora merge BASE ADAPTER -o OUT --quiet``           -- the thing under test;
* PEFT ``from_pretrained`` + ``merge_and_unload`` + ``save_pretrained`` in a subprocess.

Inputs are synthetic Llama-shaped (and, for MXFP4, gpt-oss-shaped) bf16 checkpoints written
shard by shard with ``safetensors.torch.save_file`` (no model is ever instantiated), plus
PEFT-format adapters. They are cached in ``--workdir`` and reused while their spec matches.
Contenders alternate within each repetition (order rotated every repetition) and the median is
reported. Peak memory is the peak summed VmRSS of the child's process tree, sampled from /proc
every ~20 ms (psutil is not assumed).

This is a benchmark, not a test: it prints numbers, it only fails loudly on broken inputs. A failing
contender is reported (with its stderr tail) and the others carry on.

Usage::

    .venv/bin/python scripts/bench.py --quick            # tiny smoke run (~1 minute)
    .venv/bin/python scripts/bench.py                    # small (~1.6 GiB) and large (~6 GiB)
    .venv/bin/python scripts/bench.py --sizes small --repeats 5 --adapters qv
    .venv/bin/python scripts/bench.py --disk-peak 1 --parts 4   # Hub part jobs' disk peak
    .venv/bin/python scripts/bench.py --quant mxfp4              # gpt-oss-shaped MXFP4 rows
    .venv/bin/python scripts/bench.py --extract-only --mergekit PATH   # extract vs mergekit

Modules beside it: bench_measure.py (timing a child's process tree), bench_quant.py (FP8, INT4
and MXFP4 versions of a base), bench_gptoss.py (the gpt-oss-shaped model MXFP4 needs),
bench_extract.py (`lora extract` against mergekit), disk_peak.py (--disk-peak).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the bench_* modules beside this one
import bench_extract  # noqa: E402
import bench_gptoss as oss  # noqa: E402
from bench_measure import (  # noqa: E402
    POLL_INTERVAL_S,
    RunResult,
    dir_bytes,
    run_measured,
    text_tail,
    warm_cache,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
# Bump when the generator's output changes, so stale caches are rebuilt instead of reused.
GENERATOR_VERSION = 1
MIB = 1024 * 1024
GIB = 1024 * MIB
LORA_RANK = 16
LORA_ALPHA = 32
ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
ADAPTER_TARGETS: dict[str, tuple[str, ...]] = {
    "all-linear": ATTN_MODULES + MLP_MODULES,
    "qv": ("q_proj", "v_proj"),
}
QUANT_SCHEMES = ("fp8", "int4", "mxfp4")  # scripts/bench_quant.py
# The model each quantized base is a version of: MXFP4 needs fused experts (scripts/bench_gptoss.py)
QUANT_MODEL = {"fp8": "llama", "int4": "llama", "mxfp4": oss.MODEL}


# --------------------------------------------------------------------------------------------
# Synthetic inputs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SizeSpec:
    """Shape of one synthetic Llama checkpoint; the numbers are chosen to hit a target size."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    max_shard_bytes: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


# small ~1.64 GiB (TinyLlama-like, 17 layers), large ~6.1 GiB (Llama-2-7B widths with GQA, 17
# layers), quick ~8 MiB split into several shards so multi-shard handling is exercised in seconds.
SIZES: dict[str, SizeSpec] = {
    "quick": SizeSpec("quick", 256, 704, 4, 4, 2, 2048, 3_000_000),
    "small": SizeSpec("small", 2048, 5632, 17, 32, 4, 32000, 1_000_000_000),
    "large": SizeSpec("large", 4096, 11008, 17, 32, 8, 32000, 2_000_000_000),
    # large's tensors in 4 of its 17 layers (1.9 GiB): memory that must not grow with depth
    # (extract's is one tensor pair plus its SVD: it grows with the widest tensor, not the model)
    "large-4l": SizeSpec("large-4l", 4096, 11008, 4, 32, 8, 32000, 2_000_000_000),
}


def tensor_shapes(spec: SizeSpec) -> list[tuple[str, tuple[int, ...]]]:
    """Llama tensor names and shapes in the order transformers writes them (embed, layers, head)."""
    h, i, q, kv = spec.hidden, spec.intermediate, spec.heads, spec.kv_heads
    d = spec.head_dim
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (spec.vocab, h))]
    for n in range(spec.layers):
        p = f"model.layers.{n}"
        out += [
            (f"{p}.input_layernorm.weight", (h,)),
            (f"{p}.self_attn.q_proj.weight", (q * d, h)),
            (f"{p}.self_attn.k_proj.weight", (kv * d, h)),
            (f"{p}.self_attn.v_proj.weight", (kv * d, h)),
            (f"{p}.self_attn.o_proj.weight", (h, q * d)),
            (f"{p}.post_attention_layernorm.weight", (h,)),
            (f"{p}.mlp.gate_proj.weight", (i, h)),
            (f"{p}.mlp.up_proj.weight", (i, h)),
            (f"{p}.mlp.down_proj.weight", (h, i)),
        ]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (spec.vocab, h))]
    return out


def plan_shards(spec: SizeSpec | oss.OssSpec) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Greedy packing into shards of at most max_shard_bytes, like transformers' splitter."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    used = 0
    for name, shape in model_tensor_shapes(spec):
        nbytes = math.prod(shape) * 2
        if shards[-1] and used + nbytes > spec.max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append((name, shape))
        used += nbytes
    return shards


def llama_config(spec: SizeSpec) -> dict[str, Any]:
    """A real LlamaForCausalLM config.json so transformers (the PEFT contender) can load it."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "head_dim": spec.head_dim,
        "vocab_size": spec.vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
        "dtype": "bfloat16",
    }


def model_tensor_shapes(spec: SizeSpec | oss.OssSpec) -> list[tuple[str, tuple[int, ...]]]:
    return oss.tensor_shapes(spec) if isinstance(spec, oss.OssSpec) else tensor_shapes(spec)


def model_stem(spec: SizeSpec | oss.OssSpec) -> str:
    """The cache name of a synthetic model: ``small`` (Llama), ``small-gpt-oss``."""
    return f"{spec.name}-{oss.MODEL}" if isinstance(spec, oss.OssSpec) else spec.name


def model_stamp(spec: SizeSpec | oss.OssSpec) -> dict[str, Any]:
    """What a cached model was made from: it is rebuilt when any of it changes."""
    stamp = {"generator_version": GENERATOR_VERSION, "spec": asdict(spec)}
    if isinstance(spec, oss.OssSpec):
        stamp |= {"model": oss.MODEL, "model_version": oss.VERSION}
    return stamp


class RandomPool:
    """Fill tensors from one pre-drawn random block: randn for GBs is too slow on 2 cores.

    Each tensor starts at a different offset in an odd-length pool, so tensors differ from each
    other and from their neighbours; the content only needs to be non-trivial, not i.i.d.
    """

    def __init__(self, n: int = (1 << 24) + 4099, seed: int = 0) -> None:
        import torch

        gen = torch.Generator().manual_seed(seed)
        self.pool = torch.randn(n, generator=gen, dtype=torch.float32).mul_(0.02)
        self.pool = self.pool.to(torch.bfloat16)
        self.n = n
        self.counter = 0

    def take(self, shape: tuple[int, ...]) -> Any:
        import torch

        numel = math.prod(shape)
        out = torch.empty(numel, dtype=torch.bfloat16)
        self.counter += 1
        off = (self.counter * 2_654_435_761) % self.n
        pos = 0
        while pos < numel:
            take = min(self.n - off, numel - pos)
            out[pos : pos + take].copy_(self.pool[off : off + take])
            pos += take
            off = 0
        return out.view(shape)


def _spec_matches(spec_file: Path, expected: dict[str, Any]) -> bool:
    try:
        return json.loads(spec_file.read_text()) == expected
    except (OSError, ValueError):
        return False


def ensure_base(workdir: Path, spec: SizeSpec | oss.OssSpec) -> tuple[Path, bool, float]:
    """Generate (or reuse) the base checkpoint; returns (path, reused, seconds spent generating).

    Written into a temp dir and renamed, and the spec stamp (a sibling file, so the checkpoint dir
    looks exactly like a real one) is written last: an interrupted run never leaves a cache that
    looks valid.
    """
    from safetensors.torch import save_file

    stem = model_stem(spec)
    base = workdir / f"base-{stem}"
    stamp = workdir / f"base-{stem}.spec.json"
    expected = model_stamp(spec)
    gpt_oss = isinstance(spec, oss.OssSpec)
    shards = plan_shards(spec)
    n = len(shards)
    names = [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    if _spec_matches(stamp, expected) and all((base / nm).is_file() for nm in names):
        return base, True, 0.0

    t0 = time.perf_counter()
    stamp.unlink(missing_ok=True)
    shutil.rmtree(base, ignore_errors=True)
    tmp = workdir / f"base-{stem}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    pool = RandomPool()
    weight_map: dict[str, str] = {}
    total = 0
    for fname, shard in zip(names, shards, strict=True):
        tensors: dict[str, Any] = {}
        for tname, shape in shard:
            t = pool.take(shape)
            if gpt_oss:
                t = oss.fill(tname, t)
            elif len(shape) == 1:  # RMSNorm weights live near 1.0 in real checkpoints
                t.add_(1.0)
            tensors[tname] = t
            weight_map[tname] = fname
            total += t.numel() * t.element_size()
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        del tensors
        size_gib = (tmp / fname).stat().st_size / GIB
        print(f"  wrote {fname} ({size_gib:.2f} GiB)", file=sys.stderr, flush=True)
    config = oss.config(spec) if gpt_oss else llama_config(spec)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    gen_cfg = {"bos_token_id": 1, "eos_token_id": 2, "_from_model_config": True}
    (tmp / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")
    tmp.rename(base)
    stamp.write_text(json.dumps(expected))
    return base, False, time.perf_counter() - t0


def ensure_quant_base(workdir: Path, spec: SizeSpec | oss.OssSpec, base: Path, scheme: str) -> Path:
    """The ``scheme`` (fp8, int4: Llama; mxfp4: gpt-oss) version of ``base``
    (scripts/bench_quant.py)."""
    from bench_quant import ensure_quant_base as make

    config = oss.config(spec) if isinstance(spec, oss.OssSpec) else llama_config(spec)
    return make(workdir, model_stem(spec), model_stamp(spec), base, config, scheme)


def module_shape(spec: SizeSpec, module: str) -> tuple[int, int]:
    """(out_features, in_features) of one Llama linear module."""
    h, i, d = spec.hidden, spec.intermediate, spec.head_dim
    return {
        "q_proj": (spec.heads * d, h),
        "k_proj": (spec.kv_heads * d, h),
        "v_proj": (spec.kv_heads * d, h),
        "o_proj": (h, spec.heads * d),
        "gate_proj": (i, h),
        "up_proj": (i, h),
        "down_proj": (h, i),
    }[module]


def module_prefix(module: str) -> str:
    return "self_attn" if module in ATTN_MODULES else "mlp"


def adapter_factors(
    spec: SizeSpec | oss.OssSpec, kind: str
) -> list[tuple[str, int, int, int | None]]:
    """(PEFT module key, out, in, experts or None) of every LoRA pair of a ``kind`` adapter."""
    if isinstance(spec, oss.OssSpec):
        return oss.adapter_factors(spec, kind)
    return [
        (f"base_model.model.model.layers.{layer}.{module_prefix(mod)}.{mod}", *shape, None)
        for layer in range(spec.layers)
        for mod in ADAPTER_TARGETS[kind]
        for shape in [module_shape(spec, mod)]
    ]


def ensure_adapter(
    workdir: Path, spec: SizeSpec | oss.OssSpec, kind: str, base: Path
) -> tuple[Path, bool]:
    """Generate (or reuse) a PEFT-format LoRA adapter (fp32 factors, non-zero B) for `base`."""
    import torch
    from safetensors.torch import save_file

    path = workdir / f"adapter-{model_stem(spec)}-{kind}"
    stamp = workdir / f"adapter-{model_stem(spec)}-{kind}.spec.json"
    if isinstance(spec, oss.OssSpec):
        targets = oss.adapter_config_fields(kind)
    else:
        targets = {"target_modules": list(ADAPTER_TARGETS[kind])}
    expected = {
        **model_stamp(spec),
        "kind": kind,
        "r": LORA_RANK,
        "alpha": LORA_ALPHA,
        "base": str(base),
    }
    if _spec_matches(stamp, expected) and (path / "adapter_model.safetensors").is_file():
        return path, True
    stamp.unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    gen = torch.Generator().manual_seed(1234 + len(kind))
    tensors: dict[str, Any] = {}
    for key, out_f, in_f, experts in adapter_factors(spec, kind):
        rows = LORA_RANK * (experts or 1)  # PEFT's ParamWrapper: (r·E, in) and (out, r·E)
        a = torch.randn(rows, in_f, generator=gen) / math.sqrt(in_f)
        b = torch.randn(out_f, rows, generator=gen) * 0.01
        tensors[f"{key}.lora_A.weight"] = a
        tensors[f"{key}.lora_B.weight"] = b
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base),
        "r": LORA_RANK,
        "lora_alpha": LORA_ALPHA,
        "lora_dropout": 0.0,
        **targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    stamp.write_text(json.dumps(expected))
    return path, False


# --------------------------------------------------------------------------------------------
# The PEFT contender (runs in a child: `bench.py --internal peft JSON`)
# --------------------------------------------------------------------------------------------


def peft_child(base: str, adapter: str, out: str) -> int:
    """The typical "load whole model, merge, save" path (§4.1), with per-phase timings on stdout."""
    t0 = time.perf_counter()
    import torch
    import transformers
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    t_import = time.perf_counter()
    major = int(transformers.__version__.split(".")[0])
    dtype_kw = "dtype" if major >= 5 else "torch_dtype"  # v5 renamed torch_dtype -> dtype
    model = AutoModelForCausalLM.from_pretrained(base, **{dtype_kw: torch.bfloat16})
    t_load = time.perf_counter()
    model = PeftModel.from_pretrained(model, adapter)
    t_peft = time.perf_counter()
    merged = model.merge_and_unload()
    t_merge = time.perf_counter()
    merged.save_pretrained(out)
    t_save = time.perf_counter()
    phases = {
        "import_s": t_import - t0,
        "load_base_s": t_load - t_import,
        "load_adapter_s": t_peft - t_load,
        "merge_s": t_merge - t_peft,
        "save_s": t_save - t_merge,
    }
    print("PEFT_PHASES " + json.dumps(phases), flush=True)
    return 0


# --------------------------------------------------------------------------------------------
# Output checks (outside the timed window)
# --------------------------------------------------------------------------------------------


def _header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        hdr = json.loads(f.read(n))
    hdr.pop("__metadata__", None)
    return hdr


def _tensor_table(folder: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    table: dict[str, tuple[str, tuple[int, ...]]] = {}
    for p in sorted(folder.glob("*.safetensors")):
        for k, v in _header(p).items():
            table[k] = (v["dtype"], tuple(v["shape"]))
    return table


def _load(folder: Path, name: str, expert: int | None = None) -> Any:
    """One tensor of a checkpoint folder, or one expert (first-dim slice) of it."""
    from safetensors import safe_open

    for p in sorted(folder.glob("*.safetensors")):
        with safe_open(str(p), framework="pt") as f:
            if name in f.keys():  # noqa: SIM118 - safe_open handles are not containers
                return f.get_tensor(name) if expert is None else f.get_slice(name)[expert]
    raise KeyError(name)


def check_probes(spec: SizeSpec | oss.OssSpec, kind: str) -> tuple[list[dict[str, Any]], str]:
    """The merged weights ``check_output`` recomputes, and one weight the adapter leaves."""
    if isinstance(spec, oss.OssSpec):
        return oss.probes(spec, kind), oss.untouched(kind)
    targets = ADAPTER_TARGETS[kind]
    probes = []
    for layer, mod in ((0, targets[0]), (spec.layers - 1, targets[-1])):
        name = f"model.layers.{layer}.{module_prefix(mod)}.{mod}.weight"
        probes.append({"tensor": name, "module": f"base_model.model.{name[:-7]}", "expert": None})
    untouched = (
        "model.embed_tokens.weight"
        if kind == "all-linear"
        else "model.layers.0.self_attn.k_proj.weight"
    )
    return probes, untouched


def probe_reference(probe: dict[str, Any], factors: dict[str, Any], w: Any) -> Any:
    """The merged value PEFT defines, in fp32, written from PEFT's definitions, not lora's
    code. A Linear: bf16(W + alpha/r · B @ A), one rounding of the fp32 sum. Expert e of a
    fused (E, in, out) parameter (PEFT's ParamWrapper, which rounds its fp32 delta to the
    parameter's dtype before adding it): bf16(W + bf16(alpha/r · (B_e @ A_e)ᵀ)) with
    A_e = A.view(E, r, in)[e] and B_e = B.view(out, r, E)[:, :, e]."""
    a = factors[f"{probe['module']}.lora_A.weight"].float()
    b = factors[f"{probe['module']}.lora_B.weight"].float()
    scale = LORA_ALPHA / LORA_RANK
    if probe["expert"] is None:
        return (w.float() + scale * (b @ a)).to(w.dtype).float()
    e, experts = probe["expert"], probe["experts"]
    a_e = a.reshape(experts, -1, a.shape[-1])[e]
    b_e = b.reshape(b.shape[0], -1, experts)[:, :, e]
    delta = (scale * (b_e @ a_e)).T.to(w.dtype)
    return (w.float() + delta.float()).to(w.dtype).float()


def check_output(
    contender: str,
    base: Path,
    adapter: Path | None,
    out: Path,
    spec: SizeSpec | oss.OssSpec,
    kind: str | None,
    raw_base: Path | None = None,
) -> dict[str, Any]:
    """Cheap sanity checks so a fast-but-wrong result (e.g. a silent no-op merge) is visible.

    Structure: same tensor names/dtypes/shapes as the base (and same shard file names for cp and
    lora, whose contract is to mirror BASE). Content, for merges: the first and last targeted
    weights (for gpt-oss also the first and last expert of the last layer's expert tensors)
    must equal bf16(W + alpha/r * ΔW) computed in fp32 (within 2 bf16 ulps), and one untouched
    weight must be bit-identical to the base. ``base`` is bf16: for a merge into an MXFP4 base
    it is the bf16 model that base encodes losslessly (``raw_base``: the MXFP4 base, whose
    experts an adapter leaves are copied as they are, blocks and scales).
    """
    import torch

    res: dict[str, Any] = {}
    if not out.is_dir():
        return {"ok": False, "problem": "output folder missing"}
    base_table, out_table = _tensor_table(base), _tensor_table(out)
    if raw_base is not None:
        raw = _tensor_table(raw_base)
        for name in [n for n in base_table if n not in out_table]:
            parts = {f"{name}_blocks", f"{name}_scales"}
            if all(p in raw and out_table.get(p) == raw[p] for p in parts):
                del base_table[name]
                base_table.update({p: raw[p] for p in parts})
    res["tensors_match"] = base_table == out_table
    if not res["tensors_match"]:
        missing = sorted(set(base_table) - set(out_table))[:3]
        extra = sorted(set(out_table) - set(base_table))[:3]
        res["problem"] = f"tensor set differs (e.g. missing {missing}, extra {extra})"
    if contender == "cp" or contender.startswith("lora"):
        names = sorted(p.name for p in base.glob("*.safetensors"))
        res["shard_names_match"] = names == sorted(p.name for p in out.glob("*.safetensors"))
    else:
        res["output_shards"] = len(list(out.glob("*.safetensors")))
    if contender != "cp" and adapter is not None and kind is not None and res["tensors_match"]:
        from safetensors.torch import load_file

        factors = load_file(str(adapter / "adapter_model.safetensors"))
        probes, untouched = check_probes(spec, kind)
        diffs: list[float] = []
        ulps: list[float] = []
        for probe in probes:
            w = _load(base, probe["tensor"], probe["expert"])
            ref = probe_reference(probe, factors, w)
            got = _load(out, probe["tensor"], probe["expert"])
            diff = (got.float() - ref).abs()
            # bf16 keeps 8 significant bits: one ulp of x is 2**(exponent(x) - 8).
            ulp = torch.ldexp(torch.ones_like(ref), torch.frexp(ref).exponent - 8)
            diffs.append(float(diff.max()))
            ulps.append(float((diff / ulp).max()))
            if torch.equal(got, w):
                res["problem"] = f"{probe['tensor']} unchanged: merge was a no-op?"
        res["probes"] = len(probes)
        res["merged_max_abs_diff_vs_fp32_ref"] = max(diffs)
        res["merged_max_ulps_vs_fp32_ref"] = max(ulps)
        res["untouched_bit_identical"] = torch.equal(_load(base, untouched), _load(out, untouched))
        # One rounding of the fp32 sum gives 0 ulps; rounding the delta first may give 1. More
        # than 2 means a different formula (wrong scale, bf16 accumulation, ...).
        if res["merged_max_ulps_vs_fp32_ref"] > 2:
            res.setdefault("problem", "merged values differ from bf16(W + alpha/r * ΔW)")
    res["ok"] = (
        res["tensors_match"]
        and res.get("shard_names_match", True)
        and res.get("untouched_bit_identical", True)
        and "problem" not in res
    )
    return res


# --------------------------------------------------------------------------------------------
# Environment and reporting
# --------------------------------------------------------------------------------------------


def _first_line(path: str, prefix: str) -> str:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def environment(workdir: Path) -> dict[str, Any]:
    """What a reader needs to compare two runs of this bench (and to distrust one).

    Library versions and torch threads come from a helper child, since this process never
    imports torch (see run_helper).
    """
    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": _first_line("/proc/cpuinfo", "model name"),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "ram_total": _first_line("/proc/meminfo", "MemTotal"),
        "workdir_free_gib": round(shutil.disk_usage(workdir).free / GIB, 1),
        "thread_env": {
            k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ
        },
    }
    return env


def library_versions() -> dict[str, Any]:
    """Helper task: versions and torch's default thread count (what every contender gets)."""
    import torch

    out: dict[str, Any] = {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    for mod in ("safetensors", "transformers", "peft", "lora_cli"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as exc:  # noqa: BLE001 - an env report must not crash the bench
            out[mod] = f"unavailable ({type(exc).__name__})"
    return out


def prepare(workdir: Path, size: str, kinds: list[str], schemes: list[str]) -> dict[str, Any]:
    """Helper task: make sure the base checkpoints, their quantized versions and the adapters
    for one size exist: the Llama-shaped model, and the gpt-oss-shaped one when a scheme
    quantizes it (``models``)."""
    out: dict[str, Any] = {"quant_bases": {}, "models": {}}
    for model in ["llama"] + sorted({QUANT_MODEL[q] for q in schemes} - {"llama"}):
        spec = oss.OSS_SIZES[size] if model == oss.MODEL else SIZES[size]
        base, reused, gen_s = ensure_base(workdir, spec)
        made = {
            "base": str(base),
            "reused": reused,
            "generate_s": gen_s,
            "adapters": {k: str(ensure_adapter(workdir, spec, k, base)[0]) for k in kinds},
        }
        for q in schemes:
            if QUANT_MODEL[q] == model:
                out["quant_bases"][q] = str(ensure_quant_base(workdir, spec, base, q))
        if model == "llama":
            out.update(made)
        else:
            out["models"][model] = made
    return out


def internal_task(task: str, payload: str) -> int:
    """Entry point of helper children: run one task, print its JSON result as the last line."""
    p = json.loads(payload)
    if task == "peft":
        return peft_child(p["base"], p["adapter"], p["out"])
    if task == "env":
        result = library_versions()
    elif task == "prepare":
        result = prepare(Path(p["workdir"]), p["size"], p["adapters"], p["quant"])
    elif task == "check":
        adapter = Path(p["adapter"]) if p["adapter"] else None
        spec = oss.OSS_SIZES[p["size"]] if p["model"] == oss.MODEL else SIZES[p["size"]]
        raw = Path(p["raw_base"]) if p.get("raw_base") else None
        result = check_output(
            p["contender"], Path(p["base"]), adapter, Path(p["out"]), spec, p["kind"], raw
        )
    else:
        raise SystemExit(f"unknown internal task {task!r}")
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def helper_cmd(task: str, payload: dict[str, Any]) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--internal", task, json.dumps(payload)]


def run_helper(task: str, payload: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    """Run torch-using work (generation, checks, version probe) in a child process.

    Why: on Linux a child's ru_maxrss starts at its parent's RSS at fork time, so a parent that
    had imported torch (~450 MiB) would floor every contender's wait4 cross-check; and buffers
    from generating GBs of weights would otherwise stay in this process's heap for the whole run.
    Progress goes to our stderr; the result is the last stdout line.
    """
    proc = subprocess.run(
        helper_cmd(task, payload), stdout=subprocess.PIPE, env=env, stdin=subprocess.DEVNULL
    )
    lines = proc.stdout.decode("utf-8", errors="replace").strip().splitlines()
    if proc.returncode != 0 or not lines or not lines[-1].startswith("RESULT "):
        raise RuntimeError(f"helper {task!r} failed (exit {proc.returncode}): {lines[-5:]}")
    return json.loads(lines[-1][len("RESULT ") :])


@dataclass
class Case:
    """All repetitions of one (size, adapter, contender) cell of the table."""

    size: str
    adapter: str  # "-" for cp, which does not depend on the adapter
    contender: str
    base_bytes: int
    runs: list[RunResult] = field(default_factory=list)
    check: dict[str, Any] | None = None
    peft_phases: list[dict[str, float]] = field(default_factory=list)
    base: Path | None = None  # the case's own base (else the size's bf16 Llama base)
    adapter_dir: Path | None = None  # the case's own adapter (else the Llama one of its kind)
    model: str = "llama"  # the synthetic model its base is (a version of)
    bf16_twin: Path | None = None  # the bf16 model an MXFP4 base encodes losslessly

    @property
    def kind(self) -> str:
        """The adapter kind (all-linear, qv) of a merge case."""
        return self.adapter.rpartition(":")[2]

    @property
    def quantized(self) -> str | None:
        """The quantized scheme of its base, if any."""
        scheme, colon, _ = self.adapter.partition(":")
        return scheme if colon and scheme in QUANT_SCHEMES else None

    @property
    def failed(self) -> RunResult | None:
        return next((r for r in self.runs if not r.ok), None)

    def median_s(self) -> float | None:
        ok = [r.wall_s for r in self.runs if r.ok]
        return statistics.median(ok) if ok and not self.failed else None

    def median_of(self, attr: str) -> float | None:
        ok = [getattr(r, attr) for r in self.runs if r.ok]
        return statistics.median(ok) if ok and not self.failed else None

    def cpu_s(self) -> float | None:
        """Median user+sys CPU seconds of the contender (wall time is noisy on a shared box;
        CPU time is what a lever changes)."""
        ok = [r.user_s + r.sys_s for r in self.runs if r.ok]
        return statistics.median(ok) if ok and not self.failed else None

    def peak_rss_mib(self) -> float | None:
        # Max over repetitions: peak memory decides whether a merge fits, so be conservative.
        ok = [r.peak_rss_mib for r in self.runs if r.ok]
        return max(ok) if ok and not self.failed else None

    def summary(self) -> dict[str, Any]:
        med = self.median_s()
        ok_runs = [r.wall_s for r in self.runs if r.ok]
        return {
            "size": self.size,
            "adapter": self.adapter,
            "contender": self.contender,
            "ok": self.failed is None and bool(self.runs),
            "median_s": med,
            "min_s": min(ok_runs) if ok_runs else None,
            "max_s": max(ok_runs) if ok_runs else None,
            "peak_rss_mib": self.peak_rss_mib(),
            "cpu_s": self.cpu_s(),
            "user_s": self.median_of("user_s"),
            "sys_s": self.median_of("sys_s"),
            "cpu_s_per_gib": self.cpu_s() / (self.base_bytes / GIB) if self.cpu_s() else None,
            "minor_faults": self.median_of("minor_faults"),
            "hwm_sum_mib": max((r.hwm_sum_mib for r in self.runs if r.ok), default=None),
            "throughput_gb_s": self.base_bytes / med / 1e9 if med else None,
            "base_bytes": self.base_bytes,
            "check": self.check,
            "peft_phases_median": _median_phases(self.peft_phases),
            "runs": [asdict(r) for r in self.runs],
        }


def _median_phases(phases: list[dict[str, float]]) -> dict[str, float] | None:
    if not phases:
        return None
    return {k: statistics.median(p[k] for p in phases) for k in phases[0]}


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _x(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}x"


def render(cases: list[Case], ratios: list[dict[str, Any]], help_s: dict[str, Any]) -> str:
    """Plain-text table (pastes cleanly into issues and reports) plus ratio lines and failures."""
    head = (
        f"{'size':<6} {'adapter':<18} {'contender':<9} {'median s':>9} {'min..max s':>15} "
        f"{'peak RSS MiB':>12} {'HWM-sum MiB':>11} {'GB/s':>6} {'cpu s':>6} {'usr':>5} "
        f"{'sys':>5} {'cpu-s/GiB':>9} {'minflt':>8}  check"
    )
    lines = [head, "-" * len(head)]
    for c in cases:
        s = c.summary()
        if c.failed:
            lines.append(f"{c.size:<6} {c.adapter:<18} {c.contender:<9} FAILED: {c.failed.error}")
            continue
        rng = f"{_fmt(s['min_s'], '.2f')}..{_fmt(s['max_s'], '.2f')}"
        chk = "-" if c.check is None else ("ok" if c.check.get("ok") else "BAD")
        if c.check and "merged_max_ulps_vs_fp32_ref" in c.check:
            chk += f" ({c.check['merged_max_ulps_vs_fp32_ref']:.0f} ulp)"
        lines.append(
            f"{c.size:<6} {c.adapter:<18} {c.contender:<9} {_fmt(s['median_s'], '9.2f')} "
            f"{rng:>15} {_fmt(s['peak_rss_mib'], '12.0f')} {_fmt(s['hwm_sum_mib'], '11.0f')} "
            f"{_fmt(s['throughput_gb_s'], '6.3f')} {_fmt(s['cpu_s'], '6.2f')} "
            f"{_fmt(s['user_s'], '5.1f')} {_fmt(s['sys_s'], '5.1f')} "
            f"{_fmt(s['cpu_s_per_gib'], '9.2f')} {_fmt(s['minor_faults'], '8.0f')}  {chk}"
        )
    lines.append("")
    lines.append("ratios (median wall time; RSS = polled process-tree peak):")
    for r in ratios:
        if "quantized" in r:  # a merge into a quantized base: issue 19's ratios
            keep = r["lora"] == "lora-keep"
            lines.append(
                f"  {r['size']:<6} {r['adapter']:<18} {'keep' if keep else '-> bf16':<7} "
                f"{_x(r['over_bf16_merge'])} the bf16-base merge "
                f"(cpu {_x(r['cpu_over_bf16_merge'])}, target <= {2.0 if keep else 1.3:.1f}x), "
                f"{_x(r['lora_over_cp'])} cp of the {r['quantized']} base, "
                f"peak RSS {_fmt(r['peak_rss_mib'], '.0f')} MiB (target <= 400)"
            )
            continue
        lines.append(
            f"  {r['size']:<6} {r['adapter']:<18} {r['lora']}/cp {_x(r['lora_over_cp'])}   "
            f"PEFT/lora {_x(r['peft_over_lora'])} time, {_x(r['peft_over_lora_rss'])} peak RSS; "
            f"cpu-s/GiB {r['lora']} {_fmt(r['lora_cpu_s_per_gib'], '.2f')}, "
            f"cp {_fmt(r['cp_cpu_s_per_gib'], '.2f')}"
        )
    if help_s.get("ok"):
        runs = len(help_s["samples"])
        lines.append(f"\n`lora --help`: median {help_s['median_s']:.3f} s over {runs} runs")
    else:
        lines.append(f"\n`lora --help`: FAILED: {help_s.get('error', '')}")
    for c in cases:
        if c.failed:
            lines.append(f"\n--- {c.size} {c.adapter} {c.contender} failed ({c.failed.error}):")
            lines.append(c.failed.stderr_tail or c.failed.stdout_tail or "(no output)")
        if c.check and not c.check.get("ok"):
            lines.append(f"\n--- {c.size} {c.adapter} {c.contender} output check: {c.check}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def checked_output(
    case: Case, base: Path, adapter: Path | None, out: Path, env: dict[str, str]
) -> dict[str, Any]:
    """check_output in a helper child; a crashing check is reported, never fatal. A merge into
    a quantized base changes dtypes and drops scales, so it is checked by `lora validate --base
    --adapter` (every merged tensor recomputed, untouched ones byte-compared); an MXFP4 → bf16
    merge is also checked by check_output against the bf16 model the MXFP4 base encodes."""
    result: dict[str, Any] = {"ok": True}
    raw_base = None
    if case.quantized and adapter is not None:
        lora = Path(sys.executable).parent / "lora"
        cmd = [str(lora), "validate", str(out), "--base", str(base), "--adapter", str(adapter)]
        proc = subprocess.run(cmd + ["--json"], capture_output=True, env=env, check=False)
        ok = proc.returncode == 0
        result = {"ok": ok, "validate_exit": proc.returncode} | (
            {} if ok else {"problem": proc.stdout.decode()[-600:] + proc.stderr.decode()[-600:]}
        )
        if not (case.bf16_twin is not None and case.contender == "lora"):
            return result
        raw_base, base = base, case.bf16_twin
    payload = {
        "contender": case.contender,
        "base": str(base),
        "adapter": str(adapter) if adapter else None,
        "out": str(out),
        "size": case.size,
        "model": case.model,
        "kind": None if case.contender == "cp" else case.kind,
        "raw_base": str(raw_base) if raw_base else None,
    }
    try:
        checked = run_helper("check", payload, env)
    except RuntimeError as exc:
        checked = {"ok": False, "problem": str(exc)}
    return {**result, **checked, "ok": result["ok"] and checked["ok"]}


def time_help(lora: Path, env: dict[str, str], runs: int = 5) -> dict[str, Any]:
    """Startup cost of the CLI (one discarded warm-up, then the median of ``runs``)."""
    samples: list[float] = []
    for i in range(runs + 1):
        t0 = time.perf_counter()
        p = subprocess.run(
            [str(lora), "--help"], capture_output=True, env=env, stdin=subprocess.DEVNULL
        )
        dt = time.perf_counter() - t0
        if p.returncode != 0:
            return {"ok": False, "error": f"exit {p.returncode}: {text_tail(p.stderr, 600)}"}
        if i:
            samples.append(dt)
    return {"ok": True, "median_s": statistics.median(samples), "samples": samples}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--sizes", default="small,large", help="comma list of: quick, small, large, large-4l"
    )
    ap.add_argument("--repeats", type=int, default=3, help="repetitions per case (median shown)")
    ap.add_argument("--adapters", default="all-linear,qv", help="comma list of: all-linear, qv")
    ap.add_argument("--peft-large", action="store_true", help="also run PEFT at the large size")
    ap.add_argument(
        "--quant",
        default="fp8,int4",
        help="comma list of quantized versions of the base to merge into as well (fp8: block "
        "FP8, int4: compressed-tensors pack-quantized, of the Llama-shaped base; mxfp4: the "
        "experts of a gpt-oss-shaped base, whose bf16 merge is timed too as its baseline), each "
        "with cp, lora merge and lora merge --quantize keep; 'none' for none (default: fp8,int4)",
    )
    ap.add_argument(
        "--no-fp8",
        dest="quant",
        action="store_const",
        const="none",
        help="skip the quantized-base cases (same as --quant none)",
    )
    ap.add_argument(
        "--workdir", type=Path, default=REPO_ROOT / "bench-output", help="default: bench-output/"
    )
    ap.add_argument("--json", type=Path, default=None, help="default: WORKDIR/results.json")
    ap.add_argument("--keep", action="store_true", help="keep the last repetition's outputs")
    ap.add_argument("--quick", action="store_true", help="tiny size only (a few MB)")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="the fastest run that still exercises every code path of this script (the test "
        "suite's check): the tiny size, 1 repetition, all-linear only, no PEFT, one --help sample",
    )
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per contender run")
    ap.add_argument(
        "--timed-sync",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="include sync(2) in each timed run, charging write-back to the contender "
        "(default: on, so `cp -r` pays for durability as `lora` does with fsync)",
    )
    ap.add_argument(
        "--cpus",
        default=None,
        help="comma list of core counts, e.g. 1,2: run `lora merge` pinned with taskset to "
        "that many cores (one row each, 'lora@N'); default: the cores this bench may use",
    )
    ap.add_argument(
        "--lora-args",
        default="",
        help="extra options for every `lora merge` run (e.g. '--no-checksums')",
    )
    ap.add_argument(
        "--extract",
        action="store_true",
        help="also time `lora extract BASE TUNED --rank 16`, TUNED = the base merged with the "
        "all-linear adapter (a rank-16 change)",
    )
    ap.add_argument(
        "--extract-only",
        action="store_true",
        help="only the extract comparison (--extract without the merge cases): the base, the "
        "all-linear adapter and TUNED are made as for --extract, then lora extract (and "
        "mergekit with --mergekit) run --repeats times each",
    )
    ap.add_argument(
        "--mergekit",
        type=Path,
        default=None,
        help="with --extract or --extract-only: a mergekit-extract-lora executable to time "
        "beside it (its own venv: mergekit pins its own torch/transformers ranges)",
    )
    ap.add_argument(
        "--mergekit-repeats",
        type=int,
        default=None,
        metavar="N",
        help="with --mergekit: run mergekit only in the first N repetitions (its full SVD takes "
        "minutes at 1.6 GiB and most of an hour at 6 GiB on 2 cores); default: --repeats",
    )
    ap.add_argument(
        "--disk-peak",
        type=float,
        metavar="GIB",
        default=None,
        help="instead: the disk peak of `merge --part I/N --evict --push-to-hub` jobs on a "
        "GIB-sized base in ~100 MB shards served by a local fake Hub (scripts/disk_peak.py)",
    )
    ap.add_argument("--parts", type=int, default=4, help="--disk-peak: N (default 4)")
    ap.add_argument("--internal", nargs=2, metavar=("TASK", "JSON"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick or args.smoke:
        args.sizes = "quick"
    if args.smoke:
        # all-linear: every quantized weight is merged (its validation is the one that once
        # failed); the merges are a few MB
        args.repeats, args.adapters = 1, "all-linear"
    if args.extract_only:  # TUNED is made from the all-linear adapter; no merge case runs
        args.extract, args.adapters, args.quant = True, "all-linear", "none"
    if args.mergekit is not None:
        if not args.extract:
            ap.error("--mergekit needs --extract or --extract-only")
        args.mergekit = args.mergekit.expanduser().resolve()
    if args.mergekit_repeats is not None and not 1 <= args.mergekit_repeats <= args.repeats:
        ap.error("--mergekit-repeats must be between 1 and --repeats")
    args.quant_list = [q.strip() for q in args.quant.split(",") if q.strip() not in ("", "none")]
    for q in args.quant_list:
        if q not in QUANT_SCHEMES:
            ap.error(f"unknown --quant {q!r} (choose from {', '.join(QUANT_SCHEMES)}, none)")
    args.size_list = [s.strip() for s in args.sizes.split(",") if s.strip()]
    args.adapter_list = [a.strip() for a in args.adapters.split(",") if a.strip()]
    for s in args.size_list:
        if s not in SIZES:
            ap.error(f"unknown size {s!r} (choose from {', '.join(SIZES)})")
    for a in args.adapter_list:
        if a not in ADAPTER_TARGETS:
            ap.error(f"unknown adapter {a!r} (choose from {', '.join(ADAPTER_TARGETS)})")
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    allowed = sorted(os.sched_getaffinity(0))
    args.cpu_list = []
    if args.cpus:
        for c in args.cpus.split(","):
            if not c.strip().isdigit() or not 1 <= int(c) <= len(allowed):
                ap.error(f"--cpus {c!r}: between 1 and the {len(allowed)} cores allowed")
            args.cpu_list.append(int(c))
        if not shutil.which("taskset"):
            ap.error("--cpus needs taskset (util-linux)")
    args.allowed_cpus = allowed
    return args


def contender_cmd(
    case: Case, base: Path, adapter: Path | None, out: Path, lora: Path, args: argparse.Namespace
) -> list[str]:
    """The exact command line each contender runs (the PEFT one re-enters this script)."""
    if case.contender == "cp":
        return ["cp", "-r", str(base), str(out)]
    if case.contender.startswith("lora"):
        cmd = [str(lora), "merge", str(base), str(adapter), "-o", str(out), "--quiet"]
        cmd += args.lora_args.split()
        if case.contender == "lora-keep":  # FP8 base, merged weights re-quantized
            cmd += ["--quantize", "keep"]
        if "@" in case.contender:  # lora@N: pinned to the first N allowed cores
            n = int(case.contender.split("@")[1])
            cores = ",".join(str(c) for c in args.allowed_cpus[:n])
            cmd = ["taskset", "-c", cores, *cmd]
        return cmd
    return helper_cmd("peft", {"base": str(base), "adapter": str(adapter), "out": str(out)})


def run_repetitions(
    cases: dict[tuple[str, str], Case],
    base: Path,
    adapters: dict[str, Path],
    workdir: Path,
    lora: Path,
    args: argparse.Namespace,
    child_env: dict[str, str],
    on_run: Any = None,
) -> None:
    """Run every case `--repeats` times, interleaved, filling each Case's runs and check;
    ``on_run()`` after each run (saves what was measured so far)."""
    order = list(cases)
    for rep in range(args.repeats):
        # Rotate the order every repetition so no contender always runs first/after another.
        shift = rep % len(order)
        for key in order[shift:] + order[:shift]:
            case = cases[key]
            if case.failed:
                continue  # a broken contender is reported once, not re-run
            adapter = case.adapter_dir or adapters.get(case.kind)
            case_base = case.base or base
            out = workdir / f"out-{case.size}-{case.adapter.replace(':', '-')}-{case.contender}"
            shutil.rmtree(out, ignore_errors=True)
            os.sync()  # start from no dirty pages left behind by the previous run
            cmd = contender_cmd(case, case_base, adapter, out, lora, args)
            r = run_measured(cmd, args.timeout, child_env, args.timed_sync)
            case.runs.append(r)
            tag = f"  rep {rep + 1}/{args.repeats} {case.adapter:<18} {case.contender:<5}"
            if r.ok:
                print(f"{tag} {r.wall_s:8.2f} s  peak {r.peak_rss_mib:8.0f} MiB", flush=True)
                for line in r.stdout_tail.splitlines():
                    if line.startswith("PEFT_PHASES "):
                        case.peft_phases.append(json.loads(line.split(" ", 1)[1]))
                if case.check is None:
                    case.check = checked_output(case, case_base, adapter, out, child_env)
            else:
                print(f"{tag} FAILED ({r.error}); output tail:", flush=True)
                tail = (r.stderr_tail or r.stdout_tail or "(no output)")[-1200:]
                print("    " + tail.replace("\n", "\n    "), flush=True)
            if not (args.keep and rep == args.repeats - 1):
                shutil.rmtree(out, ignore_errors=True)
            if on_run is not None:
                on_run()


def size_ratios(
    cases: dict[tuple[str, str], Case], size: str, kinds: list[str]
) -> list[dict[str, Any]]:
    """lora/cp and PEFT/lora per adapter; None where a side failed or did not run."""
    cp = cases[("-", "cp")]
    out: list[dict[str, Any]] = []
    gib = cp.base_bytes / GIB
    for (kind, contender), lc in cases.items():
        if kind not in kinds or not contender.startswith("lora"):
            continue
        pc = cases.get((kind, "peft"))
        out.append(
            {
                "size": size,
                "adapter": kind,
                "lora": contender,
                "lora_cpu_s_per_gib": lc.cpu_s() / gib if lc.cpu_s() else None,
                "cp_cpu_s_per_gib": cp.cpu_s() / gib if cp.cpu_s() else None,
                "lora_over_cp": _ratio(lc.median_s(), cp.median_s()),
                "lora_over_cp_rss": _ratio(lc.peak_rss_mib(), cp.peak_rss_mib()),
                "peft_over_lora": _ratio(pc.median_s(), lc.median_s()) if pc else None,
                "peft_over_lora_rss": _ratio(pc.peak_rss_mib(), lc.peak_rss_mib()) if pc else None,
            }
        )
    return out


def quantized_ratios(cases: dict[tuple[str, str], Case], size: str) -> list[dict[str, Any]]:
    """Issue 19's ratios: each merge into a quantized base over the merge of the same adapter
    into the bf16 base it was made from (same run), and over a `cp -r` of the quantized base."""
    out: list[dict[str, Any]] = []
    for (label, contender), case in cases.items():
        scheme, kind = case.quantized, case.kind
        if scheme is None:
            continue
        model = QUANT_MODEL[scheme]
        bf16 = cases.get((kind if model == "llama" else f"{model}:{kind}", "lora"))
        cp = cases.get((scheme, "cp"))
        out.append(
            {
                "size": size,
                "adapter": label,
                "lora": contender,
                "quantized": scheme,
                "bf16_merge": f"{model} bf16",
                "over_bf16_merge": _ratio(case.median_s(), bf16.median_s() if bf16 else None),
                "cpu_over_bf16_merge": _ratio(case.cpu_s(), bf16.cpu_s() if bf16 else None),
                "lora_over_cp": _ratio(case.median_s(), cp.median_s() if cp else None),
                "peak_rss_mib": case.peak_rss_mib(),
            }
        )
    return out


def bench_size(
    size: str,
    args: argparse.Namespace,
    workdir: Path,
    lora: Path,
    child_env: dict[str, str],
    live: LiveResults,
) -> tuple[list[Case], list[dict[str, Any]], dict[str, Any] | None]:
    """Prepare inputs for one size, warm the cache, run all its cases; (cases, ratios, info)."""
    spec = SIZES[size]
    print(f"\n== size {size}: preparing inputs", flush=True)
    # Each base (if not cached yet) plus one output at a time (TUNED too for extract), plus slack.
    specs: list[SizeSpec | oss.OssSpec] = [spec]
    if any(QUANT_MODEL[q] == oss.MODEL for q in args.quant_list):
        specs.append(oss.OSS_SIZES[size])
    need = 256 * MIB
    for one in specs:
        est = sum(math.prod(shape) * 2 for _, shape in model_tensor_shapes(one))
        need += est * (1 if (workdir / f"base-{model_stem(one)}").is_dir() else 2)
    if args.extract and not (workdir / f"tuned-{size}").is_dir():  # TUNED: a full bf16 copy
        need += sum(math.prod(shape) * 2 for _, shape in tensor_shapes(spec))
    free = shutil.disk_usage(workdir).free
    if free < need:
        print(f"  skipped: not enough free disk ({free / GIB:.1f} GiB, need ~{need / GIB:.1f})")
        return [], [], None
    payload = {
        "workdir": str(workdir),
        "size": size,
        "adapters": args.adapter_list,
        "quant": args.quant_list,
    }
    prep = run_helper("prepare", payload, child_env)
    base = Path(prep["base"])
    adapters = {k: Path(v) for k, v in prep["adapters"].items()}
    base_bytes = dir_bytes(base)
    warm_s = warm_cache([base, *adapters.values()])
    info = {
        "spec": asdict(spec),
        "base": str(base),
        "base_bytes": base_bytes,
        "base_gib": base_bytes / GIB,
        "shards": len(list(base.glob("*.safetensors"))),
        "reused_cached_inputs": prep["reused"],
        "generate_s": prep["generate_s"],
        "warm_cat_s": warm_s,
    }
    how = "reused cache" if prep["reused"] else f"generated in {prep['generate_s']:.1f} s"
    print(
        f"  base {base_bytes / GIB:.2f} GiB in {info['shards']} shards ({how}); "
        f"page cache warmed by cat in {warm_s:.1f} s",
        flush=True,
    )
    if args.extract_only:
        live.update(cases=[], size=size, info=info)
        bench_extract.run(
            size, base, adapters["all-linear"], workdir, lora, args, child_env, info, live.save
        )
        return [], [], info
    run_peft = (size != "large" or args.peft_large) and not args.smoke
    cases: dict[tuple[str, str], Case] = {("-", "cp"): Case(size, "-", "cp", base_bytes)}
    for kind in args.adapter_list:
        cases[(kind, "lora")] = Case(size, kind, "lora", base_bytes)
        for n in args.cpu_list:
            cases[(kind, f"lora@{n}")] = Case(size, kind, f"lora@{n}", base_bytes)
        if run_peft:
            cases[(kind, "peft")] = Case(size, kind, "peft", base_bytes)
    for model, made in prep["models"].items():  # another model's bf16 merges (the baseline)
        mbase = Path(made["base"])
        mbytes = dir_bytes(mbase)
        madapters = {k: Path(v) for k, v in made["adapters"].items()}
        warm_cache([mbase, *madapters.values()])
        for kind in args.adapter_list:
            label = f"{model}:{kind}"
            cases[(label, "lora")] = Case(
                size, label, "lora", mbytes, base=mbase, adapter_dir=madapters[kind], model=model
            )
        info[f"{model}_base"] = str(mbase)
        info[f"{model}_base_bytes"] = mbytes
        info[f"{model}_spec"] = asdict(oss.OSS_SIZES[size])
        info[f"{model}_generate_s"] = made["generate_s"]
    for scheme, qpath in prep["quant_bases"].items():  # the same merges, quantized base
        qbase = Path(qpath)
        qbytes = dir_bytes(qbase)
        warm_cache([qbase])
        model = QUANT_MODEL[scheme]
        made = prep["models"].get(model)
        twin = Path(made["base"]) if made else None
        cases[(scheme, "cp")] = Case(size, scheme, "cp", qbytes, base=qbase, model=model)
        for kind in args.adapter_list:
            madapter = Path(made["adapters"][kind]) if made else None
            for contender in ("lora", "lora-keep"):
                label = f"{scheme}:{kind}"
                cases[(label, contender)] = Case(
                    size,
                    label,
                    contender,
                    qbytes,
                    base=qbase,
                    adapter_dir=madapter,
                    model=model,
                    bf16_twin=twin,
                )
        info[f"{scheme}_base_bytes"] = qbytes
    live.update(cases=list(cases.values()), size=size, info=info)
    run_repetitions(cases, base, adapters, workdir, lora, args, child_env, live.save)
    if args.extract and "all-linear" in adapters:
        bench_extract.run(
            size, base, adapters["all-linear"], workdir, lora, args, child_env, info, live.save
        )
    ratios = size_ratios(cases, size, args.adapter_list)
    quant_ratios = quantized_ratios(cases, size)
    return list(cases.values()), ratios + quant_ratios, info


def loadavg() -> str:
    """1/5/15-minute load: on a shared 2-core box, other people's jobs show up in our timings."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def time_torch_import(env: dict[str, str], runs: int = 3) -> float:
    """Median seconds for `python -c 'import torch'`: the start-up floor of any torch-based CLI."""
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch"], env=env, check=False)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def disk_peak_main(workdir: Path, args: argparse.Namespace, json_path: Path) -> int:
    """``--disk-peak GIB``: bench.py's generator makes the base; scripts/disk_peak.py runs it."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import disk_peak

    small = SIZES["small"]
    per_layer = 2 * (2 * small.hidden * small.hidden + 2 * small.hidden * small.hidden // 8
                     + 3 * small.hidden * small.intermediate)  # fmt: skip
    embeddings = 2 * 2 * small.vocab * small.hidden
    layers = max(1, round((args.disk_peak * GIB - embeddings) / per_layer))
    spec = replace(small, name=f"disk{args.disk_peak:g}", layers=layers,
                   max_shard_bytes=100_000_000)  # fmt: skip
    base, _, _ = ensure_base(workdir, spec)
    adapter, _ = ensure_adapter(workdir, spec, "qv", base)
    return disk_peak.main(workdir, spec, args.parts, base, adapter, json_path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.internal:
        return internal_task(*args.internal)

    workdir: Path = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    json_path: Path = (args.json or workdir / "results.json").resolve()
    if args.disk_peak is not None:
        return disk_peak_main(workdir, args, json_path)
    if args.mergekit is not None and not os.access(args.mergekit, os.X_OK):
        raise SystemExit(f"bench.py: --mergekit {args.mergekit}: not an executable")
    lora = Path(sys.executable).parent / "lora"
    child_env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    child_env.setdefault("TOKENIZERS_PARALLELISM", "false")

    env = environment(workdir)
    env.update(run_helper("env", {}, child_env))
    env["loadavg_start"] = loadavg()
    env["torch_import_s"] = None if args.smoke else time_torch_import(child_env)
    print(
        f"bench: {env['cpu_model']}, {env['cpu_affinity']} cores allowed "
        f"({env['cpu_count']} online), RAM {env['ram_total']}, "
        f"torch {env['torch']} ({env['torch_threads']} threads), python {env['python']}, "
        f"load {env['loadavg_start']}"
    )
    print(f"workdir {workdir}")
    help_s = time_help(lora, child_env, 1 if args.smoke else 5)
    print("lora --help: " + (f"{help_s['median_s']:.3f} s" if help_s["ok"] else help_s["error"]))
    if env["torch_import_s"] is not None:
        print(f"python -c 'import torch': {env['torch_import_s']:.2f} s")

    live = LiveResults(json_path, env, args, help_s)
    for size in args.size_list:
        size_cases, size_r, info = bench_size(size, args, workdir, lora, child_env, live)
        live.finish_size(size_cases, size_r, info)
    env["loadavg_end"] = loadavg()
    cases, ratios = live.cases, live.ratios

    notes = [
        "Page cache: NOT dropped (no privileges). Each size's inputs are read once with `cat` "
        "first, so every contender starts from a warm cache; outputs are deleted and sync(2) is "
        "called between runs (outside the timed window).",
        "Wall time ends when the child exits"
        + (
            " and sync(2) returns."
            if args.timed_sync
            else "; dirty pages may still be in flight "
            "(use --timed-sync to charge write-back to the contender)."
        ),
        "Wall time includes interpreter start-up for lora and PEFT (`lora --help` and "
        f"`import torch` = {_fmt(env['torch_import_s'], '.2f')} s are the floors).",
        "Peak RSS = max over repetitions of the polled (~20 ms) sum of VmRSS over the child's "
        "process tree; HWM-sum = sum of per-process kernel VmHWM (upper bound, cross-check); "
        "per-run wait4 ru_maxrss is in the JSON too.",
        "Contender order is rotated every repetition; PEFT runs only at quick/small sizes "
        "unless --peft-large.",
        f"Load average {env['loadavg_start']} at start, {env['loadavg_end']} at end: anything "
        "well above 0 means other work shared the cores and the timings are noisy.",
    ]
    live.notes = notes
    live.save()  # everything measured is on disk before the table is rendered
    if not args.extract_only:
        print("\n" + render(cases, ratios, help_s))
    if args.extract:
        print("\n" + bench_extract.render(live.sizes))
    print("\nnotes:\n  - " + "\n  - ".join(notes))
    print(f"\nwrote {json_path}")
    return 0


class LiveResults:
    """results.json, rewritten after every run (atomically): a crash or Ctrl-C loses nothing
    that was measured."""

    def __init__(
        self, path: Path, env: dict[str, Any], args: argparse.Namespace, help_s: dict[str, Any]
    ) -> None:
        self.path, self.env, self.args, self.help_s = path, env, args, help_s
        self.cases: list[Case] = []
        self.ratios: list[dict[str, Any]] = []
        self.sizes: dict[str, Any] = {}
        self.notes: list[str] = []
        self.current: list[Case] = []  # the size being measured
        self.current_info: tuple[str, dict[str, Any]] | None = None

    def update(self, *, cases: list[Case], size: str, info: dict[str, Any]) -> None:
        self.current, self.current_info = cases, (size, info)

    def finish_size(
        self, cases: list[Case], ratios: list[dict[str, Any]], info: dict[str, Any] | None
    ) -> None:
        self.cases += cases
        self.ratios += ratios
        if info is not None and self.current_info is not None:
            self.sizes[self.current_info[0]] = info
        self.current, self.current_info = [], None
        self.save()

    def save(self) -> None:
        sizes = dict(self.sizes)
        if self.current_info is not None:
            sizes[self.current_info[0]] = self.current_info[1]
        a = self.args
        result = {
            "schema": 1,
            "complete": not self.current and "loadavg_end" in self.env,
            "env": self.env,
            "settings": {
                "sizes": a.size_list,
                "adapters": a.adapter_list,
                "quantized_bases": a.quant_list,
                "repeats": a.repeats,
                "peft_large": a.peft_large,
                "timed_sync": a.timed_sync,
                "extract": a.extract,
                "extract_only": a.extract_only,
                "mergekit": str(a.mergekit) if a.mergekit else None,
                "mergekit_repeats": a.mergekit_repeats,
                "lora_rank": LORA_RANK,
                "lora_alpha": LORA_ALPHA,
                "poll_interval_s": POLL_INTERVAL_S,
            },
            "notes": self.notes,
            "lora_help": self.help_s,
            "sizes": sizes,
            "cases": [c.summary() for c in self.cases + self.current],
            "ratios": self.ratios,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(self.path)


if __name__ == "__main__":
    sys.exit(main())
