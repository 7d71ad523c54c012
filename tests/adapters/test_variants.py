"""LoRA variants are named from the config (and the tensors) before any fit check."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lora_cli.adapters.variants import classify, state_part
from lora_cli.errors import MergeError
from lora_cli.stages.merge import merge

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.mark.parametrize(
    ("config", "name", "mergeable"),
    [
        ({"peft_type": "LORA"}, "LoRA", True),
        ({"peft_type": "LORA", "use_dora": True}, "DoRA", True),
        ({"peft_type": "LORA", "velora_config": {"num_groups": 2}}, "VeLoRA", True),
        ({"peft_type": "LORA", "monteclora_config": {"num_samples": 2}}, "MonteCLoRA", True),
        ({"peft_type": "LORA", "use_bdlora": {"nblocks": 2}}, "BD-LoRA", True),
        ({"peft_type": "LORA", "use_bdlora": {"nblocks": 0}}, "BD-LoRA", False),
        ({"peft_type": "LORA", "init_lora_weights": "mica"}, "MiCA", True),
        ({"peft_type": "LORA", "kasa_config": {}}, "LoRA", True),  # empty dict: not set
        ({"peft_type": "LORA", "kasa_config": {"x": 1}}, "KaSA", False),
        ({"peft_type": "LORA", "alora_invocation_tokens": [2]}, "aLoRA", False),
        ({"peft_type": "LORA", "arrow_config": {"top_k": 2}}, "Arrow", False),
        ({"peft_type": "LORA", "init_lora_weights": "pissa_niter_4"}, "PISSA", False),
        ({"peft_type": "LOHA"}, "LOHA", False),
    ],
)
def test_classify_from_config(config, name, mergeable):
    v = classify(config)
    assert (v.name, v.mergeable) == (name, mergeable)
    assert (v.refusal is None) == mergeable


def test_classify_from_tensors_when_the_config_dropped_the_field():
    """A newer writer's field is dropped by an older reader: the tensors still tell."""
    assert classify({}, ["m.lin0.lora_velora_embed"]).name == "VeLoRA"
    assert classify({}, ["m.lin0.lora_monteclora_sampler.std_prior"]).name == "MonteCLoRA"
    assert classify({}, ["m.lin0.lora_diag"]).name == "KaSA"
    assert state_part("lin0.lora_velora_embed") == "VeLoRA"
    assert state_part("lin0.lora_A.weight") is None


def test_bdlora_block_factor_by_module_name():
    v = classify({"use_bdlora": {"nblocks": 2, "target_modules_bd_a": ["q_proj"]}})
    assert v.round_delta and v.block_factor("layers.0.q_proj") == "A"
    assert v.block_factor("layers.0.v_proj") is None


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.lin1 = nn.Linear(20, 2)


def _saved(tmp_path: Path, **lora) -> tuple[Path, Path]:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = MLP()
    (tmp_path / "base").mkdir()
    save_file(model.state_dict(), tmp_path / "base" / "model.safetensors")
    cfg = LoraConfig(target_modules=["lin0"], init_lora_weights=False, **lora)
    get_peft_model(copy.deepcopy(model), cfg).save_pretrained(tmp_path / "adapter")
    return tmp_path / "base", tmp_path / "adapter"


def test_inspect_names_the_variant_and_its_state_tensors(tmp_path: Path, run_cli) -> None:
    from peft.tuners.lora.config import VeloraConfig

    _, adapter = _saved(tmp_path, velora_config=VeloraConfig(num_groups=2, init_type="random"))
    code, out, err = run_cli("inspect", adapter, "--json")
    assert code == 0, err
    a = json.loads(out)["adapter"]
    assert (a["variant"], a["mergeable"], a["refusal"]) == ("VeLoRA", True, None)
    assert a["variant_state_tensors"] == ["base_model.model.lin0.lora_velora_embed"]
    assert a["replacements"] == []  # not mistaken for a full tensor of the base
    code, out, _ = run_cli("inspect", adapter)
    assert code == 0 and "VeLoRA" in out


def test_kasa_is_refused_by_name_not_blamed_on_the_base(tmp_path: Path, run_cli) -> None:
    from peft.tuners.lora.config import KasaConfig

    base, adapter = _saved(tmp_path, kasa_config=KasaConfig(), r=4)
    code, out, _ = run_cli("inspect", adapter, "--json")
    a = json.loads(out)["adapter"]
    assert code == 0 and a["variant"] == "KaSA" and not a["mergeable"]
    assert "SVD" in a["refusal"]
    with pytest.raises(MergeError, match="KaSA adapter: PEFT replaces the base weight"):
        merge(base, adapter, tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()


def test_convert_keeps_variant_state_and_merge_ignores_it(tmp_path: Path, run_cli) -> None:
    """VeLoRA's projection embedding is training state PEFT loads back: convert keeps it."""
    from peft.tuners.lora.config import VeloraConfig
    from safetensors.torch import load_file

    base, adapter = _saved(tmp_path, velora_config=VeloraConfig(num_groups=2, init_type="random"))
    code, _, err = run_cli("convert", adapter, "-o", tmp_path / "converted")
    assert code == 0, err
    kept = load_file(tmp_path / "converted" / "adapter_model.safetensors")
    assert "base_model.model.lin0.lora_velora_embed" in kept
    result = merge(base, tmp_path / "converted", tmp_path / "out", device="cpu")
    assert result.counts["merge"] == 1 and result.counts["replace"] == 0


class MHA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2)


@pytest.mark.parametrize(("version", "merges"), [("0.21.2", True), ("0.22.0", False)])
def test_mha_merges_as_peft_0_21_or_refuses_a_newer_writer(tmp_path: Path, version, merges):
    """PEFT <= 0.21.2 adds the MHA out_proj delta twice (merge and forward alike); an adapter
    from a newer PEFT may have been trained with it once, so it is refused, not guessed."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = MHA()
    (tmp_path / "base").mkdir()
    save_file(model.state_dict(), tmp_path / "base" / "model.safetensors")
    cfg = LoraConfig(target_modules=["mha"], init_lora_weights=False, r=2)
    get_peft_model(copy.deepcopy(model), cfg).save_pretrained(tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "peft_version": version}))
    if merges:
        result = merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", device="cpu")
        assert result.counts["merge"] == 2
        assert any("added twice" in w for w in result.warnings)
    else:
        with pytest.raises(MergeError, match="MultiheadAttention.*PEFT 0.22.0"):
            merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", device="cpu")
