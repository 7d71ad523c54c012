"""The main job on a built-in example: inspect → convert → merge → validate.

Builds a tiny Llama and a PEFT LoRA adapter locally (no downloads), saves the
adapter the old way (pickled ``adapter_model.bin``), then runs the four
subcommands exactly as a user would and checks the merged model's logits
against the unmerged PEFT model.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORK = Path(os.environ.get("LORA_DEMO_DIR", ROOT / "example-output"))
LORA = [sys.executable, "-m", "lora_cli"]


def step(title: str, *args: str) -> None:
    print(f"\n$ lora {' '.join(args)}    # {title}", flush=True)
    done = subprocess.run([*LORA, *args])
    if done.returncode != 0:
        sys.exit(f"demo failed at: lora {' '.join(args)} (exit {done.returncode})")


def build_example() -> tuple[Path, Path, object]:
    import warnings

    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    base = WORK / "base"
    model.save_pretrained(base, max_shard_size="100KB")
    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"],
        init_lora_weights=False,  # non-zero B, as after training
    )
    peft_model = get_peft_model(model, lora).eval()
    adapter = WORK / "adapter"
    peft_model.save_pretrained(adapter, safe_serialization=False)  # adapter_model.bin
    return base, adapter, peft_model


def main() -> None:
    from transformers.utils import logging as transformers_logging

    # the demo tells its own story: no "Loading weights" / "Writing model shards" bars
    transformers_logging.disable_progress_bar()
    if WORK.exists():
        shutil.rmtree(WORK)
    WORK.mkdir(parents=True)
    print(f"building a tiny Llama and a LoRA adapter in {WORK} …")
    base, adapter, peft_model = build_example()
    merged = WORK / "merged"

    step("what is this adapter?", "inspect", str(adapter))
    step("pickle → safetensors, without running pickle code", "convert", str(adapter))
    step("the base checkpoint", "inspect", str(base))
    step("preview the merge", "merge", str(base), str(adapter), "--dry-run")
    step("merge, streaming tensor by tensor", "merge", str(base), str(adapter), "-o", str(merged))
    step("CI gate: recompute and compare", "validate", str(merged), "--base", str(base),
         "--adapter", str(adapter))  # fmt: skip

    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 7, 42, 99, 3, 15]])
    with torch.no_grad():
        ours = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.bfloat16)(ids).logits
        theirs = peft_model(ids).logits
    diff = (ours.float() - theirs.float()).abs().max().item()
    scale = theirs.float().abs().max().item()
    print(f"\nmerged vs unmerged PEFT model: max |Δlogit| = {diff:.4f} (logits up to {scale:.2f})")
    if diff > 0.05 * max(scale, 1.0):
        sys.exit("demo failed: merged logits do not match the unmerged adapter")
    print("demo OK")


if __name__ == "__main__":
    main()
