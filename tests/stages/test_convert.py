"""`lora convert`: pickled adapters and checkpoints → verified, deduplicated safetensors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import dtype_kw, peft_adapter, save_model, tiny_model
from safetensors import safe_open
from safetensors.torch import load_file

from lora_cli.errors import FormatError, UsageError
from lora_cli.stages.convert import convert

IDS = torch.tensor([[1, 5, 9, 33, 2, 17, 60, 3]])
CONVERT_KEYS = {
    "schema",
    "input",
    "output",
    "kind",
    "files",
    "tensors",
    "bytes",
    "seconds",
    "dropped",
    "aliases",
    "renamed_keys",
    "notes",
    "verified",
}
TARGETS = ["q_proj", "v_proj"]


def _hashes(folder: Path) -> dict[str, str]:
    root = folder if folder.is_dir() else folder.parent
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _load(folder: Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, **dtype_kw(dtype)).eval()


def _all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", torch.float32)


@pytest.fixture(scope="module")
def adapters(llama, tmp_path_factory):
    """The same PEFT adapter saved twice: PEFT's own safetensors and a .bin."""
    root = tmp_path_factory.mktemp("adapters")
    peft_model = peft_adapter(llama, root / "safe", target_modules=TARGETS)
    peft_adapter(llama, root / "bin", safe=False, target_modules=TARGETS)
    return root, peft_model


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# --- adapters -------------------------------------------------------------------------------


def test_adapter_bin_becomes_peft_safetensors_beside_it(adapters, tmp_path):
    root, _ = adapters
    folder = _copy(root / "bin", tmp_path / "bin")
    before = _hashes(folder)
    result = convert(folder / "adapter_model.bin", None)
    out = folder / "adapter_model.safetensors"
    assert result.kind == "adapter" and result.output == out and result.verified
    assert result.dropped == [] and result.aliases == {} and result.renamed == 0
    # PEFT's own safetensors save of the same adapter, byte for byte
    assert out.read_bytes() == (root / "safe" / "adapter_model.safetensors").read_bytes()
    ours, peft_own = load_file(out), load_file(root / "safe" / "adapter_model.safetensors")
    assert list(ours) == list(peft_own)
    assert all(torch.equal(ours[k], peft_own[k]) for k in ours)
    assert all(k.startswith("base_model.model.model.layers.") for k in ours)
    assert all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in ours)
    # the input is untouched; only the new file appeared
    after = _hashes(folder)
    assert {k: v for k, v in after.items() if k != out.name} == before
    assert result.tensors == len(ours) == 8
    assert result.bytes == sum(t.numel() * t.element_size() for t in ours.values())


def test_converted_adapter_loads_in_peft_with_the_same_outputs(adapters, llama, tmp_path):
    from peft import PeftModel

    root, peft_model = adapters
    folder = _copy(root / "bin", tmp_path / "bin")
    convert(folder, None)
    (folder / "adapter_model.bin").unlink()  # make sure the safetensors is what loads
    import copy

    loaded = PeftModel.from_pretrained(copy.deepcopy(llama), folder).eval()
    assert torch.equal(_logits(loaded), _logits(peft_model))


def test_cli_json_exit_codes_and_no_overwrite(adapters, tmp_path, run_cli):
    root, _ = adapters
    folder = _copy(root / "bin", tmp_path / "bin")
    code, out, err = run_cli("convert", folder, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert set(doc) == CONVERT_KEYS
    assert doc["schema"] == "lora-convert/1" and doc["kind"] == "adapter"
    assert doc["files"] == ["adapter_model.safetensors"] and doc["verified"] is True
    assert doc["output"] == str(folder / "adapter_model.safetensors")
    assert isinstance(doc["seconds"], float) and doc["tensors"] == 8
    assert "\x1b[" not in out
    written = (folder / "adapter_model.safetensors").read_bytes()

    code, out, err = run_cli("convert", folder, "--json")
    assert code == 2 and json.loads(out)["error"] in err  # --json: the failure as a document
    assert "already exists" in err and "--overwrite" in err and "Traceback" not in err
    assert (folder / "adapter_model.safetensors").read_bytes() == written

    (folder / "adapter_model.safetensors").write_bytes(b"stale")
    code, out, err = run_cli("convert", folder, "--overwrite", "-q")
    assert code == 0, err
    assert (folder / "adapter_model.safetensors").read_bytes() == written
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]


def test_already_safetensors_adapter_needs_an_output(adapters, tmp_path, run_cli):
    root, _ = adapters
    folder = _copy(root / "safe", tmp_path / "safe")
    code, out, err = run_cli("convert", folder)
    assert code == 2 and "already safetensors" in err and "-o" in err
    code, out, err = run_cli("convert", folder, "-o", tmp_path / "copy", "--json")
    assert code == 0, err
    copied = tmp_path / "copy" / "adapter_model.safetensors"
    assert copied.read_bytes() == (folder / "adapter_model.safetensors").read_bytes()


def _dirty_adapter(peft_model, folder: Path, config_dir: Path) -> dict[str, torch.Tensor]:
    """What a hand-rolled save leaves: adapter-name keys, trainer state, a stray tensor."""
    folder.mkdir()
    state = {k: v.detach().clone() for k, v in peft_model.state_dict().items() if "lora_" in k}
    assert all(".default." in k for k in state)
    dirty: dict = dict(state)
    dirty["model.embed_tokens.weight"] = torch.randn(64, 32)  # not part of the adapter
    dirty["optimizer"] = {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1}]}
    dirty["global_step"] = 100
    torch.save(dirty, folder / "adapter_model.bin")
    (folder / "adapter_config.json").write_text((config_dir / "adapter_config.json").read_text())
    (folder / "README.md").write_text("card")
    (folder / "training_args.bin").write_bytes(b"pickled TrainingArguments")
    (folder / "trainer_state.json").write_text("{}")
    return state


def test_dirty_adapter_keys_are_normalized_and_junk_reported(adapters, tmp_path, run_cli):
    root, peft_model = adapters
    folder = tmp_path / "dirty"
    state = _dirty_adapter(peft_model, folder, root / "bin")
    before = _hashes(folder)
    code, out, err = run_cli("convert", folder, "-o", tmp_path / "clean", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert sorted(doc["dropped"]) == sorted(
        ["model.embed_tokens.weight", "optimizer.state", "optimizer.param_groups", "global_step"]
    )
    assert doc["renamed_keys"] == len(state) == 8
    clean = tmp_path / "clean"
    assert sorted(p.name for p in clean.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "lora-checksums.sha256",
    ]
    assert doc["files"] == sorted(p.name for p in clean.iterdir())
    ours = load_file(clean / "adapter_model.safetensors")
    expected = load_file(root / "safe" / "adapter_model.safetensors")
    assert sorted(ours) == sorted(expected) == sorted(k.replace(".default", "") for k in state)
    assert all(torch.equal(ours[k], expected[k]) for k in ours)
    assert json.loads((clean / "adapter_config.json").read_text()) == json.loads(
        (folder / "adapter_config.json").read_text()
    )
    assert _hashes(folder) == before

    # people get the same report on stderr
    code, out, err = run_cli("convert", folder, "-o", tmp_path / "clean2")
    assert code == 0
    assert "dropped 4 non-adapter or non-tensor entries" in err
    assert "converted 8 tensors" in out


def test_two_adapters_in_one_file_are_refused(tmp_path):
    folder = tmp_path / "multi"
    folder.mkdir()
    p = "base_model.model.l."
    state = {
        p + "lora_A.default.weight": torch.randn(2, 4),
        p + "lora_B.default.weight": torch.randn(4, 2),
        p + "lora_A.other.weight": torch.randn(2, 4),
        p + "lora_B.other.weight": torch.randn(4, 2),
    }
    torch.save(state, folder / "adapter_model.bin")
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["l"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(FormatError, match=r"lora_A\.default\.weight.*lora_A\.other\.weight"):
        convert(folder, None)
    assert not (folder / "adapter_model.safetensors").exists()


def test_one_tensor_under_two_spellings_is_stored_once(tmp_path):
    folder = tmp_path / "twice"
    folder.mkdir()
    a = torch.randn(2, 4)
    p = "base_model.model.l."
    state = {p + "lora_A.default.weight": a, p + "lora_A.weight": a, p + "lora_B.weight": a.t()}
    torch.save(state, folder / "adapter_model.bin")
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["l"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    result = convert(folder, None)
    out = load_file(folder / "adapter_model.safetensors")
    assert sorted(out) == [p + "lora_A.weight", p + "lora_B.weight"]
    assert torch.equal(out[p + "lora_A.weight"], a)
    assert any("stored once" in n for n in result.notes)


SWIFT_REGEX = "^(model)(?!.*(lm_head|output|emb|wte|shared)).*"


@pytest.mark.parametrize("regex", [r".*\.(q_proj|v_proj)", SWIFT_REGEX])
def test_targets_as_list_rewrites_a_regex(llama, tmp_path, regex):
    import copy

    from peft import PeftModel

    src = tmp_path / "regex"
    peft_model = peft_adapter(llama, src, safe=False, target_modules=r".*\.(q_proj|v_proj)")
    config = json.loads((src / "adapter_config.json").read_text())
    config["target_modules"] = regex  # as ms-swift writes it
    (src / "adapter_config.json").write_text(json.dumps(config))
    before = _hashes(src)

    result = convert(src, tmp_path / "out", targets_as_list=True)
    new = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    modules = [f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in TARGETS]
    assert new["target_modules"] == sorted(modules)
    assert {k: v for k, v in new.items() if k != "target_modules"} == {
        k: v for k, v in config.items() if k != "target_modules"
    }
    assert any("4 module names" in n and "4 matched" in n for n in result.notes)
    assert _hashes(src) == before
    loaded = PeftModel.from_pretrained(copy.deepcopy(llama), tmp_path / "out").eval()
    assert torch.equal(_logits(loaded), _logits(peft_model))


def test_targets_as_list_keeps_a_list(adapters, tmp_path):
    root, _ = adapters
    result = convert(root / "bin", tmp_path / "out", targets_as_list=True)
    assert "already a list" in result.notes[0]
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(TARGETS)


def test_targets_as_list_without_output_is_refused(adapters, tmp_path, run_cli):
    root, _ = adapters
    folder = _copy(root / "bin", tmp_path / "bin")
    before = _hashes(folder)
    code, out, err = run_cli("convert", folder, "--targets-as-list")
    assert code == 2
    assert "inputs are never modified" in err and "-o" in err
    assert _hashes(folder) == before


def test_checkpoint_only_options_are_refused_for_adapters(adapters, tmp_path, run_cli):
    root, _ = adapters
    code, _, err = run_cli("convert", root / "bin", "-o", tmp_path / "x", "--dtype", "bf16")
    assert code == 2 and "--dtype" in err
    assert not (tmp_path / "x").exists()


# --- full checkpoints ------------------------------------------------------------------------


def test_checkpoint_bin_converts_and_loads_with_equal_logits(llama, tmp_path, run_cli):
    src = save_model(llama, tmp_path / "ckpt", safe=False)
    (src / "tokenizer.json").write_text('{"tok": 1}')
    (src / "generation_config.json").write_text('{"do_sample": false}')
    (src / "training_args.bin").write_bytes(b"junk")
    before = _hashes(src)
    code, out, err = run_cli("convert", src, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert set(doc) == CONVERT_KEYS and doc["kind"] == "checkpoint"
    dest = tmp_path / "ckpt-safetensors"
    assert doc["output"] == str(dest)
    assert doc["files"] == [
        "config.json",
        "generation_config.json",
        "lora-checksums.sha256",
        "model.safetensors",
        "tokenizer.json",
    ]
    assert doc["tensors"] == len(llama.state_dict())
    assert doc["bytes"] == sum(t.numel() * t.element_size() for t in llama.state_dict().values())
    assert torch.equal(_logits(_load(dest)), _logits(llama))
    assert _hashes(src) == before
    with safe_open(dest / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        for k, v in llama.state_dict().items():
            assert torch.equal(f.get_tensor(k), v), k


def _sharded_bin(model, folder: Path) -> Path:
    """A transformers-4-style sharded .bin checkpoint with pytorch_model.bin.index.json."""
    folder.mkdir()
    model.config.save_pretrained(folder)
    state = model.state_dict()
    names = list(state)
    half = len(names) // 2
    files = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    weight_map = {}
    for part, fname in zip((names[:half], names[half:]), files, strict=True):
        torch.save({k: state[k] for k in part}, folder / fname)
        weight_map |= dict.fromkeys(part, fname)
    index = {"metadata": {"total_size": 123}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize("via_index_file", [False, True])
def test_sharded_bin_with_index_and_max_shard_size(llama, tmp_path, via_index_file):
    src = _sharded_bin(llama, tmp_path / "sharded")
    before = _hashes(src)
    inp = src / "pytorch_model.bin.index.json" if via_index_file else src
    result = convert(inp, None, max_shard_size="20KB")
    dest = tmp_path / "sharded-safetensors"
    assert result.output == dest
    shards = sorted(dest.glob("model-*.safetensors"))
    n = len(shards)
    assert n > 2
    assert [s.name for s in shards] == [
        f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)
    ]
    index = json.loads((dest / "model.safetensors.index.json").read_text())
    state = llama.state_dict()
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in state.values()
    )
    assert index["metadata"]["total_size"] == sum(s.stat().st_size for s in shards) - sum(
        8 + int.from_bytes(s.read_bytes()[:8], "little") for s in shards
    )
    assert set(index["weight_map"]) == set(state)
    for s in shards:  # data within the limit, unless a shard holds one oversized tensor
        data = s.stat().st_size - 8 - int.from_bytes(s.read_bytes()[:8], "little")
        assert data <= 20_000 or len(load_file(s)) == 1
    assert torch.equal(_logits(_load(dest)), _logits(llama))
    assert _hashes(src) == before


def test_dtype_bf16_converts_floats_and_updates_config(llama, tmp_path):
    src = save_model(llama, tmp_path / "ckpt", safe=False)
    result = convert(src, tmp_path / "bf16", dtype="bf16")
    tensors = _all_tensors(tmp_path / "bf16")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    for k, v in llama.state_dict().items():
        assert torch.equal(tensors[k], v.to(torch.bfloat16)), k
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    assert result.bytes == sum(t.numel() * 2 for t in tensors.values())
    # transformers casting the original at load time gives the same model
    ref = _logits(_load(src, torch.bfloat16))
    assert torch.equal(_logits(_load(tmp_path / "bf16", torch.bfloat16)), ref)


def test_dtype_keeps_integer_tensors(tmp_path):
    (tmp_path / "ck").mkdir()
    torch.save({"w": torch.randn(3), "ids": torch.arange(4)}, tmp_path / "ck" / "pytorch_model.bin")
    convert(tmp_path / "ck", tmp_path / "out", dtype="fp16")
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert out["w"].dtype == torch.float16 and out["ids"].dtype == torch.int64


def test_bad_dtype_and_shard_size_are_usage_errors(llama, tmp_path, run_cli):
    src = save_model(llama, tmp_path / "ckpt", safe=False)
    code, _, err = run_cli("convert", src, "--dtype", "fp8-ish")
    assert code == 2 and "unknown dtype" in err
    code, _, err = run_cli("convert", src, "--max-shard-size", "lots")
    assert code == 2 and "size" in err
    assert not (tmp_path / "ckpt-safetensors").exists()


def test_pt_file_converts_beside_itself(tmp_path):
    state = {"a": torch.randn(2, 3), "b": torch.arange(3)}
    torch.save(state, tmp_path / "weights.pt")
    result = convert(tmp_path / "weights.pt", None)
    assert result.output == tmp_path / "weights-safetensors"
    out = load_file(tmp_path / "weights-safetensors" / "model.safetensors")
    assert all(torch.equal(out[k], v) for k, v in state.items())


# --- shared storage ------------------------------------------------------------------------


def test_seed_case_shared_modules_to_save_bias_converts_cleanly(tmp_path, run_cli):
    """The reported failure: torch.save'd state dict where two names share one bias."""
    folder = tmp_path / "seed"
    folder.mkdir()
    bias = torch.randn(3)
    state = {"classifier.weight": torch.randn(3, 4), "classifier.bias": bias}
    state["classifier.modules_to_save.bias"] = bias
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(RuntimeError, match="share memory"):  # what users hit
        from safetensors.torch import save_file

        save_file(torch.load(folder / "pytorch_model.bin"), tmp_path / "naive.safetensors")
    code, out, err = run_cli("convert", folder, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["aliases"] == {"classifier.modules_to_save.bias": "classifier.bias"}
    assert any("stored once" in n for n in doc["notes"])
    path = tmp_path / "seed-safetensors" / "model.safetensors"
    with safe_open(path, "pt") as f:
        assert sorted(f.keys()) == ["classifier.bias", "classifier.weight"]
        assert f.metadata() == {
            "format": "pt",
            "classifier.modules_to_save.bias": "classifier.bias",
        }
        assert torch.equal(f.get_tensor("classifier.bias"), bias)


def test_alias_records_survive_a_second_conversion(tmp_path):
    folder = tmp_path / "seed"
    folder.mkdir()
    bias = torch.randn(3)
    torch.save({"c.bias": bias, "c.m.bias": bias}, folder / "pytorch_model.bin")
    convert(folder, tmp_path / "once")
    result = convert(tmp_path / "once", tmp_path / "twice", dtype="fp16")
    assert result.aliases == {"c.m.bias": "c.bias"}
    with safe_open(tmp_path / "twice" / "model.safetensors", "pt") as f:
        assert f.metadata()["c.m.bias"] == "c.bias"


def test_tied_embeddings_store_lm_head_once(tmp_path):
    model = tiny_model("llama-tied", torch.float32)
    state = model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    src = save_model(model, tmp_path / "tied", safe=False)
    result = convert(src, None)
    dest = tmp_path / "tied-safetensors"
    assert result.aliases == {"lm_head.weight": "model.embed_tokens.weight"}
    assert result.notes == ["lm_head.weight is tied to model.embed_tokens.weight: stored once"]
    with safe_open(dest / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in list(f.keys())
        assert f.metadata()["lm_head.weight"] == "model.embed_tokens.weight"
    assert torch.equal(_logits(_load(dest)), _logits(model))


def test_shared_but_untied_embeddings_are_written_twice_with_a_note(llama, tmp_path):
    import copy

    model = copy.deepcopy(llama)
    with torch.no_grad():
        model.lm_head.weight = model.model.embed_tokens.weight  # shared storage, config untied
    assert model.config.tie_word_embeddings is False
    src = save_model(model, tmp_path / "untied", safe=False)
    result = convert(src, None)
    assert result.aliases == {}
    assert any("not tie them" in n and "separate copies" in n for n in result.notes)
    dest = tmp_path / "untied-safetensors"
    tensors = load_file(dest / "model.safetensors")
    assert torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"])
    assert torch.equal(_logits(_load(dest)), _logits(model))


def test_tie_setting_from_text_config(tmp_path):
    folder = tmp_path / "vlm"
    folder.mkdir()
    emb = torch.randn(4, 2)
    torch.save({"lm_head.weight": emb, "model.embed.weight": emb}, folder / "pytorch_model.bin")
    config = {"model_type": "x", "text_config": {"tie_word_embeddings": False}}
    (folder / "config.json").write_text(json.dumps(config))
    result = convert(folder, None)
    assert result.aliases == {}
    assert "lm_head.weight" in load_file(tmp_path / "vlm-safetensors" / "model.safetensors")


def test_partial_and_overlapping_views_become_contiguous_copies(tmp_path):
    folder = tmp_path / "views"
    folder.mkdir()
    base = torch.arange(24, dtype=torch.float32)
    state = {
        "full": base,
        "first": base[:12],
        "second": base[12:],
        "middle": base[6:18],
        "matrix_t": base.view(4, 6).t(),
        "strided": base[::3],
    }
    torch.save(state, folder / "pytorch_model.bin")
    result = convert(folder, None)
    assert result.aliases == {} and result.tensors == len(state)
    assert any("separate contiguous copies" in n for n in result.notes)
    out = load_file(tmp_path / "views-safetensors" / "model.safetensors")
    for k, v in state.items():
        assert torch.equal(out[k], v.contiguous()), k
    assert (tmp_path / "views-safetensors" / "model.safetensors").stat().st_size < 4096


# --- output handling ----------------------------------------------------------------------------


def test_existing_output_is_never_overwritten_without_the_flag(llama, tmp_path, run_cli):
    src = save_model(llama, tmp_path / "ckpt", safe=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli("convert", src, "-o", out)
    assert code == 2 and "already exists" in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    code, _, err = run_cli("convert", src, "-o", out, "--overwrite", "-q")
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_output_holding_the_input_is_refused_even_with_overwrite(llama, tmp_path):
    src = save_model(llama, tmp_path / "ckpt", safe=False)
    before = _hashes(src)
    with pytest.raises(UsageError, match="input"):
        convert(src / "pytorch_model.bin", src, overwrite=True)
    with pytest.raises(UsageError, match="input"):
        convert(src, src / "inside", overwrite=True)
    assert _hashes(src) == before


def test_a_mismatch_after_writing_fails_and_leaves_nothing(tmp_path, monkeypatch):
    """The re-read check is real: corrupt the copy and the conversion fails."""
    from lora_cli.io import writer

    folder = tmp_path / "ck"
    folder.mkdir()
    torch.save({"a": torch.randn(8), "b": torch.randn(8)}, folder / "pytorch_model.bin")
    real = writer.copy_range

    def corrupt(src_fd, src_off, dst_fd, dst_off, nbytes):
        real(src_fd, src_off, dst_fd, dst_off, nbytes)
        import os

        os.pwrite(dst_fd, b"\xff", dst_off)

    monkeypatch.setattr(writer, "copy_range", corrupt)
    with pytest.raises(FormatError, match="does not match its source"):
        convert(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_interrupt_leaves_no_output(tmp_path, monkeypatch):
    from lora_cli.stages import convert as convert_mod

    folder = tmp_path / "ck"
    folder.mkdir()
    torch.save({"a": torch.randn(8)}, folder / "pytorch_model.bin")

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_mod, "_verify", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(folder, tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]
