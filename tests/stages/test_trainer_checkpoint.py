"""An HF-Trainer-style ``checkpoint-N/`` (DeepSpeed ZeRO-3 in bf16 with
exclude_frozen_parameters, as the Trainer saves PEFT runs, beside the
``adapter_model.safetensors`` that PEFT's default save_pretrained writes): the adapter
file lacks the trained embedding; inspect says so and merge takes the master weights."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from conftest import peft_oracle, ulp_diff
from safetensors.torch import load_file

os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="module")
def trainer_checkpoint(deepspeed_2ranks, tmp_path_factory):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    src = deepspeed_2ranks / "zero3-bf16-trainable-only"
    folder = tmp_path_factory.mktemp("trainer") / "checkpoint-2"
    shutil.copytree(src, folder)
    state = get_fp32_state_dict_from_zero_checkpoint(str(src))
    unmerged, expected = peft_oracle(deepspeed_2ranks / "base", src, state)
    unmerged.save_pretrained(folder)  # save_embedding_layers="auto": the embedding is left out
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    assert "base_model.model.model.embed_tokens.weight" not in load_file(
        folder / "adapter_model.safetensors"
    )
    return folder, unmerged, expected


def test_inspect_warns_that_the_adapter_file_lacks_the_trained_embedding(
    trainer_checkpoint, run_cli
):
    folder, _, _ = trainer_checkpoint
    code, stdout, err = run_cli("inspect", folder, "--json")
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["kind"] == "training-checkpoint" and doc["format"] == "deepspeed-zero3"
    training = doc["training"]
    assert training["world_size"] == 2 and training["bf16"] and training["frozen_excluded"]
    assert training["trained_base_params"] == ["base_model.model.model.embed_tokens.weight"]
    assert any("lacks 1 trained base parameters" in w and "model.embed_tokens.weight" in w
               for w in doc["warnings"])  # fmt: skip


def test_merge_prefers_the_master_weights_and_says_why(
    deepspeed_2ranks, trainer_checkpoint, tmp_path, run_cli
):
    folder, _, expected = trainer_checkpoint
    out = tmp_path / "merged"
    code, stdout, err = run_cli("merge", folder, "-o", out, "--base", deepspeed_2ranks / "base",
                                "--json")  # fmt: skip
    assert code == 0, err
    warnings = json.loads(stdout)["warnings"]
    assert any("DeepSpeed global_step2" in w for w in warnings)
    assert any("adapter_model.safetensors is beside it but not used" in w for w in warnings)
    got = load_file(out / "model.safetensors")
    for name, value in got.items():
        assert ulp_diff(value, expected[name]) <= 1, name
    # merging the adapter file alone would have lost the trained embedding
    alone = tmp_path / "alone"
    code, _, err = run_cli("merge", deepspeed_2ranks / "base", folder, "-o", alone, "-q")
    assert code == 0, err
    embed = "model.embed_tokens.weight"
    assert not torch.equal(load_file(alone / "model.safetensors")[embed], got[embed])


def test_trainable_only_checkpoint_without_base_says_pass_base(deepspeed_2ranks, tmp_path):
    from hostile_harness import assert_refused

    ckpt = deepspeed_2ranks / "zero3-bf16-trainable-only"
    out = tmp_path / "merged"
    got = assert_refused(["merge", ckpt, "-o", out], [ckpt], dest=out, names=[str(ckpt)])
    line = got.error_lines[0]
    assert "frozen weights are not in this checkpoint" in line and line.endswith("pass --base BASE")
    assert "lora-no-side-files" not in got.stderr and "different model" not in line
