"""``merge`` and ``validate`` read one list of adapter findings (``adapters/findings.py``):
what validate reports as a finding (exit 1), merge refuses (exit 2, nothing written); what
validate notes, merge warns about. Also: the same adapter given twice, BASE and ADAPTER
swapped, and whose tokenizer / chat template the merged model gets."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import load_owned, peft_adapter, save_model, tiny_model
from hostile_harness import assert_refused
from safetensors.torch import save_file


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("findings")
    model = tiny_model("llama", torch.float32)
    base = save_model(model, root / "base")
    (base / "chat_template.jinja").write_text("base template")
    (base / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    good = root / "good"
    peft_adapter(model, good, target_modules=["q_proj", "v_proj"])
    untrained = root / "untrained"
    peft_adapter(model, untrained, target_modules=["q_proj"], init_lora_weights=True)
    return root, base, good, untrained


def _variant(src, dest, *, config=None, zero_first_b=False):
    shutil.copytree(src, dest)
    if config:
        doc = json.loads((dest / "adapter_config.json").read_text())
        doc.update(config)
        (dest / "adapter_config.json").write_text(json.dumps(doc))
    if zero_first_b:
        path = dest / "adapter_model.safetensors"
        tensors = load_owned(path)
        first_b = sorted(k for k in tensors if "lora_B" in k)[0]
        tensors[first_b] = torch.zeros_like(tensors[first_b])
        save_file(tensors, path, metadata={"format": "pt"})
    return dest


def _validate(run_cli, adapter, base):
    code, stdout, err = run_cli("validate", adapter, "--base", base, "--json")
    return code, json.loads(stdout), err


@pytest.mark.parametrize("dry_run", [False, True])
def test_untrained_adapter_refused_by_merge_found_by_validate(world, tmp_path, dry_run):
    _, base, _, untrained = world
    out = tmp_path / "merged"
    argv = ["merge", base, untrained, "-o", out] + (["--dry-run"] if dry_run else [])
    got = assert_refused(argv, [base, untrained], dest=out, names=["every lora_B is all zeros"])
    assert "untrained" in got.error_lines[0]


def test_untrained_adapter_agrees(world, run_cli):
    _, base, _, untrained = world
    code, doc, _ = _validate(run_cli, untrained, base)
    assert code == 1 and any("every lora_B is all zeros" in f["message"] for f in doc["findings"])


def test_some_zero_lora_b_is_a_warning_in_both(world, tmp_path, run_cli):
    _, base, good, _ = world
    half = _variant(good, tmp_path / "half", zero_first_b=True)
    code, stdout, err = run_cli("merge", base, half, "-o", tmp_path / "m", "--json")
    assert code == 0, err
    assert any("1 of 4 lora_B tensors are all zeros" in w for w in json.loads(stdout)["warnings"])
    code, doc, _ = _validate(run_cli, half, base)
    assert code == 0 and any("1 of 4 lora_B tensors are all zeros" in n for n in doc["notes"])


@pytest.mark.parametrize(
    "regex, needle",
    [(r".*\.self_attention\.(q|v)", "matches none of the 4"), (r".*\.q_proj", "does not match 2")],
)
def test_regex_target_modules_refused_by_merge_found_by_validate(
    world, tmp_path, run_cli, regex, needle
):
    _, base, good, _ = world
    odd = _variant(good, tmp_path / "regex", config={"target_modules": regex})
    out = tmp_path / "merged"
    assert_refused(["merge", base, odd, "-o", out], [base, odd], dest=out, names=[needle])
    code, doc, _ = _validate(run_cli, odd, base)
    assert code == 1 and any(needle in f["message"] for f in doc["findings"])


def test_the_same_adapter_twice_is_refused_by_both(world, tmp_path, run_cli):
    root, base, good, _ = world
    out = tmp_path / "merged"
    assert_refused(["merge", base, good, good, "-o", out], [base, good], dest=out,
                   names=["given twice", "added twice"])  # fmt: skip
    copy = shutil.copytree(good, tmp_path / "copy")
    assert_refused(["merge", base, good, copy, "-o", out], [base, good], dest=out,
                   names=[f"the same weights as {good}"])  # fmt: skip
    merged = root / "merged-once"
    assert run_cli("merge", base, good, "-o", merged, "-q")[0] == 0
    code, _, err = run_cli("validate", merged, "--base", base, "--adapter", good,
                           "--adapter", good)  # fmt: skip
    assert code == 2 and "given twice" in err
    # on purpose: one adapter at twice the strength
    assert run_cli("merge", base, good, "-o", tmp_path / "x2", "--weights", "2", "-q")[0] == 0


def test_swapped_base_and_adapter(world, tmp_path):
    _, base, good, _ = world
    out = tmp_path / "merged"
    got = assert_refused(["merge", good, base, "-o", out], [base, good], dest=out,
                         names=["swapped?"])  # fmt: skip
    assert f"lora merge {base} {good}" in got.error_lines[0]


def test_the_adapters_chat_template_replaces_the_bases(world, tmp_path, run_cli):
    _, base, good, _ = world
    chat = shutil.copytree(good, tmp_path / "chat")
    (chat / "chat_template.jinja").write_text("adapter template")
    out = tmp_path / "merged"
    code, stdout, err = run_cli("merge", base, chat, "-o", out, "--json")
    assert code == 0, err
    assert json.loads(stdout)["tokenizer_from"] == {"adapter": str(chat),
                                                    "files": ["chat_template.jinja"]}  # fmt: skip
    assert (out / "chat_template.jinja").read_text() == "adapter template"
    assert (out / "tokenizer_config.json").read_text() == '{"model_max_length": 64}'  # base's
    code, stdout, _ = run_cli("merge", base, good, "-o", tmp_path / "plain", "--json")
    assert json.loads(stdout)["tokenizer_from"] is None
    assert (tmp_path / "plain" / "chat_template.jinja").read_text() == "base template"


def test_two_adapters_with_different_templates_are_refused(world, tmp_path):
    root, base, good, _ = world
    other = tmp_path / "other"
    peft_adapter(tiny_model("llama", torch.float32), other, target_modules=["k_proj"])
    a = shutil.copytree(good, tmp_path / "a")
    (a / "chat_template.jinja").write_text("one")
    (other / "chat_template.jinja").write_text("two")
    out = tmp_path / "merged"
    assert_refused(["merge", base, a, other, "-o", out], [base, a, other], dest=out,
                   names=["different tokenizer or chat template files"])  # fmt: skip


def test_validate_of_a_merged_checkpoint_finds_what_merge_refuses(world, tmp_path, run_cli):
    """A checkpoint some other tool merged from an untrained adapter: recomputing it matches,
    but validate still reports the adapter finding merge would have refused on."""
    _, base, _, untrained = world
    code, stdout, _ = run_cli("validate", base, "--base", base, "--adapter", untrained, "--json")
    doc = json.loads(stdout)
    assert code == 1 and doc["checks"]["adapter"] == "failed"
    assert [f["message"] for f in doc["findings"] if f["check"] == "adapter"] == [
        "every lora_B is all zeros: the adapter is untrained and merges to the base"
    ]
