"""Checkpoints in the layout they were saved with, adapters named as transformers 5 runs the
model: ``lora merge`` pairs them through transformers' own rename rules, bit-identical to
PEFT's merge_and_unload on the model transformers loads from that checkpoint.

For each architecture of transformers' conversion table that PEFT can target
(tests/merge/renames_models.py): a tiny model saved by ``save_pretrained`` (which writes
the legacy names), a PEFT adapter made on the model loaded back (runtime names, non-zero
lora_B), our merge, and PEFT's merge (pinned to lora's thread count, tests/peft_oracle.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from renames_models import ARCHES, TARGET_PARAMETERS
from safetensors import safe_open

from lora_cli.names import CONVERTED, pair_names
from lora_cli.stages.merge import merge

pytest.importorskip("transformers.conversion_mapping", reason="transformers < 5: no rules")
pytestmark = pytest.mark.filterwarnings("ignore")


def _model_class(kind: str):
    import transformers

    cls = getattr(transformers, ARCHES[kind][0], None)
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {ARCHES[kind][0]}")
    return cls


def _names(folder: Path) -> set[str]:
    names: set[str] = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(f, "pt") as handle:
            names |= set(handle.keys())
    return names


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory):
    """kind → (base folder, adapter folder, PEFT's merged state dict), made once per module."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoConfig
    from transformers.utils import logging

    logging.set_verbosity_error()
    cache: dict[str, tuple[Path, Path, dict[str, torch.Tensor]]] = {}

    def build(kind: str):
        if kind in cache:
            return cache[kind]
        cls = _model_class(kind)
        _, config, targets = ARCHES[kind]
        root = tmp_path_factory.mktemp(kind)
        torch.manual_seed(0)
        cls(AutoConfig.for_model(**config)).float().save_pretrained(root / "base")
        loaded = cls.from_pretrained(root / "base", dtype=torch.float32)
        lora = LoraConfig(
            r=4,
            lora_alpha=8,
            init_lora_weights=False,  # non-zero lora_B: a merge that does nothing fails
            target_modules=targets,
            target_parameters=TARGET_PARAMETERS.get(kind),
        )
        torch.manual_seed(1234)
        get_peft_model(loaded, lora).save_pretrained(root / "adapter")
        base = cls.from_pretrained(root / "base", dtype=torch.float32)
        theirs = PeftModel.from_pretrained(base, root / "adapter").merge_and_unload()
        cache[kind] = (
            root / "base",
            root / "adapter",
            {k: v.detach().clone() for k, v in theirs.state_dict().items()},
        )
        return cache[kind]

    return build


@pytest.mark.parametrize("kind", sorted(ARCHES))
def test_legacy_checkpoint_merges_like_peft(kind: str, built, tmp_path: Path) -> None:
    base, adapter, theirs = built(kind)
    result = merge(base, adapter, tmp_path / "out", device="cpu")
    assert _names(tmp_path / "out") == _names(base), "the checkpoint's own names are kept"
    ours = _model_class(kind).from_pretrained(tmp_path / "out", dtype=torch.float32).state_dict()
    assert ours.keys() == theirs.keys()
    different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not different, f"{len(different)} tensors differ from PEFT, e.g. {different[:3]}"
    assert result.counts["merge"] >= 2, "the merge changed nothing: the case would prove nothing"
    modules = {
        k.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        for k in _names(adapter)
        if k.endswith(".lora_A.weight")
    }
    linear_targets = {m for m in modules if m in theirs}  # (not MoE target_parameters)
    if linear_targets - _names(base):  # renamed on disk: the report says which rule did it
        assert result.renames and result.rule.startswith("transformers "), result.rule
        entry = result.renames[0]
        assert entry["checkpoint"] in _names(base) and entry["rules"], entry
    else:
        assert result.rule == "identity" and not result.renames


def test_runtime_checkpoint_with_legacy_adapter(built, tmp_path: Path) -> None:
    """The other direction: a checkpoint re-saved with runtime names, an adapter trained on
    transformers 4 (legacy module paths, ``vision_model.`` and ``language_model.model.``)."""
    from peft import PeftModel
    from safetensors.torch import load_file, save_file

    base, adapter, theirs = built("mllama")
    runtime_base = tmp_path / "base"
    runtime_base.mkdir()
    (runtime_base / "config.json").write_text((base / "config.json").read_text())
    model = _model_class("mllama").from_pretrained(base, dtype=torch.float32)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, runtime_base / "model.safetensors", {"format": "pt"})

    legacy = tmp_path / "legacy-adapter"
    legacy.mkdir()
    (legacy / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    tensors = load_file(adapter / "adapter_model.safetensors")
    text, vision = "base_model.model.model.language_model.", "base_model.model.model.vision_model."
    renamed = {
        k.replace(text, "base_model.model.language_model.model.").replace(
            vision, "base_model.model.vision_model."
        ): v
        for k, v in tensors.items()
    }
    assert renamed.keys() != tensors.keys()
    save_file(renamed, legacy / "adapter_model.safetensors", {"format": "pt"})

    result = merge(runtime_base, legacy, tmp_path / "out", device="cpu")
    assert result.rule.startswith("transformers ")
    ours = load_file(tmp_path / "out" / "model.safetensors")
    assert ours.keys() == state.keys()
    expected = PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()
    assert all(torch.equal(ours[k], expected[k]) for k in ours)


def test_json_reports_which_rule_mapped_what(built, run_cli) -> None:
    base, adapter, _ = built("mllama")
    code, out, _ = run_cli("merge", base, adapter, "--dry-run", "--json")
    assert code == 0, out
    doc = json.loads(out)
    by_target = {r["adapter"]: r for r in doc["renames"]}
    vision = next(r for t, r in by_target.items() if t.startswith("model.vision_model."))
    assert vision["checkpoint"] == vision["adapter"].removeprefix("model.")
    assert any("vision_model" in rule for rule in vision["rules"]), vision
    text = next(r for t, r in by_target.items() if t.startswith("model.language_model."))
    assert text["checkpoint"].startswith("language_model.model."), text
    assert doc["rule"].startswith("transformers ")


def test_validate_pairs_through_the_same_rules(built, run_cli) -> None:
    base, adapter, _ = built("vit")
    code, out, err = run_cli("validate", adapter, "--base", base, "--json")
    doc = json.loads(out)
    assert code == 0 and doc["checks"].get("adapter-base") == "ok", (out, err)
    assert any("transformers" in note and "paired" in note for note in doc["notes"]), doc["notes"]


def test_shape_changing_conversion_is_refused_in_one_line(built, tmp_path: Path) -> None:
    """A target that exists at runtime only through a converter (mixtral's per-expert
    ``w1``/``w3`` fused into ``experts.gate_up_proj``) has no exact place as a plain rename."""
    base, _, _ = built("mixtral")
    config = json.loads((base / "config.json").read_text())
    target = "model.layers.0.mlp.experts.down_proj"
    resolution = pair_names([target], _names(base), config)
    assert resolution.problems and CONVERTED in resolution.problems[0], resolution.problems
    assert "\n" not in resolution.problems[0]


def test_unknown_model_keeps_lora_prefix_rules() -> None:
    """No config (or a model transformers does not know): lora's own prefix rules."""
    names = {"transformer.h.0.attn.c_attn.weight"}
    resolution = pair_names(["h.0.attn.c_attn.weight"], names, None)
    assert not resolution.problems and resolution.source == "lora"
    assert resolution.mapping == {"h.0.attn.c_attn.weight": "transformer.h.0.attn.c_attn.weight"}
    assert resolution.renamed[0].rules == ["^ → transformer."]


def test_config_claiming_huge_layer_counts_gets_no_rules_not_a_hang(built) -> None:
    """A stranger's config.json claiming 10⁹ layers must not make lora build 10⁹ modules on
    the meta device: more layers than the checkpoint has tensors means no transformers rules."""
    base, _, _ = built("vit")
    config = json.loads((base / "config.json").read_text())
    config["num_hidden_layers"] = 10**9
    names = _names(base)
    target = "vit.layers.0.attention.q_proj.weight"
    resolution = pair_names([target], names, config)
    assert resolution.source != "transformers" and resolution.problems
    config["num_hidden_layers"] = 1
    assert pair_names([target], names, config).source == "transformers"  # the control
    for hostile in (["pipeline"], [{"x": 1}], "ViTModel"):  # only a model class is built
        config["architectures"] = hostile
        assert pair_names([target], names, config).source != "transformers"
