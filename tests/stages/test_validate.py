"""`lora validate`: structural checks, recomputation against BASE + ADAPTER, the manifest,
exit codes (0 valid, 1 findings, 2 could not run) and the JSON document."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import peft_adapter, save_model, tiny_model
from rel_helpers import (
    SHARD2,
    add_ulps,
    build_inputs,
    edit_tensor,
    set_adapter_tensor,
    shard_of,
    split,
    write_header,
)
from safetensors.torch import save_file

from lora_cli.io.layout import MANIFEST_NAME, write_manifest
from lora_cli.stages.merge import merge
from lora_cli.stages.validate import validate
from lora_cli.validate.numeric import compare, max_ulp

Q0 = "model.layers.0.self_attn.q_proj.weight"
DOWN0 = "model.layers.0.mlp.down_proj.weight"
TOP_KEYS = {
    "schema",
    "path",
    "part",
    "kind",
    "valid",
    "exit_code",
    "base",
    "adapter",
    "tolerance",
    "sample",
    "tensors_checked",
    "checks",
    "findings",
    "recomputed",
    "notes",
}


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    root = tmp_path_factory.mktemp("validate")
    base, adapter = build_inputs(root)
    out = root / "out"
    merge(base, adapter, out, device="cpu")
    return base, adapter, out


def _copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def _json(run_cli, *args) -> tuple[int, dict]:
    code, out, err = run_cli("validate", *args, "--json")
    assert "Traceback" not in out + err
    doc = json.loads(out)  # exactly one document on stdout
    assert doc["schema"] == "lora-validate/1" and doc["exit_code"] == code
    return code, doc


def _findings(doc: dict, check: str) -> list[dict]:
    return [f for f in doc["findings"] if f["check"] == check]


# --- valid inputs -----------------------------------------------------------------------------


def test_valid_merge_output_exits_0(merged, run_cli) -> None:
    base, adapter, out = merged
    code, stdout, _ = run_cli("validate", out)
    assert code == 0, stdout
    assert stdout.strip().splitlines()[-1].startswith("VALID: ")
    code, doc = _json(run_cli, out, "--base", base, "--adapter", adapter)
    assert code == 0 and doc["valid"] and doc["findings"] == []
    assert doc["checks"]["manifest"] == "ok" and doc["checks"]["recompute"] == "ok"
    kinds = {r["tensor"]: r["kind"] for r in doc["recomputed"]}
    assert len(kinds) == doc["tensors_checked"] == 21  # every tensor compared
    assert sorted(n for n, k in kinds.items() if k == "merge") == [
        f"model.layers.{i}.self_attn.{p}_proj.weight" for i in (0, 1) for p in ("q", "v")
    ]
    assert all(r["ok"] and r["max_ulp"] <= 1 for r in doc["recomputed"])


def test_base_and_adapter_validate_clean(merged, run_cli) -> None:
    base, adapter, _ = merged
    assert run_cli("validate", base)[0] == 0
    code, doc = _json(run_cli, adapter, "--base", base)
    assert code == 0 and doc["kind"] == "adapter" and doc["checks"]["adapter-base"] == "ok"


# --- recomputation ----------------------------------------------------------------------------


def test_tampered_merged_tensor_is_named_with_its_ulps(merged, tmp_path, run_cli) -> None:
    base, adapter, out = merged
    bad = _copy(out, tmp_path / "bad")
    edit_tensor(shard_of(bad, Q0), Q0, add_ulps(3))
    (bad / MANIFEST_NAME).unlink()  # without the manifest only recomputation can tell
    assert run_cli("validate", bad)[0] == 0
    code, stdout, _ = run_cli("validate", bad, "--base", base, "--adapter", adapter)
    assert code == 1
    lines = [x for x in stdout.splitlines() if x.startswith("FINDING ")]
    assert len(lines) == 1 and Q0 in lines[0] and "recompute" in lines[0] and "3 ulp" in lines[0]
    assert shard_of(bad, Q0).name in lines[0]
    _, doc = _json(run_cli, bad, "--base", base, "--adapter", adapter)
    entry = next(r for r in doc["recomputed"] if r["tensor"] == Q0)
    assert entry == {**entry, "kind": "merge", "max_ulp": 3, "ok": False}
    assert entry["max_abs_error"] > 0


def test_one_ulp_is_the_default_tolerance(merged, tmp_path, run_cli) -> None:
    base, adapter, out = merged
    bad = _copy(out, tmp_path / "bad")
    edit_tensor(shard_of(bad, Q0), Q0, add_ulps(1))
    write_manifest(bad)
    assert run_cli("validate", bad, "--base", base, "--adapter", adapter)[0] == 0
    edit_tensor(shard_of(bad, Q0), Q0, add_ulps(1))  # now 2 ulp
    write_manifest(bad)
    assert run_cli("validate", bad, "--base", base, "--adapter", adapter)[0] == 1


def test_atol_loosens_the_tolerance(merged, tmp_path, run_cli) -> None:
    base, adapter, out = merged
    bad = _copy(out, tmp_path / "bad")
    edit_tensor(shard_of(bad, Q0), Q0, add_ulps(4))
    write_manifest(bad)
    args = ("validate", bad, "--base", base, "--adapter", adapter)
    code, doc = _json(run_cli, *args[1:])
    assert code == 1
    err = next(r["max_abs_error"] for r in doc["recomputed"] if r["tensor"] == Q0)
    assert run_cli(*args, "--atol", str(err * 0.5))[0] == 1
    assert run_cli(*args, "--atol", str(err * 1.01))[0] == 0
    assert run_cli(*args, "--rtol", "0.5")[0] == 0


def test_untouched_tensor_must_be_byte_identical(merged, tmp_path, run_cli) -> None:
    base, adapter, out = merged
    bad = _copy(out, tmp_path / "bad")
    edit_tensor(shard_of(bad, DOWN0), DOWN0, add_ulps(1))  # 1 ulp: fine for merged tensors
    write_manifest(bad)
    code, doc = _json(run_cli, bad, "--base", base, "--adapter", adapter, "--atol", "1")
    assert code == 1
    (finding,) = doc["findings"]
    assert finding["tensor"] == DOWN0 and finding["check"] == "untouched"
    assert "byte-identical" in finding["message"] and "1 ulp" in finding["message"]
    entry = next(r for r in doc["recomputed"] if r["tensor"] == DOWN0)
    assert entry["kind"] == "copy" and entry["max_ulp"] == 1 and not entry["ok"]


def test_sample_checks_a_deterministic_subset(merged, tmp_path, run_cli) -> None:
    base, adapter, out = merged
    _, full = _json(run_cli, out, "--base", base, "--adapter", adapter)
    untouched = sorted(r["tensor"] for r in full["recomputed"] if r["kind"] == "copy")
    touched = sorted(r["tensor"] for r in full["recomputed"] if r["kind"] != "copy")
    code, doc = _json(run_cli, out, "--base", base, "--adapter", adapter, "--sample", "3")
    assert code == 0 and doc["sample"] == 3
    chosen = sorted(untouched, key=lambda n: hashlib.sha256(n.encode()).hexdigest())[:3]
    assert sorted(r["tensor"] for r in doc["recomputed"] if r["kind"] == "copy") == sorted(chosen)
    assert sorted(r["tensor"] for r in doc["recomputed"] if r["kind"] != "copy") == touched
    assert any("--sample 3" in n for n in doc["notes"])
    assert _json(run_cli, out, "--base", base, "--adapter", adapter, "--sample", "3")[1] == doc
    # a sampled untouched tensor is still held to the byte-identical rule
    bad = _copy(out, tmp_path / "bad")
    edit_tensor(shard_of(bad, chosen[0]), chosen[0], add_ulps(1))
    write_manifest(bad)
    code, doc = _json(run_cli, bad, "--base", base, "--adapter", adapter, "--sample", "3")
    assert code == 1 and doc["findings"][0]["tensor"] == chosen[0]


def test_sample_recomputes_random_row_blocks_of_big_tensors(
    merged, tmp_path, run_cli, monkeypatch
) -> None:
    """Tensors merge streams in row blocks get a seeded choice of blocks recomputed."""
    import lora_cli.merge.run as run

    base, adapter, out = merged
    monkeypatch.setattr(run, "BLOCK_BYTES", 256)  # 32×32 bf16 → 8 blocks of 4 rows
    args = ("--base", base, "--adapter", adapter, "--sample", "0")
    code, doc = _json(run_cli, out, *args)
    assert code == 0, doc["findings"]
    entry = next(r for r in doc["recomputed"] if r["tensor"] == Q0)
    assert len(entry["rows"]) == 2 and all(b - a == 4 for a, b in entry["rows"])
    assert any("row blocks chosen at random" in n for n in doc["notes"])
    assert _json(run_cli, out, *args)[1] == doc  # seeded: the same blocks every run
    sampled = {i for a, b in entry["rows"] for i in range(a, b)}
    outside = min(set(range(32)) - sampled)

    def poke(row: int):
        def fn(t: torch.Tensor) -> None:
            add_ulps(4)(t[row])

        return fn

    bad = _copy(out, tmp_path / "outside")
    edit_tensor(shard_of(bad, Q0), Q0, poke(outside))
    write_manifest(bad)
    assert run_cli("validate", bad, *args)[0] == 0  # not in the sample…
    assert run_cli("validate", bad, *args[:-2])[0] == 1  # …but a full run sees it
    bad = _copy(out, tmp_path / "inside")
    edit_tensor(shard_of(bad, Q0), Q0, poke(min(sampled)))
    write_manifest(bad)
    code, doc = _json(run_cli, bad, *args)
    assert code == 1 and doc["findings"][0]["tensor"] == Q0
    assert "sampled rows" in doc["findings"][0]["message"]


def test_dtype_converted_merge_is_recomputed_in_that_dtype(merged, tmp_path, run_cli) -> None:
    base, adapter, _ = merged
    out = tmp_path / "fp16"
    merge(base, adapter, out, dtype="fp16", device="cpu")
    code, doc = _json(run_cli, out, "--base", base, "--adapter", adapter)
    assert code == 0, doc["findings"]
    assert any("F16" in n for n in doc["notes"])


def test_untie_config_update_is_checked(tmp_path, run_cli) -> None:
    model = tiny_model("llama-tied")
    base = save_model(model, tmp_path / "base")
    peft_adapter(model, tmp_path / "adapter", target_modules=["lm_head"])
    out = tmp_path / "out"
    merge(base, tmp_path / "adapter", out, device="cpu")
    args = (out, "--base", base, "--adapter", tmp_path / "adapter")
    assert _json(run_cli, *args)[0] == 0
    config = json.loads((out / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (out / "config.json").write_text(json.dumps(config))
    write_manifest(out)
    code, doc = _json(run_cli, *args)
    assert code == 1
    messages = [f["message"] for f in doc["findings"]]
    assert any("tie_word_embeddings is True but merging" in m for m in messages)
    # and the structural check sees it too: transformers would drop the merged lm_head
    assert any("differs from model.embed_tokens.weight" in m for m in messages)


def test_tensor_missing_from_the_output(merged, tmp_path, run_cli) -> None:
    base, adapter, out = merged
    bad = _copy(out, tmp_path / "bad")
    shard = bad / SHARD2
    header, data = split(shard)
    name = "model.norm.weight"
    start, end = header.pop(name)["data_offsets"]
    assert end == len(data)  # the last tensor: dropping its bytes keeps the file valid
    write_header(shard, header, data[:start])
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    del index["weight_map"][name]
    index["metadata"]["total_size"] -= end - start
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    write_manifest(bad)
    assert run_cli("validate", bad)[0] == 0
    code, doc = _json(run_cli, bad, "--base", base, "--adapter", adapter)
    assert code == 1
    assert [(f["tensor"], f["check"]) for f in doc["findings"]] == [(name, "recompute")]
    assert "missing" in doc["findings"][0]["message"]


# --- structure ------------------------------------------------------------------------------


def test_manifest_names_the_changed_file(merged, tmp_path, run_cli) -> None:
    _, _, out = merged
    bad = _copy(out, tmp_path / "bad")
    config = bad / "config.json"
    config.write_text(config.read_text() + " ")
    (bad / "generation_config.json").unlink()
    code, stdout, _ = run_cli("validate", bad)
    assert code == 1
    lines = [x for x in stdout.splitlines() if x.startswith("FINDING ")]
    assert len(lines) == 2
    assert any(x.startswith("FINDING config.json: manifest: sha256") for x in lines)
    assert any("generation_config.json: manifest: listed" in x and "missing" in x for x in lines)


def test_manifest_catches_a_tensor_byte_without_base(merged, tmp_path, run_cli) -> None:
    _, _, out = merged
    bad = _copy(out, tmp_path / "bad")
    edit_tensor(shard_of(bad, DOWN0), DOWN0, add_ulps(1))
    code, doc = _json(run_cli, bad)
    assert code == 1
    assert [(f["file"], f["check"]) for f in doc["findings"]] == [
        (shard_of(bad, DOWN0).name, "manifest")
    ]


def test_nan_and_inf_are_counted_per_tensor(merged, tmp_path, run_cli) -> None:
    base, _, _ = merged
    bad = _copy(base, tmp_path / "bad")

    def poison(t: torch.Tensor) -> None:
        t.view(-1)[0] = math.nan
        t.view(-1)[5] = math.nan
        t.view(-1)[7] = -math.inf

    edit_tensor(shard_of(bad, DOWN0), DOWN0, poison)
    code, stdout, _ = run_cli("validate", bad)
    assert code == 1
    (line,) = [x for x in stdout.splitlines() if x.startswith("FINDING ")]
    assert DOWN0 in line and "finite" in line and "3 of 1536 values" in line
    assert "(2 NaN, 1 Inf)" in line


def test_index_total_size_extra_and_missing_shards(merged, tmp_path, run_cli) -> None:
    base, _, _ = merged
    bad = _copy(base, tmp_path / "bad")
    index_path = bad / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["metadata"]["total_size"] += 2
    index_path.write_text(json.dumps(index))
    code, doc = _json(run_cli, bad)
    assert code == 1
    (f,) = doc["findings"]
    assert f["file"] == index_path.name and f["check"] == "index" and "off by +2" in f["message"]

    bad = _copy(base, tmp_path / "extra")
    save_file({"stray.weight": torch.ones(2)}, bad / "model-00003-of-00002.safetensors")
    code, doc = _json(run_cli, bad)
    assert code == 1
    (f,) = doc["findings"]
    assert f["file"] == "model-00003-of-00002.safetensors" and f["check"] == "index"
    assert "not named by model.safetensors.index.json (extra file)" in f["message"]

    bad = _copy(base, tmp_path / "missing")
    (bad / SHARD2).unlink()
    code, doc = _json(run_cli, bad)
    assert code == 1
    (f,) = doc["findings"]
    assert f["file"] == index_path.name and SHARD2 in f["message"] and "missing" in f["message"]


def test_a_tensor_in_two_shards(merged, tmp_path, run_cli) -> None:
    base, _, _ = merged
    bad = _copy(base, tmp_path / "dup")
    stray = "model-00003-of-00002.safetensors"
    save_file({DOWN0: torch.ones(2)}, bad / stray)
    code, doc = _json(run_cli, bad)
    assert code == 1
    (dup,) = _findings(doc, "duplicates")
    assert dup["tensor"] == DOWN0 and dup["file"] == stray
    assert f"also stored in {shard_of(bad, DOWN0).name}" in dup["message"]


def test_corrupt_shard_is_a_finding_and_the_rest_is_still_checked(merged, tmp_path, run_cli):
    base, _, _ = merged
    bad = _copy(base, tmp_path / "bad")
    raw = (bad / SHARD2).read_bytes()
    (bad / SHARD2).write_bytes(raw[:-3])
    code, doc = _json(run_cli, bad)
    assert code == 1
    (f,) = doc["findings"]
    assert f["file"] == SHARD2 and f["check"] == "header" and f["tensor"] == "model.norm.weight"
    assert doc["tensors_checked"] == 10  # the other shard


def test_config_tie_and_dtype_consistency(merged, tmp_path, run_cli) -> None:
    base, _, _ = merged
    bad = _copy(base, tmp_path / "tie")
    config = json.loads((bad / "config.json").read_text())
    json_write = (bad / "config.json").write_text
    json_write(json.dumps({**config, "tie_word_embeddings": True}))
    code, doc = _json(run_cli, bad)
    assert code == 1
    (f,) = doc["findings"]
    assert f["file"] == "config.json" and f["tensor"] == "lm_head.weight"
    assert "differs from model.embed_tokens.weight" in f["message"]

    json_write(json.dumps({**config, "dtype": "float32"}))
    code, doc = _json(run_cli, bad)
    assert code == 1
    (f,) = doc["findings"]
    assert "'float32'" in f["message"] and "BF16" in f["message"]

    tied = tiny_model("llama-tied")
    tied.config.architectures = ["LlamaForCausalLM"]
    folder = save_model(tied, tmp_path / "tied")
    assert run_cli("validate", folder)[0] == 0
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    code, doc = _json(run_cli, folder)
    assert code == 1
    (f,) = doc["findings"]
    assert f["tensor"] == "lm_head.weight" and "not stored" in f["message"]


# --- adapters --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", torch.float32)


def test_adapter_all_zero_lora_b(llama, tmp_path, run_cli) -> None:
    folder = tmp_path / "fresh"
    peft_adapter(llama, folder, target_modules=["q_proj"], init_lora_weights=True)
    code, doc = _json(run_cli, folder)
    assert code == 1
    (f,) = doc["findings"]
    assert f["check"] == "adapter" and "every lora_B is all zeros" in f["message"]


def test_adapter_zero_size_tensors(tmp_path, run_cli) -> None:
    folder = tmp_path / "zero3"
    folder.mkdir()
    p = "base_model.model.model.layers.0.self_attn.q_proj."
    save_file(
        {p + "lora_A.weight": torch.empty(0), p + "lora_B.weight": torch.empty(0, 4)},
        folder / "adapter_model.safetensors",
    )
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    code, doc = _json(run_cli, folder)
    assert code == 1
    assert any("2 zero-size tensors" in f["message"] for f in _findings(doc, "adapter"))


def test_adapter_regex_target_modules_matching_nothing(llama, tmp_path, run_cli) -> None:
    folder = tmp_path / "regex"
    peft_adapter(llama, folder, target_modules=r".*\.(q_proj|v_proj)")
    assert run_cli("validate", folder)[0] == 0  # the regex PEFT wrote matches its modules
    config = json.loads((folder / "adapter_config.json").read_text())
    config["target_modules"] = r".*\.self_attention\.(q|v)"
    (folder / "adapter_config.json").write_text(json.dumps(config))
    code, doc = _json(run_cli, folder)
    assert code == 1
    (f,) = doc["findings"]
    assert f["file"] == "adapter_config.json" and "matches none of the 4" in f["message"]
    config["target_modules"] = r".*\.q_proj"
    (folder / "adapter_config.json").write_text(json.dumps(config))
    code, doc = _json(run_cli, folder)
    assert code == 1 and "does not match 2 of the 4" in doc["findings"][0]["message"]


def test_adapter_keys_against_another_base(merged, tmp_path, run_cli) -> None:
    _, adapter, _ = merged
    other = save_model(tiny_model("llama", num_hidden_layers=1), tmp_path / "other")
    code, doc = _json(run_cli, adapter, "--base", other)
    assert code == 1
    (f,) = doc["findings"]
    assert f["check"] == "adapter-base" and "base has no tensor" in f["message"]
    assert "model.layers.1" in f["message"]


def test_adapter_with_nan(merged, tmp_path, run_cli) -> None:
    _, adapter, _ = merged
    bad = _copy(adapter, tmp_path / "nan")
    key = set_adapter_tensor(bad, "lora_A", lambda t: t.view(-1).__setitem__(2, math.inf))
    code, doc = _json(run_cli, bad)
    assert code == 1
    (f,) = doc["findings"]
    assert f["tensor"] == key and "(0 NaN, 1 Inf)" in f["message"]


# --- usage, schema, helpers -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (("--base", "{base}"), "--base and --adapter go together"),
        (("--adapter", "{adapter}"), "--base and --adapter go together"),
        (("--sample", "3"), "apply to --base with --adapter"),
        (("--base", "{base}", "--adapter", "{adapter}", "--sample", "-1"), "must be ≥ 0"),
        (("--base", "{base}", "--adapter", "{adapter}", "--atol", "nan"), "finite"),
    ],
)
def test_bad_usage_exits_2(merged, run_cli, extra, needle) -> None:
    base, adapter, out = merged
    args = [a.format(base=base, adapter=adapter) for a in extra]
    code, stdout, stderr = run_cli("validate", out, *args)
    assert code == 2 and stdout == ""
    assert stderr.startswith("error: ") and needle in stderr and len(stderr.splitlines()) == 1


def test_missing_path_and_adapter_misuse_exit_2(merged, tmp_path, run_cli) -> None:
    base, adapter, _ = merged
    code, _, stderr = run_cli("validate", tmp_path / "nope")
    assert code == 2 and "no such file" in stderr
    code, _, stderr = run_cli("validate", adapter, "--base", base, "--adapter", adapter)
    assert code == 2 and "is an adapter" in stderr


def test_json_document_schema(merged, tmp_path, run_cli) -> None:
    base, adapter, out = merged
    bad = _copy(out, tmp_path / "bad")
    edit_tensor(shard_of(bad, Q0), Q0, add_ulps(5))
    code, doc = _json(run_cli, bad, "--base", base, "--adapter", adapter)
    assert code == 1 and set(doc) == TOP_KEYS
    assert doc["kind"] == "checkpoint" and doc["valid"] is False
    assert doc["tolerance"] == {"ulp": 1, "atol": 0.0, "rtol": 0.0}
    assert doc["base"] == str(base) and doc["adapter"] == str(adapter)
    assert all(set(f) == {"file", "tensor", "check", "message"} for f in doc["findings"])
    assert {f["check"] for f in doc["findings"]} == {"manifest", "recompute"}
    assert doc["checks"]["manifest"] == "failed" and doc["checks"]["index"] == "ok"
    assert all(
        set(r) == {"tensor", "kind", "max_abs_error", "max_ulp", "ok", "rows"}
        for r in doc["recomputed"]
    )
    # the human output carries the same findings, one line each
    code, stdout, _ = run_cli("validate", bad, "--base", base, "--adapter", adapter)
    lines = [x for x in stdout.splitlines() if x.startswith("FINDING ")]
    assert len(lines) == len(doc["findings"])
    for f, line in zip(doc["findings"], lines, strict=True):
        assert f["file"] in line and f["message"] in line and (f["tensor"] or "") in line


def test_convert_and_merge_write_manifests_that_validate(merged, tmp_path, run_cli) -> None:
    base, adapter, out = merged
    assert (out / MANIFEST_NAME).is_file()
    listed = {line.split("  ")[1] for line in (out / MANIFEST_NAME).read_text().splitlines()}
    assert listed == {p.name for p in out.iterdir()} - {MANIFEST_NAME}
    code, _, _ = run_cli("convert", base, "-o", tmp_path / "conv", "-q")
    assert code == 0 and (tmp_path / "conv" / MANIFEST_NAME).is_file()
    code, doc = _json(run_cli, tmp_path / "conv")
    assert code == 0 and doc["checks"]["manifest"] == "ok"


def test_single_file_path_checks_its_manifest_line(merged, tmp_path, run_cli) -> None:
    _, _, out = merged
    bad = _copy(out, tmp_path / "bad")
    assert run_cli("validate", bad / SHARD2)[0] == 0
    edit_tensor(bad / SHARD2, "model.norm.weight", add_ulps(1))
    code, doc = _json(run_cli, bad / SHARD2)
    assert code == 1 and doc["kind"] == "file"
    assert [(f["file"], f["check"]) for f in doc["findings"]] == [(SHARD2, "manifest")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_ulp_helper(dtype) -> None:
    x = torch.tensor([1.0, -2.5, 0.0, 3.0e-3], dtype=dtype)
    int_type = {2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
    y = x.clone()
    y.view(int_type)[1] += 7  # 7 ulp further from zero
    assert max_ulp(x, x) == 0 and max_ulp(x, y) == 7
    zero = torch.tensor([0.0], dtype=dtype)
    assert max_ulp(zero, -zero) == 0
    tiny = torch.tensor([torch.finfo(dtype).smallest_normal], dtype=dtype)
    assert max_ulp(tiny, -tiny) == 2 * int(tiny.view(int_type))  # across zero: both sides
    nan = torch.tensor([math.nan], dtype=dtype)
    d = compare(nan, zero, {4: "F32", 2: "F16", 8: "F64"}[x.element_size()], 1.0, 1.0)
    assert d.bad == 1 and d.max_ulp is None and d.max_abs == math.inf


def test_validate_function_returns_a_report(merged) -> None:
    base, adapter, out = merged
    report = validate(out, base=base, adapter=adapter, device="cpu")
    assert report.exit_code == 0 and report.valid and report.summary_line().startswith("VALID:")
    assert len(report.recomputed) == report.tensors_checked
