"""config.json semantics come from transformers' own config classes, not from our guesses."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import save_model, tiny_model
from transformers import AutoConfig, PretrainedConfig

from lora_cli.sources.model_config import tie_word_embeddings, transformers_config


def _transformers_says(model_type: str) -> bool:
    """The oracle: the default of the installed transformers' config class for that type."""
    return bool(getattr(AutoConfig.for_model(model_type), "tie_word_embeddings", False))


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral", "gemma", "gpt2"])
def test_absent_key_takes_the_model_types_default(model_type):
    expected = _transformers_says(model_type)
    assert tie_word_embeddings({"model_type": model_type}) is expected


def test_defaults_differ_between_model_types():
    # the reason not to guess: one fixed default is wrong for one of these
    assert tie_word_embeddings({"model_type": "llama"}) is False
    assert tie_word_embeddings({"model_type": "gemma"}) is True


@pytest.mark.parametrize("value", [True, False])
def test_the_written_value_wins(value):
    assert tie_word_embeddings({"model_type": "llama", "tie_word_embeddings": value}) is value
    assert tie_word_embeddings({"model_type": "gemma", "tie_word_embeddings": value}) is value


def test_no_config_means_no_answer():
    assert tie_word_embeddings(None) is None


def test_unknown_model_type_uses_the_base_config_class():
    assert transformers_config({"model_type": "not-a-model-xyz"}) is not None
    base_default = bool(getattr(PretrainedConfig(), "tie_word_embeddings", False))
    assert tie_word_embeddings({"model_type": "not-a-model-xyz"}) is base_default
    written = {"model_type": "not-a-model-xyz", "tie_word_embeddings": not base_default}
    assert tie_word_embeddings(written) is (not base_default)


@pytest.mark.parametrize("value", [True, False])
def test_unknown_composite_model(value):
    """A model type the installed transformers does not know: what the file's text part
    states decides. (transformers 4.x's base config would answer True at the top level
    whatever text_config says; v5's has no such default.)"""
    config = {"model_type": "not-a-vlm-xyz", "text_config": {"tie_word_embeddings": value}}
    assert tie_word_embeddings(config) is value


def test_config_transformers_rejects_falls_back_to_the_file(monkeypatch):
    import lora_cli.sources.model_config as mc

    monkeypatch.setattr(mc, "transformers_config", lambda config: None)
    assert tie_word_embeddings({"model_type": "llama"}) is False
    assert tie_word_embeddings({"model_type": "llama", "tie_word_embeddings": True}) is True


# --- what it changes for the commands -----------------------------------------------------------


def _untied_llama_without_the_key(path):
    """A real untied Llama whose config.json omits tie_word_embeddings (transformers: False)."""
    model = tiny_model("llama", dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)  # differs from the input embedding
    save_model(model, path)
    config = json.loads((path / "config.json").read_text())
    config.pop("tie_word_embeddings", None)
    config.get("text_config", {}).pop("tie_word_embeddings", None)
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_validate_trusts_transformers_default_for_llama(tmp_path, run_cli):
    base = _untied_llama_without_the_key(tmp_path / "llama")
    code, out, err = run_cli("validate", base, "--json")
    report = json.loads(out)
    assert not [f for f in report["findings"] if f.get("check") == "config"], report
    assert code == 0, err


def test_inspect_reports_the_effective_value(tmp_path, run_cli):
    base = _untied_llama_without_the_key(tmp_path / "llama")
    code, out, _ = run_cli("inspect", base, "--json")
    assert code == 0
    assert json.loads(out)["checkpoint"]["tie_word_embeddings"] is False
