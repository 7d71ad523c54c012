"""The merged folder's README.md is a model card the Hub's own parser accepts."""

from __future__ import annotations

import hashlib
import json

import pytest
from conftest import peft_adapter, save_model, tiny_model
from huggingface_hub import ModelCard
from huggingface_hub.repocard import metadata_load

from lora_cli import __version__
from lora_cli.io.layout import MANIFEST_NAME, read_manifest


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("card")
    model = tiny_model("llama")
    base = save_model(model, root / "base")
    (base / "README.md").write_text("---\nlicense: mit\n---\n# THE BASE MODEL'S OWN CARD\n")
    adapter = root / "adapter"
    peft_adapter(model, adapter, target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "org/tiny-llama"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    return base, adapter


@pytest.fixture(scope="module")
def merged(inputs, tmp_path_factory):
    from typer.testing import CliRunner

    from lora_cli.cli import app

    base, adapter = inputs
    out = tmp_path_factory.mktemp("out") / "merged"
    args = ["merge", str(base), str(adapter), "-o", str(out), "--dtype", "fp16", "-q"]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    return out


def test_card_metadata_parses_with_huggingface_hub(merged):
    card = ModelCard.load(merged / "README.md")
    data = card.data.to_dict()
    # a local base: base_model is the Hub id the adapter says it was trained on
    assert data["base_model"] == "org/tiny-llama"
    assert data["base_model_relation"] == "finetune"
    assert data["library_name"] == "transformers"
    assert "lora" in data["tags"]
    assert metadata_load(merged / "README.md") == data


def test_card_says_what_was_merged(merged, inputs):
    base, adapter = inputs
    text = (merged / "README.md").read_text()
    config_hash = hashlib.sha256((adapter / "adapter_config.json").read_bytes()).hexdigest()
    assert config_hash in text
    assert f"`{adapter}`" in text and f"`{base}`" in text
    assert "| r / lora_alpha | 4 / 8 |" in text
    assert "q_proj" in text and "v_proj" in text
    assert f"| lora version | {__version__} |" in text
    assert f"`lora merge {base} {adapter} -o OUTPUT --dtype fp16`" in text
    assert MANIFEST_NAME in text
    assert "THE BASE MODEL'S OWN CARD" not in text


def test_card_is_in_the_checksums(merged):
    digests = read_manifest(merged)
    assert digests["README.md"] == hashlib.sha256((merged / "README.md").read_bytes()).hexdigest()


def test_card_date_honours_source_date_epoch(inputs, tmp_path, run_cli, monkeypatch):
    base, adapter = inputs
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    code, _, err = run_cli("merge", base, adapter, "-o", tmp_path / "out", "-q")
    assert code == 0, err
    assert "| date | 2023-11-14 |" in (tmp_path / "out" / "README.md").read_text()


def test_a_hub_base_is_the_base_model(tmp_path):
    from lora_cli.merge.card import MergedAdapter, model_card

    config = tmp_path / "adapter_config.json"
    config.write_text(json.dumps({"peft_type": "LORA", "r": 16, "lora_alpha": 32}))
    text = model_card(
        base_ref="meta-llama/Llama-3.1-8B@main",
        base_hub_id="meta-llama/Llama-3.1-8B",
        adapters=[MergedAdapter("my-org/my-adapter", config, json.loads(config.read_text()))],
        command=["lora", "merge", "meta-llama/Llama-3.1-8B@main", "my-org/my-adapter"],
        checksums_name=MANIFEST_NAME,
    )
    path = tmp_path / "README.md"
    path.write_text(text)
    data = ModelCard.load(path).data
    assert data.base_model == "meta-llama/Llama-3.1-8B"
    assert data.base_model_relation == "finetune"


def test_unknown_base_writes_no_base_model(tmp_path):
    from lora_cli.merge.card import MergedAdapter, model_card

    config = tmp_path / "adapter_config.json"
    config.write_text(json.dumps({"peft_type": "LORA", "r": 2, "target_modules": "q|v"}))
    text = model_card(
        base_ref="/data/models/mine",
        base_hub_id=None,
        adapters=[MergedAdapter("adapter", config, json.loads(config.read_text()))],
        command=["lora", "merge", "/data/models/mine", "adapter"],
        checksums_name=MANIFEST_NAME,
    )
    path = tmp_path / "README.md"
    path.write_text(text)
    data = ModelCard.load(path).data.to_dict()
    assert "base_model" not in data and "base_model_relation" not in data
    assert data["library_name"] == "transformers"
    assert r"`q\|v`" in text  # a | inside a table cell is escaped


def test_hub_cache_snapshot_gives_the_base_model_id(tmp_path):
    from lora_cli.merge.inputs import MergeInputs, base_hub_id

    snap = tmp_path / "models--org--name" / "snapshots" / ("a" * 40)
    inputs = MergeInputs(snap, tmp_path / "adapter", str(snap), False)
    assert base_hub_id(inputs, [{"base_model_name_or_path": "other/model"}]) == "org/name"
    named = MergeInputs(snap, tmp_path / "adapter", "org/name@v1", False)
    assert base_hub_id(named, []) == "org/name"
    local = MergeInputs(tmp_path, tmp_path / "adapter", str(tmp_path), False)
    assert base_hub_id(local, [{"base_model_name_or_path": "/train/base"}]) is None
