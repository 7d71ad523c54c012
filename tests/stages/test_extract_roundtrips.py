"""``lora extract`` round trips beyond plain LoRA: a DoRA-merged TUNED (the change is not
rank r: the error must be reported honestly) and changed modules nested inside layers shipped
as ``modules_to_save`` that PEFT wraps exactly."""

from __future__ import annotations

import json

import torch

from tests.conftest import dtype_kw, load_owned, peft_adapter, save_model, tiny_model
from tests.stages.test_extract import (
    _extract,
    _optimal_error,
    _peft_merge,
    _tuned_from,
    merge_equals_peft,
)

PREFIX = "base_model.model."


def test_dora_merged_error_is_eckart_young_and_falls_with_rank(tmp_path, run_cli):
    """DoRA rescales every column after adding BA, so TUNED − BASE is full rank: at the
    adapter's rank the reported error is the Eckart–Young optimum of that change (from an
    independent SVD), not zero, and the measured error of the factors written; a higher rank
    lowers it."""
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama", torch.float32)
    base = save_model(model, tmp_path / "base")
    targets = ["q_proj", "v_proj", "down_proj"]
    peft_adapter(model, tmp_path / "a", target_modules=targets, use_dora=True)
    tuned_state = _peft_merge(base, tmp_path / "a", dtype=torch.float32)
    tuned_model = AutoModelForCausalLM.from_pretrained(base, **dtype_kw(torch.float32))
    tuned_model.load_state_dict(tuned_state)
    tuned = save_model(tuned_model, tmp_path / "tuned")
    start = model.state_dict()
    errors = {}
    for r in (4, 8):
        out = tmp_path / f"r{r}"
        doc = _extract(run_cli, base, tuned, out, "--rank", str(r), "--exact", "--dtype", "fp32")
        written = load_owned(out / "adapter_model.safetensors")
        for m in doc["modules"]:
            name = m["module"] + ".weight"
            delta = tuned_state[name].double() - start[name].double()
            b = written[f"{PREFIX}{m['module']}.lora_B.weight"].double()
            a = written[f"{PREFIX}{m['module']}.lora_A.weight"].double()
            measured = float((delta - b @ a).norm() / delta.norm())
            assert abs(m["error"] - _optimal_error(delta, r)) <= 1e-4, (r, name)
            assert abs(m["error"] - measured) <= 1e-4, (r, name)
            errors[r, m["module"]] = m["error"]
    modules = {m for _, m in errors}
    assert len(modules) == 2 * len(targets)
    assert all(errors[4, m] > 1e-3 for m in modules)  # DoRA's change is not rank 4
    assert all(errors[8, m] < errors[4, m] for m in modules)


def test_nested_modules_to_save_wrapped_exactly_and_logits_match(tmp_path, run_cli):
    """Changed norms inside layers (``model.layers.0.input_layernorm``: a leaf name every
    layer has) ship under their full paths: PEFT wraps those two modules and no other, and
    its logits equal TUNED's up to the bf16 rounding of the low-rank part."""
    from peft import PeftModel
    from peft.utils import ModulesToSaveWrapper
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    base = save_model(model, tmp_path / "base")
    g = torch.Generator().manual_seed(3)
    deltas = {
        "model.layers.0.input_layernorm.weight": 0.1 * torch.randn(32, generator=g),
        "model.layers.1.post_attention_layernorm.weight": 0.1 * torch.randn(32, generator=g),
    }
    for name, p in model.named_parameters():
        if name.endswith(("q_proj.weight", "v_proj.weight")):
            deltas[name] = (
                0.05
                * torch.randn(p.shape[0], 2, generator=g)
                @ torch.randn(2, p.shape[1], generator=g)
            )
    tuned = _tuned_from(model, tmp_path / "tuned", deltas)
    out = tmp_path / "out"
    doc = _extract(run_cli, base, tuned, out, "--rank", "2")
    nested = ["model.layers.0.input_layernorm", "model.layers.1.post_attention_layernorm"]
    assert doc["modules_to_save"] == nested
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == nested
    ids = torch.arange(16).reshape(2, 8)
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(tuned, **dtype_kw(torch.float32))(ids).logits
        base_model = AutoModelForCausalLM.from_pretrained(base, **dtype_kw(torch.float32))
        plain = base_model(ids).logits
        peft_model = PeftModel.from_pretrained(base_model, out)
        got = peft_model(ids).logits
    wrapped = [n for n, m in peft_model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    assert [n.removeprefix(PREFIX) for n in wrapped] == nested
    assert (got - want).abs().max() < 0.02 * (plain - want).abs().max()
    ours = merge_equals_peft(run_cli, base, out, tmp_path / "merged")
    for name in nested:  # shipped whole: TUNED's bytes
        tuned_norm = load_owned(tuned / "model.safetensors")[name + ".weight"]
        assert torch.equal(ours[name + ".weight"], tuned_norm)
