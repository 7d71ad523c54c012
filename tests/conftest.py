"""Fixture factories: tiny transformers models and PEFT adapters built at test time.

Adapters always have non-zero B (``init_lora_weights=False``) so a merge that
does nothing, or the wrong thing, fails the comparison with PEFT.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# `OMP_NUM_THREADS=4 bash scripts/test.sh` must really run torch at 4 threads: torch caps its
# default at the cores it may use (2 here), which would make a 4-thread run a 2-thread one
# and hide the kernels a 4-core CI runner picks.
if os.environ.get("OMP_NUM_THREADS", "").isdigit():
    torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))

from peft_oracle import pin_peft_merges_on_import  # noqa: E402

# Every PEFT merge in the suite runs at the thread count lora's merge math runs at: torch's
# kernels (and so the oracle's bits) change with it (tests/peft_oracle.py).
pin_peft_merges_on_import()

TINY = {
    "llama": dict(
        model_type="llama",
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    ),
    "llama-tied": dict(
        model_type="llama",
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    ),
    "qwen2": dict(
        model_type="qwen2",
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    ),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=64),
}


def load_owned(path: Path) -> dict[str, torch.Tensor]:
    """safetensors' load_file, copied out of the file: before safetensors 0.8 the tensors map
    the file, so a test that rewrites it afterwards would read truncated pages (SIGBUS)."""
    from safetensors.torch import load_file

    return {k: v.clone() for k, v in load_file(path).items()}


def dtype_kw(dtype: torch.dtype) -> dict:
    """The dtype argument of from_pretrained/from_config: ``dtype`` since transformers 4.56,
    ``torch_dtype`` before (scripts/test-oldest.sh runs the oldest declared transformers)."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": dtype}


def require_fused_experts(model) -> None:
    """Skip unless the installed transformers holds this MoE's experts as fused parameters
    (``…experts.gate_up_proj``, transformers v5): before that there is nothing for a
    ``target_parameters`` LoRA to target."""
    if not any(n.endswith("experts.gate_up_proj") for n, _ in model.named_parameters()):
        import transformers

        pytest.skip(
            f"transformers {transformers.__version__} keeps these MoE experts as separate "
            "modules: no fused parameter to target (fused from v5)"
        )


def tiny_model(kind: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {**TINY[kind], **overrides}
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, **dtype_kw(dtype))
    with torch.no_grad():  # biases start at zero; make them count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval()


def save_model(model, path: Path, *, safe: bool = True, max_shard_size: str | None = None) -> Path:
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    if safe:
        model.save_pretrained(path, **kwargs)
    else:  # transformers v5 cannot write .bin any more; torch.save is what old tools did
        path.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path / "pytorch_model.bin")
        model.config.save_pretrained(path)
    return path


def peft_adapter(model, path: Path, *, safe: bool = True, perturb_magnitude: bool = True, **lora):
    """Wrap a deep copy of ``model`` with PEFT (non-zero B), save it, return the PeftModel."""
    from peft import LoraConfig, get_peft_model

    lora.setdefault("init_lora_weights", False)
    lora.setdefault("r", 4)
    lora.setdefault("lora_alpha", 8)
    torch.manual_seed(1234)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(**lora))
    if perturb_magnitude:
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_magnitude_vector" in name:
                    p.mul_(1 + 0.1 * torch.rand_like(p))
    peft_model.save_pretrained(path, safe_serialization=safe)
    return peft_model.eval()


def peft_merged_state(base_dir: Path, adapter_dir: Path, dtype=torch.bfloat16) -> dict:
    """What PEFT itself produces: from_pretrained + merge_and_unload (the oracle)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, **dtype_kw(dtype))
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def ulp_diff(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units of last place between two float tensors of one dtype."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    if a.numel() == 0:
        return 0
    int_type = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    ai = a.contiguous().view(int_type).to(torch.int64)
    bi = b.contiguous().view(int_type).to(torch.int64)
    # map sign-magnitude to a monotonic integer line
    bits = a.element_size() * 8
    ai = torch.where(ai < 0, -(ai & ((1 << (bits - 1)) - 1)), ai)
    bi = torch.where(bi < 0, -(bi & ((1 << (bits - 1)) - 1)), bi)
    return int((ai - bi).abs().max())


@pytest.fixture
def run_cli():
    """Run the Typer app in-process; returns (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from lora_cli.cli import app

    runner = CliRunner()

    def run(*args: str):
        result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
        return result.exit_code, result.stdout, result.stderr

    return run


FAST_IO = ("preadv", "pread", "pwrite", "copy_file_range")


@pytest.fixture
def no_fast_io(monkeypatch):
    """A platform without os.preadv/pread/pwrite/copy_file_range (Windows has none of them):
    ``lora_cli.io.sysio`` chooses its implementations at import, so it is re-imported."""
    import importlib

    from lora_cli.io import sysio

    for name in FAST_IO:
        monkeypatch.delattr(os, name, raising=False)
    importlib.reload(sysio)
    assert sysio.fast_paths() == {k: f.__name__ for k, f in sysio.FALLBACKS.items()}
    yield sysio
    monkeypatch.undo()
    importlib.reload(sysio)


# --- training checkpoints (DeepSpeed runs are slow: once per session) --------------------
DS_VARIANTS_2 = [
    {"name": "zero2", "stage": 2},
    {"name": "zero3", "stage": 3},
    {"name": "zero3-bf16-trainable-only", "stage": 3, "bf16": True, "exclude_frozen": True},
    {"name": "bf16-optimizer", "stage": 1, "bf16": True, "bf16_optimizer": True},
]
DS_VARIANTS_3 = [
    {"name": "zero1", "stage": 1},
    {"name": "zero3-subgroups", "stage": 3, "sub_group_size": 1000},
    {"name": "plain-zero2", "stage": 2, "plain": True},
    {"name": "zero3-tied-tokens", "stage": 3, "tokens": True},
]


@pytest.fixture(scope="session")
def deepspeed_2ranks(tmp_path_factory) -> Path:
    """ZeRO checkpoints of the tiny LoRA Llama at 2 ranks, plus ``base/`` (fp32)."""
    from ckpt_workers import deepspeed_checkpoints

    return deepspeed_checkpoints(tmp_path_factory.mktemp("ds2"), 2, DS_VARIANTS_2)


@pytest.fixture(scope="session")
def deepspeed_3ranks(tmp_path_factory) -> Path:
    from ckpt_workers import deepspeed_checkpoints

    return deepspeed_checkpoints(tmp_path_factory.mktemp("ds3"), 3, DS_VARIANTS_3)


@pytest.fixture(scope="session")
def fsdp_3ranks(tmp_path_factory) -> Path:
    """FSDP2 (3 ranks) DCP checkpoint of the tiny LoRA Llama: ``ckpt/`` and ``base/``."""
    from ckpt_workers import fsdp_checkpoint

    return fsdp_checkpoint(tmp_path_factory.mktemp("fsdp3"), 3)


def peft_oracle(base_dir: Path, config_dir: Path, state: dict, tied: bool = False):
    """(PeftModel holding ``state`` over the fp32 base, its merge_and_unload state dict)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    pm = get_peft_model(base, LoraConfig.from_pretrained(str(config_dir)))
    missing = pm.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    assert not missing.unexpected_keys, missing.unexpected_keys
    unmerged = copy.deepcopy(pm).eval()
    merged = pm.merge_and_unload()
    return unmerged, {k: v.detach().clone() for k, v in merged.state_dict().items()}
