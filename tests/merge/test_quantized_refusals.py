"""Quantized formats lora cannot decode yet: a merge touching them stops with one line
naming the format and the tensor; ``inspect`` reports every quantized family."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import peft_adapter, save_model, tiny_model
from safetensors.torch import load_file, save_file

Q_PROJ = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("llama")
    model = tiny_model("llama")
    save_model(model, root / "base")
    peft_adapter(model, root / "adapter", target_modules=["q_proj"])
    return root / "base", root / "adapter"


def _rewrite(base: Path, out: Path, replace: dict[str, torch.Tensor], drop: str, qc=None) -> Path:
    out.mkdir()
    state = load_file(base / "model.safetensors")
    state.pop(drop)
    state.update(replace)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((base / "config.json").read_text())
    if qc:
        config["quantization_config"] = qc
    (out / "config.json").write_text(json.dumps(config))
    return out


CASES = {
    "awq": (
        {
            f"{Q_PROJ}.qweight": torch.zeros(32, 4, dtype=torch.int32),
            f"{Q_PROJ}.qzeros": torch.zeros(1, 4, dtype=torch.int32),
            f"{Q_PROJ}.scales": torch.ones(1, 32, dtype=torch.float16),
        },
        {"quant_method": "awq", "bits": 4},
        "AWQ/GPTQ qweight",
        f"{Q_PROJ}.qweight",
    ),
    "nvfp4": (
        {
            f"{Q_PROJ}.weight_packed": torch.zeros(32, 16, dtype=torch.uint8),
            f"{Q_PROJ}.weight_scale": torch.ones(32, 2, dtype=torch.float8_e4m3fn),
            f"{Q_PROJ}.weight_global_scale": torch.ones(1),
        },
        {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized"},
        "NVFP4",
        Q_PROJ,
    ),
    "bitsandbytes": (
        {
            f"{Q_PROJ}.weight": torch.zeros(512, 1, dtype=torch.uint8),
            f"{Q_PROJ}.weight.absmax": torch.ones(16),
            f"{Q_PROJ}.weight.quant_map": torch.ones(16),
        },
        {"quant_method": "bitsandbytes", "load_in_4bit": True},
        "bitsandbytes",
        f"{Q_PROJ}.weight.absmax",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_unsupported_formats_are_refused_in_one_line(llama, tmp_path, run_cli, case) -> None:
    base, adapter = llama
    tensors, qc, fmt, key = CASES[case]
    drop = f"{Q_PROJ}.weight"
    quantized = _rewrite(base, tmp_path / case, tensors, drop, qc)
    if case == "bitsandbytes":
        quantized = _rewrite(base, tmp_path / "bnb", tensors, drop, qc)  # weight kept as u8
    code, stdout, stderr = run_cli("merge", quantized, adapter, "-o", tmp_path / "out")
    assert code != 0
    assert not (tmp_path / "out").exists()
    assert "Traceback" not in stderr
    message = stderr.strip().splitlines()[0]
    assert fmt in message and key in message, message

    code, stdout, _ = run_cli("inspect", quantized, "--json")
    assert code == 0
    families = json.loads(stdout)["checkpoint"]["quantization"]["families"]
    assert any(f["scheme"].startswith(fmt.split()[0]) for f in families), families


def test_inspect_reports_quantized_families(tmp_path, run_cli) -> None:
    from quant_helpers import fp8_block_base, mxfp4_base, tiny_deepseek, tiny_gpt_oss

    fp8 = fp8_block_base(tiny_deepseek(tmp_path / "ds"), tmp_path / "fp8")
    code, stdout, _ = run_cli("inspect", fp8, "--json")
    assert code == 0
    q = json.loads(stdout)["checkpoint"]["quantization"]
    assert q["method"] == "fp8"
    by_family = {f["family"]: f for f in q["families"]}
    kv = by_family["model.layers.N.self_attn.kv_a_proj_with_mqa.weight"]
    assert kv["scheme"] == "fp8-block" and kv["tensors"] == 2 and kv["block"] == [128, 128]
    assert by_family["model.layers.N.mlp.experts.N.down_proj.weight"]["tensors"] == 4
    assert "copied byte for byte" in kv["merge"]
    code, stdout, _ = run_cli("inspect", fp8)
    assert code == 0 and "fp8-block" in stdout

    oss = mxfp4_base(tiny_gpt_oss(tmp_path / "oss"), tmp_path / "mxfp4")
    code, stdout, _ = run_cli("inspect", oss, "--json")
    families = json.loads(stdout)["checkpoint"]["quantization"]["families"]
    assert {f["family"] for f in families} == {
        "model.layers.N.mlp.experts.gate_up_proj",
        "model.layers.N.mlp.experts.down_proj",
    }


def test_dtype_option_is_refused_for_a_quantized_base(llama, tmp_path, run_cli) -> None:
    from lora_cli.io.quant import fp8_block_quant

    base, adapter = llama
    weight = load_file(base / "model.safetensors")[f"{Q_PROJ}.weight"]
    q, s = fp8_block_quant(weight, (128, 128), torch.float32, pow2=False)
    qc = {"quant_method": "fp8", "weight_block_size": [128, 128], "fmt": "e4m3"}
    replace = {f"{Q_PROJ}.weight": q, f"{Q_PROJ}.weight_scale_inv": s}
    fp8 = _rewrite(base, tmp_path / "fp8", replace, f"{Q_PROJ}.weight", qc)
    code, _, stderr = run_cli("merge", fp8, adapter, "-o", tmp_path / "out", "--dtype", "fp16")
    assert code == 2 and "--dtype" in stderr and not (tmp_path / "out").exists()
    code, _, stderr = run_cli("merge", fp8, adapter, "-o", tmp_path / "out", "--quantize", "x")
    assert code == 2 and "--quantize" in stderr
    code, stdout, _ = run_cli("merge", fp8, adapter, "-o", tmp_path / "out", "--json")
    assert code == 0
    # the only quantized weight was merged: the config no longer claims FP8
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
