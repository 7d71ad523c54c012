"""``lora merge CKPT`` of full PeftModel state dicts, saved the four ways people save them,
against PEFT's merge_and_unload on the same model and the unmerged model's logits."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from ckpt_workers.common import batch, param_groups, peft_model, tiny_llama
from conftest import ulp_diff
from safetensors.torch import load_file


def _trained(tokens: bool = False):
    """(base model saved before training, trained PeftModel): 2 AdamW steps."""
    model = tiny_llama(tied=tokens)
    base = copy.deepcopy(model)
    pm = peft_model(model, tokens=tokens)
    opt = torch.optim.AdamW(param_groups(pm), lr=1e-2)
    for step in range(2):
        loss = pm(input_ids=batch(0, step), labels=batch(0, step)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return base, pm.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft-state")
    out = {}
    for tokens in (False, True):
        base, pm = _trained(tokens)
        base.save_pretrained(root / f"base-{tokens}")
        expected = copy.deepcopy(pm).merge_and_unload().state_dict()
        out[tokens] = (root / f"base-{tokens}", pm, {k: v.clone() for k, v in expected.items()})
    return out


def _save(kind: str, pm, folder: Path) -> Path:
    folder.mkdir()
    pm.peft_config["default"].save_pretrained(str(folder))
    if kind == "torch.save":
        torch.save(pm.state_dict(), folder / "pytorch_model.bin")
    elif kind == "save_file":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in pm.state_dict().items()},
                  folder / "model.safetensors")  # fmt: skip
    elif kind == "save_model":
        from safetensors.torch import save_model

        save_model(pm, str(folder / "model.safetensors"))
    else:  # accelerate's save_model, sharded with an index
        from accelerate import Accelerator

        Accelerator(cpu=True).save_model(pm, str(folder), max_shard_size="40KB")
        assert (folder / "model.safetensors.index.json").is_file()
    return folder


def _check(out: Path, pm, expected: dict) -> None:
    from transformers import AutoModelForCausalLM

    got = {}
    for f in sorted(out.glob("*.safetensors")):
        got.update(load_file(f))
    assert set(got) in (set(expected), set(expected) - {"lm_head.weight"})
    for name, value in got.items():
        assert ulp_diff(value, expected[name].to(value.dtype)) <= 1, name
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = batch(7, 0)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, pm(input_ids=ids).logits)


@pytest.mark.parametrize("kind", ["torch.save", "save_file", "accelerate"])
def test_peft_state_dict_merges_like_peft(trained, tmp_path, run_cli, kind):
    base, pm, expected = trained[False]
    ckpt = _save(kind, pm, tmp_path / "ckpt")
    out = tmp_path / "merged"
    code, _, err = run_cli("merge", ckpt, "-o", out, "--base", base, "-q")
    assert code == 0, err
    _check(out, pm, expected)
    # the unfrozen embedding's trained values are in the output
    embed = "model.embed_tokens.weight"
    trained_embed = load_file(out / "model.safetensors")[embed]
    assert not torch.equal(trained_embed, load_file(base / "model.safetensors")[embed])


def test_save_model_aliases_and_trainable_tokens_on_a_tied_model(trained, tmp_path, run_cli):
    """save_model keeps one name per storage (lm_head.token_adapter.*) and records the others
    in __metadata__; the merge replaces the token rows once and keeps the model tied."""
    import json

    base, pm, expected = trained[True]
    ckpt = _save("save_model", pm, tmp_path / "ckpt")
    out = tmp_path / "merged"
    code, _, err = run_cli("merge", ckpt, "-o", out, "--base", base, "-q")
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    _check(out, pm, expected)


def test_torch_save_without_base_writes_checkpoint_dtype(trained, tmp_path, run_cli):
    _, pm, expected = trained[False]
    ckpt = _save("torch.save", pm, tmp_path / "ckpt")
    out = tmp_path / "merged"
    code, _, err = run_cli("merge", ckpt / "pytorch_model.bin", "-o", out, "-q")
    assert code == 0, err
    got = load_file(out / "model.safetensors")
    assert all(v.dtype == torch.float32 for v in got.values())
    assert all(ulp_diff(v, expected[k]) <= 1 for k, v in got.items())


def test_state_dict_without_adapter_config_is_refused(trained, tmp_path, run_cli):
    _, pm, _ = trained[False]
    ckpt = _save("torch.save", pm, tmp_path / "ckpt")
    (ckpt / "adapter_config.json").unlink()
    code, _, err = run_cli("merge", ckpt, "-o", tmp_path / "out")
    assert code == 2 and "lora_alpha cannot be recovered" in err
    assert not (tmp_path / "out").exists()


def test_an_adapter_alone_is_not_a_training_checkpoint(trained, tmp_path, run_cli):
    _, pm, _ = trained[False]
    pm.save_pretrained(tmp_path / "adapter")
    code, _, err = run_cli("merge", tmp_path / "adapter", "-o", tmp_path / "out")
    assert code == 2 and "lora merge BASE ADAPTER" in err
