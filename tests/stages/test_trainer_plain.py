"""An HF Trainer ``checkpoint-N/`` without DeepSpeed or FSDP, made by the real Trainer (PEFT
on a tiny Llama, two optimizer steps on CPU, a tokenizer with a token added in training):
``adapter_model.safetensors`` + ``adapter_config.json`` beside ``optimizer.pt``,
``scheduler.pt``, ``trainer_state.json`` and the tokenizer files. The README's own command,
``lora merge ./checkpoint-N -o ./merged --base BASE``, merges it as PEFT does, and the
merged model gets the checkpoint's tokenizer (trainers add tokens and templates)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import TINY, peft_merged_state, save_model, tiny_model, ulp_diff
from safetensors.torch import load_file

TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}{% endfor %}"


def _tokenizer(extra: list[str]):
    """A word-level fast tokenizer over the tiny vocabulary (no download)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(TINY["llama"]["vocab_size"] - 8)}
    vocab["<unk>"] = len(vocab)
    model = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=model, unk_token="<unk>", pad_token="<unk>")
    tok.add_tokens(extra)
    return tok


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    root = tmp_path_factory.mktemp("plain-trainer")
    model = tiny_model("llama", torch.float32)
    base = save_model(model, root / "base")
    _tokenizer([]).save_pretrained(base)
    tokenizer = _tokenizer(["<|im_start|>"])  # what a chat fine-tune adds
    tokenizer.chat_template = TEMPLATE
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    peft_model = get_peft_model(copy.deepcopy(model).train(), config)
    torch.manual_seed(0)
    rows = [torch.randint(0, 56, (8,)) for _ in range(4)]
    data = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r} for r in rows]
    args = TrainingArguments(
        output_dir=str(root / "run"),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=5e-2,
        save_strategy="steps",
        save_steps=2,
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
    )
    Trainer(model=peft_model, args=args, train_dataset=data, processing_class=tokenizer).train()
    folder = root / "run" / "checkpoint-2"
    names = {p.name for p in folder.iterdir()}
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt"} <= names, names
    assert {"trainer_state.json", "tokenizer.json", "chat_template.jinja"} <= names, names
    b = load_file(folder / "adapter_model.safetensors")
    assert all(t.abs().sum() > 0 for k, t in b.items() if "lora_B" in k)  # it trained
    return base, folder


def test_readme_command_merges_a_plain_trainer_checkpoint_as_peft_does(
    trainer_run, tmp_path, run_cli
):
    base, folder = trainer_run
    out = tmp_path / "merged"
    code, stdout, err = run_cli("merge", folder, "-o", out, "--base", base, "--json")
    assert code == 0, err
    doc = json.loads(stdout)
    expected = peft_merged_state(base, folder, torch.float32)
    got = load_file(out / "model.safetensors")
    assert set(got) == set(expected)
    for name, value in got.items():
        assert ulp_diff(value, expected[name]) <= 1, name
    # the checkpoint's tokenizer (with the token added in training) and template, not the base's
    assert doc["tokenizer_from"]["adapter"] == str(folder)
    assert "tokenizer.json" in doc["tokenizer_from"]["files"]
    assert (out / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
    assert (out / "chat_template.jinja").read_text() == TEMPLATE
    from transformers import AutoTokenizer

    assert "<|im_start|>" in AutoTokenizer.from_pretrained(out).get_vocab()
    assert not (out / "optimizer.pt").exists() and not (out / "trainer_state.json").exists()


def test_the_summary_says_whose_tokenizer(trainer_run, tmp_path, run_cli):
    base, folder = trainer_run
    code, stdout, err = run_cli("merge", folder, "-o", tmp_path / "m", "--base", base)
    assert code == 0, err
    note = f"note: tokenizer files from the adapter {folder}: tokenizer.json, tokenizer_config"
    assert note in " ".join(err.split())


def test_redundant_adapter_config_that_agrees_is_accepted(trainer_run, tmp_path, run_cli):
    base, folder = trainer_run
    copy_of_config = tmp_path / "adapter_config.json"
    copy_of_config.write_bytes((folder / "adapter_config.json").read_bytes())
    out = tmp_path / "merged"
    code, _, err = run_cli("merge", folder, "-o", out, "--base", base,
                           "--adapter-config", copy_of_config, "-q")  # fmt: skip
    assert code == 0, err
    assert (out / "model.safetensors").is_file()


def test_adapter_config_that_disagrees_is_one_line(trainer_run, tmp_path, run_cli):
    base, folder = trainer_run
    config = json.loads((folder / "adapter_config.json").read_text())
    config["lora_alpha"] = 32
    other = tmp_path / "adapter_config.json"
    other.write_text(json.dumps(config))
    out = tmp_path / "merged"
    code, _, err = run_cli("merge", folder, "-o", out, "--base", base, "--adapter-config", other)
    assert code == 2 and not out.exists()
    (line,) = err.strip().splitlines()
    assert line.startswith("error: ") and "lora_alpha 32 disagrees" in line
