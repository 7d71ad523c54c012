# ruff: noqa: F401, F811  (pytest fixtures are imported from eco_helpers)
"""GGUF LoRA out and in, against llama.cpp's own ``convert_lora_to_gguf.py``."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import peft_adapter, peft_merged_state
from eco_helpers import (
    llama_base,
    llama_cpp_convert_lora,
    llama_cpp_scripts,
    load_folder,
    make_base,
    make_mlx_adapter,
    within_ulps,
)

gguf = pytest.importorskip("gguf")
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def read_gguf(path) -> tuple[dict, dict]:
    import numpy as np

    reader = gguf.GGUFReader(path)
    kv = {
        k: reader.get_field(k).contents()
        for k in ("general.architecture", "general.type", "adapter.type", "adapter.lora.alpha")
    }
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    return kv, tensors


@pytest.fixture(scope="module")
def qwen2_base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("qwen2-base"), "qwen2")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_equal_to_llama_cpp_converter(
    arch,
    llama_base,
    qwen2_base,
    llama_cpp_scripts,
    tmp_path,
    run_cli,
):
    from transformers import AutoModelForCausalLM

    base = llama_base if arch == "llama" else qwen2_base
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    peft_adapter(model, tmp_path / "peft", target_modules=ALL + ["embed_tokens", "lm_head"])
    ref = llama_cpp_convert_lora(llama_cpp_scripts, tmp_path / "peft", base, tmp_path / "ref.gguf")
    code, out, err = run_cli(
        "convert",
        tmp_path / "peft",
        "--to",
        "gguf",
        "--base",
        base,
        "-o",
        tmp_path / "ours.gguf",
        "--json",
    )
    assert code == 0, err
    assert json.loads(out)["to"] == "gguf"
    ref_kv, ref_t = read_gguf(ref)
    our_kv, our_t = read_gguf(tmp_path / "ours.gguf")
    assert our_kv == ref_kv
    assert sorted(our_t) == sorted(ref_t) and len(ref_t) == 2 * (2 * 7 + 2)
    for name, value in ref_t.items():
        assert our_t[name].dtype == value.dtype and (our_t[name] == value).all(), name


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_llama_cpp_gguf_merges_like_peft(
    arch,
    llama_base,
    qwen2_base,
    llama_cpp_scripts,
    tmp_path,
    run_cli,
):
    """PEFT adapter → llama.cpp's converter → ``lora merge`` equals merging it directly."""
    from transformers import AutoModelForCausalLM

    base = llama_base if arch == "llama" else qwen2_base
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    peft_adapter(model, tmp_path / "peft", target_modules=ALL + ["embed_tokens"])
    gg = llama_cpp_convert_lora(llama_cpp_scripts, tmp_path / "peft", base, tmp_path / "a.gguf")
    assert run_cli("merge", base, gg, "-o", tmp_path / "m1", "-q")[0] == 0
    assert run_cli("merge", base, tmp_path / "peft", "-o", tmp_path / "m2", "-q")[0] == 0
    via_gguf, direct = load_folder(tmp_path / "m1"), load_folder(tmp_path / "m2")
    assert via_gguf.keys() == direct.keys()
    for name in direct:
        assert torch.equal(via_gguf[name], direct[name]), name
    code, out, err = run_cli("inspect", gg, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["format"] == "gguf" and doc["adapter"]["format"] == "gguf"
    code, out, err = run_cli("validate", gg, "--base", base)
    assert code == 0, out + err
    code, out, _ = run_cli("validate", tmp_path / "m1", "--base", base, "--adapter", gg)
    assert code == 0, out


@pytest.mark.parametrize(
    "lora",
    [
        dict(use_rslora=True, r=8, lora_alpha=4),
        dict(alpha_pattern={"v_proj": 3.0, "down_proj": 20.0}, rank_pattern={"o_proj": 2}),
    ],
    ids=["rslora", "patterns"],
)
def test_exact_where_the_script_is_not(llama_base, tmp_path, run_cli, lora):
    """rsLoRA and alpha_pattern folded into lora_b: PEFT → GGUF → merge = PEFT's merge."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_base, dtype=torch.bfloat16)
    peft_adapter(model, tmp_path / "peft", target_modules=ALL, **lora)
    code, _, err = run_cli(
        "convert",
        tmp_path / "peft",
        "--to",
        "gguf",
        "--base",
        llama_base,
        "-o",
        tmp_path / "a.gguf",
    )
    assert code == 0, err
    assert run_cli("merge", llama_base, tmp_path / "a.gguf", "-o", tmp_path / "m", "-q")[0] == 0
    ours = load_folder(tmp_path / "m")
    oracle = peft_merged_state(llama_base, tmp_path / "peft")
    base = load_folder(llama_base)
    for name, value in ours.items():
        assert within_ulps(value, oracle[name], base[name], 1), name


def test_round_trip_gguf_to_peft(llama_base, tmp_path, run_cli):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_base, dtype=torch.bfloat16)
    peft_adapter(
        model, tmp_path / "peft", target_modules=["q_proj", "k_proj"], layers_to_transform=[1]
    )
    args = ("--base", llama_base)
    assert (
        run_cli("convert", tmp_path / "peft", "--to", "gguf", *args, "-o", tmp_path / "a.gguf")[0]
        == 0
    )
    code, _, err = run_cli("convert", tmp_path / "a.gguf", "--to", "peft", "-o", tmp_path / "x")
    assert code == 2 and "--base" in err  # Llama Q/K rows need the head counts
    assert run_cli("convert", tmp_path / "a.gguf", *args, "-o", tmp_path / "back")[0] == 0
    a, b = load_folder(tmp_path / "peft"), load_folder(tmp_path / "back")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k].float(), b[k].float()), k


def test_mlx_to_gguf(llama_base, tmp_path, run_cli):
    pytest.importorskip("mlx_lm")
    adapter = make_mlx_adapter(llama_base, tmp_path / "mlx", keys=["self_attn.q_proj"])
    args = ("--base", llama_base)
    assert run_cli("convert", adapter, "--to", "gguf", *args, "-o", tmp_path / "a.gguf")[0] == 0
    assert run_cli("merge", llama_base, tmp_path / "a.gguf", "-o", tmp_path / "m1", "-q")[0] == 0
    assert run_cli("merge", llama_base, adapter, "-o", tmp_path / "m2", "-q")[0] == 0
    m1, m2, base = (
        load_folder(tmp_path / "m1"),
        load_folder(tmp_path / "m2"),
        load_folder(llama_base),
    )
    for k in m1:
        assert within_ulps(m1[k], m2[k], base[k], 1), k


def test_refusals(llama_base, tmp_path, run_cli):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_base, dtype=torch.bfloat16)
    cases = {
        "m2s": dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
        "dora": dict(target_modules=["q_proj"], use_dora=True),
    }
    for name, lora in cases.items():
        peft_adapter(model, tmp_path / name, **lora)
        out = tmp_path / f"{name}.gguf"
        code, _, err = run_cli(
            "convert", tmp_path / name, "--to", "gguf", "--base", llama_base, "-o", out
        )
        assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) <= 2, err
        assert not out.exists() and not list(tmp_path.glob(".*gguf*"))
    assert "llama.cpp" in err or "DoRA" in err
    tied = make_base(tmp_path / "tied", "llama-tied")
    model = AutoModelForCausalLM.from_pretrained(tied, dtype=torch.bfloat16)
    peft_adapter(model, tmp_path / "head", target_modules=["q_proj", "lm_head"])
    code, _, err = run_cli(
        "convert", tmp_path / "head", "--to", "gguf", "--base", tied, "-o", tmp_path / "h.gguf"
    )
    assert code == 2 and "ties it to the embedding" in err


def test_unsupported_architecture_and_missing_extra(tmp_path, run_cli, monkeypatch):
    from conftest import save_model, tiny_model

    model = tiny_model("gpt2")
    save_model(model, tmp_path / "base")
    peft_adapter(model, tmp_path / "peft", target_modules=["c_attn"])
    args = ("convert", tmp_path / "peft", "--to", "gguf", "--base", tmp_path / "base")
    code, _, err = run_cli(*args, "-o", tmp_path / "a.gguf")
    assert code == 2 and "GPT2LMHeadModel" in err and "LlamaForCausalLM" in err
    monkeypatch.setitem(__import__("sys").modules, "gguf", None)  # as if not installed
    code, _, err = run_cli(*args, "-o", tmp_path / "b.gguf")
    assert code == 2 and "lora-cli[gguf]" in err
    assert not list(tmp_path.glob("*.gguf"))
