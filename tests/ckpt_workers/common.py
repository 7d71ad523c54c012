"""The tiny model and LoRA setup every training-checkpoint fixture trains.

A Llama small enough to train in seconds on a CPU, wrapped with LoRA on q/v/o,
``lm_head`` as a ``modules_to_save`` copy and ``embed_tokens`` unfrozen by hand (the
case whose trained weights PEFT's ``save_pretrained`` leaves out). ``lora_B`` starts
perturbed so that two AdamW steps give every factor a non-trivial value.
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 128


def tiny_llama(tied: bool = False, **sizes: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=sizes.get("vocab_size", VOCAB),
        hidden_size=sizes.get("hidden_size", 32),
        intermediate_size=sizes.get("intermediate_size", 64),
        num_hidden_layers=sizes.get("num_hidden_layers", 2),
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def lora_config(tokens: bool = False):
    from peft import LoraConfig

    if tokens:  # trainable tokens on a tied model
        return LoraConfig(
            r=8,
            lora_alpha=16,
            target_modules=["q_proj", "v_proj"],
            trainable_token_indices={"embed_tokens": [1, 5, 7]},
        )
    targets = ["q_proj", "v_proj", "o_proj"]
    return LoraConfig(r=8, lora_alpha=16, target_modules=targets, modules_to_save=["lm_head"])


def peft_model(model, tokens: bool = False, unfreeze_embedding: bool = True):
    """LoRA-wrap ``model``; lora_B (and token deltas) perturbed so the merge is not a no-op."""
    from peft import get_peft_model

    pm = get_peft_model(model, lora_config(tokens))
    if unfreeze_embedding and not tokens:
        pm.base_model.model.model.embed_tokens.weight.requires_grad_(True)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return pm


def param_groups(pm) -> list[dict]:
    """Two groups (LoRA factors, trained base params) so multi-group layouts are exercised."""
    lora = [p for n, p in pm.named_parameters() if p.requires_grad and "lora_" in n]
    other = [p for n, p in pm.named_parameters() if p.requires_grad and "lora_" not in n]
    groups = [{"params": lora}, {"params": other, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def batch(rank: int, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 * rank + step)
    return torch.randint(0, VOCAB, (2, 12), generator=gen)


def save_base(model, base_dir: Path) -> None:
    """The untrained base (fp32): what ``--base`` and the oracle start from."""
    if not (base_dir / "config.json").exists():
        model.save_pretrained(str(base_dir))
