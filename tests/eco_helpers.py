"""Factories for adapters of other ecosystems (mlx-lm, GGUF LoRA), built with their real
producers at test time. Fixtures here are imported by the tests that use them.
mlx-lm adapters come from mlx-lm's own ``linear_to_lora_layers`` on the tiny base loaded
by ``mlx_lm.load``; ``mlx_lm.fuse`` is the merge oracle. GGUF LoRAs come from llama.cpp's
``convert_lora_to_gguf.py`` (see ``llama_cpp_scripts``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from conftest import save_model, tiny_model

LLAMA_CPP_PYTHON = "0.3.36"
CACHE = Path.home() / ".cache" / "lora-tests"


def save_tokenizer(path: Path, vocab_size: int = 64) -> None:
    """A word-level tokenizer over ``t0 … tN``: what mlx_lm.load needs beside the weights."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="t0", eos_token="t1", bos_token="t2"
    )
    fast.save_pretrained(path)


def make_base(
    path: Path, kind: str = "llama", dtype=torch.bfloat16, extra_config=None, **overrides
) -> Path:
    """A tiny HF checkpoint with a tokenizer; ``extra_config`` adds config.json keys that
    transformers v5 no longer writes but published (v4) checkpoints have and mlx reads."""
    save_model(tiny_model(kind, dtype=dtype, **overrides), path)
    if extra_config:
        cfg = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**cfg, **extra_config}, indent=2))
    save_tokenizer(path, overrides.get("vocab_size", 64))
    return path


@pytest.fixture(scope="session")
def llama_base(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("llama-base"))


@pytest.fixture(scope="session")
def llama_base_fp32(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("llama-base-fp32"), dtype=torch.float32)


def make_mlx_adapter(
    base: Path,
    out: Path,
    *,
    fine_tune_type: str = "lora",
    num_layers: int = -1,
    rank: int = 4,
    scale: float = 2.5,
    keys: list[str] | None = None,
    old_config: bool = False,
    seed: int = 0,
) -> Path:
    """Wrap the base with mlx-lm's own LoRA layers, give lora_b (and DoRA m) non-zero
    values, and save the trainable leaves and the config the way ``mlx_lm.lora`` does."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    mx.random.seed(seed)  # lora_a's initial values, drawn by mlx-lm's LoRA layers
    model, _ = load_model(Path(base))
    model.freeze()
    params: dict = {"rank": rank, "dropout": 0.0, "scale": scale}
    if old_config:  # mlx-lm 0.19: alpha is written but ignored
        params["alpha"] = 16
    if keys is not None:
        params["keys"] = keys
    if fine_tune_type == "full":
        for layer in model.layers[-max(num_layers, 0) :]:
            layer.unfreeze()
    else:
        linear_to_lora_layers(model, num_layers, params, use_dora=fine_tune_type == "dora")
    mx.random.seed(seed)
    trainable = dict(tree_flatten(model.trainable_parameters()))
    updates = []
    for name, value in trainable.items():
        noise = mx.random.normal(value.shape).astype(value.dtype)
        if name.endswith("lora_b"):
            updates.append((name, noise * 0.05))
        elif name.endswith(".m"):
            updates.append((name, value * (1 + 0.05 * mx.abs(noise))))
        elif fine_tune_type == "full":
            updates.append((name, value + noise * 0.01))
    model.update(tree_unflatten(updates))
    out.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.trainable_parameters()))
    mx.save_safetensors(str(out / "adapters.safetensors"), weights)
    config = {
        "model": str(base),
        "num_layers": num_layers,
        "lora_parameters": params,
        "adapter_path": str(out),
        "batch_size": 1,
        "iters": 10,
    }
    if not old_config:
        config["fine_tune_type"] = fine_tune_type
    elif fine_tune_type == "dora":
        config["use_dora"] = True
    (out / "adapter_config.json").write_text(json.dumps(dict(sorted(config.items())), indent=4))
    return out


def mlx_fuse(base: Path, adapter: Path, out: Path) -> dict[str, torch.Tensor]:
    """``mlx_lm fuse --dequantize``: the oracle, returned as torch tensors by name."""
    from safetensors.torch import load_file

    subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_lm",
            "fuse",
            "--model",
            str(base),
            "--adapter-path",
            str(adapter),
            "--save-path",
            str(out),
            "--dequantize",
        ],
        check=True,
        capture_output=True,
    )
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def within_ulps(got: torch.Tensor, ref: torch.Tensor, base: torch.Tensor, n: int = 1) -> bool:
    """``got`` within ``n`` ulps of ``ref``, an ulp taken at the larger of ``|ref|`` and
    the delta ``|ref - base|`` and the base.

    mlx-lm rounds the delta to the base dtype before adding it (two roundings) where we
    round once, so where the sum cancels towards zero the two differ by an ulp of the
    delta, not of the (tiny) result.
    """
    assert got.dtype == ref.dtype and got.shape == ref.shape
    r = ref.float()
    size = torch.maximum(torch.maximum(r.abs(), base.float().abs()), (r - base.float()).abs())
    size = size.to(ref.dtype)
    ulp = (torch.nextafter(size, torch.full_like(size, float("inf"))) - size).float()
    return bool(((got.float() - r).abs() <= n * ulp).all())


def load_folder(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


@pytest.fixture(scope="session")
def llama_cpp_scripts() -> Path:
    """llama.cpp's converters with their gguf-py, from the llama-cpp-python sdist on PyPI.

    Downloaded once with pip into ``~/.cache/lora-tests`` and extracted there (never
    into the repository); skipped only when PyPI cannot be reached.
    """
    root = CACHE / f"llama.cpp-{LLAMA_CPP_PYTHON}"
    script = root / "convert_lora_to_gguf.py"
    if script.is_file() and (root / "conversion").is_dir() and (root / "gguf-py").is_dir():
        return root
    sdist_dir = CACHE / "sdist"
    sdists = sorted(sdist_dir.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"))
    if not sdists:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"llama-cpp-python=={LLAMA_CPP_PYTHON}",
                "-d",
                str(sdist_dir),
            ],
            capture_output=True,
            text=True,
        )
        sdists = sorted(sdist_dir.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"))
        if not sdists:
            pytest.skip(
                f"llama-cpp-python {LLAMA_CPP_PYTHON} sdist could not be downloaded from PyPI "
                f"(pip: {done.stderr.strip().splitlines()[-1:]})"
            )
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
    wanted = ("convert_lora_to_gguf.py", "convert_hf_to_gguf.py", "conversion/", "gguf-py/")
    tmp = root.with_name(root.name + ".partial")
    with tarfile.open(sdists[0]) as tar:
        members = []
        for m in tar.getmembers():
            if m.name.startswith(prefix) and m.name[len(prefix) :].startswith(wanted):
                m.name = m.name[len(prefix) :]
                members.append(m)
        tar.extractall(tmp, members=members, filter="data")
    if root.exists():
        import shutil

        shutil.rmtree(root)
    tmp.rename(root)
    return root


def llama_cpp_convert_lora(scripts: Path, adapter: Path, base: Path, out: Path) -> Path:
    """Run llama.cpp's ``convert_lora_to_gguf.py`` (its own gguf-py first on the path)."""
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(scripts / "gguf-py"), str(scripts)])
    env["NO_LOCAL_GGUF"] = ""
    done = subprocess.run(
        [
            sys.executable,
            str(scripts / "convert_lora_to_gguf.py"),
            "--base",
            str(base),
            "--outfile",
            str(out),
            str(adapter),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out
