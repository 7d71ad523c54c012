"""Which LoRA variant an adapter is, decided before any tensor is checked against a base.

PEFT 0.21 hangs a dozen variants off one ``LoraConfig`` (DoRA, VeLoRA, MonteCLoRA,
BD-LoRA, MiCA, KaSA, aLoRA, Arrow, QALoRA, …). They save extra tensors (VeLoRA's
``lora_velora_embed``, MonteCLoRA's ``lora_monteclora_sampler.*``, KaSA's
``lora_diag``) or compact factors (BD-LoRA's block-diagonal ``lora_A``/``lora_B``)
that look like a mismatched base when read as plain LoRA. Naming the variant first
lets a merge either apply PEFT's arithmetic for it or refuse with the variant's real
reason, instead of blaming the user's base model.

Per variant, what PEFT 0.21.2's ``merge_and_unload()`` computes (read from
``peft/tuners/lora/variants.py``):

* VeLoRA, MonteCLoRA: ``W += Δ`` exactly like plain LoRA; the extra tensors are
  training-time state (a projection embedding, a Monte-Carlo sampler) and are ignored.
* MiCA: plain ``Δ`` but added as ``W + round(Δ)`` (the delta is cast to the base dtype
  first).
* BD-LoRA: one factor is stored compact, ``(r, in/n)`` or ``(out, r/n)``; it is
  expanded to ``block_diag(*chunk(w, n))`` and added as ``W + round(Δ)``.
* KaSA: refused. PEFT replaces the base weight by its SVD truncation when it loads
  the adapter, so the result depends on an fp32 SVD of the base (whose low bits vary with
  the LAPACK/BLAS build; the issue that asked for this refusal measured shifts of ~7e6 ulp
  with the thread count), not only on the adapter.
* aLoRA, Arrow, QALoRA: PEFT itself cannot merge them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Tensor-name parts that only a given variant saves (after the module path).
STATE_PARTS: dict[str, str] = {
    "lora_velora_embed": "VeLoRA",
    "lora_monteclora_sampler": "MonteCLoRA",
}
KASA_PART = "lora_diag"
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")

# Config switches whose variant PEFT cannot merge, with the reason shown to the user.
_REFUSED: tuple[tuple[str, str, str], ...] = (
    (
        "alora_invocation_tokens",
        "aLoRA",
        "aLoRA adapters only act after their invocation tokens, which a merged weight cannot "
        "express; PEFT refuses to merge them too",
    ),
    (
        "arrow_config",
        "Arrow",
        "Arrow routes each token between several LoRA experts at run time; PEFT refuses to "
        "merge it too",
    ),
    (
        "use_qalora",
        "QALoRA",
        "QALoRA adapters act on group-pooled inputs of a GPTQ-quantized base; PEFT refuses to "
        "merge them too",
    ),
    (
        "kasa_config",
        "KaSA",
        "PEFT replaces the base weight with its SVD truncation when it loads a KaSA adapter, "
        "so the merged result depends on an SVD of the base computed at load time (its low "
        "bits vary with the BLAS build), not only on the adapter",
    ),
    (
        "layer_replication",
        "layer replication",
        "layer_replication changes the model's layer structure",
    ),
    (
        "megatron_config",
        "Megatron",
        "Megatron tensor-parallel adapters hold sharded factors; gather them to HF layout first",
    ),
)


@dataclass(frozen=True)
class Variant:
    """What kind of LoRA an adapter is, and whether (and how) it merges."""

    name: str  # LoRA, DoRA, VeLoRA, MonteCLoRA, BD-LoRA, MiCA, KaSA, aLoRA, ...
    refusal: str | None = None  # why it cannot be merged; None when it can
    round_delta: bool = False  # PEFT adds round(Δ) to W (two roundings) for this variant
    bd_nblocks: int = 0  # BD-LoRA: number of diagonal blocks
    bd_a: tuple[str, ...] = ()  # BD-LoRA: module-name substrings with a block-diagonal lora_A
    bd_b: tuple[str, ...] = ()  # ... and with a block-diagonal lora_B

    @property
    def mergeable(self) -> bool:
        return self.refusal is None

    def block_factor(self, module_path: str) -> str | None:
        """BD-LoRA: ``"A"`` or ``"B"`` when that factor of the module is block-diagonal."""
        if not self.bd_nblocks:
            return None
        if any(p in module_path for p in self.bd_a):
            return "A"
        if any(p in module_path for p in self.bd_b):
            return "B"
        return None


def state_part(name: str) -> str | None:
    """The variant whose training-only state tensor ``name`` is (e.g. VeLoRA), or None."""
    for part, variant in STATE_PARTS.items():
        if f".{part}" in f".{name}":
            return variant
    return None


def classify(config: dict[str, Any], tensor_names: list[str] | tuple[str, ...] = ()) -> Variant:
    """The adapter's variant, from its config (and its tensors, when the config was
    written by a PEFT that knew fields the reader's config dropped)."""
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        return Variant(
            str(config.get("peft_type")),
            refusal=f"peft_type {config.get('peft_type')!r} is not LORA",
        )
    init = str(config.get("init_lora_weights", True)).lower()
    if init.startswith(BASE_CHANGING_INITS):
        return Variant(
            init.split("_")[0].upper(),
            refusal=f"init_lora_weights={config['init_lora_weights']!r} mutates the base at load "
            "time; convert it to plain LoRA first (PEFT: save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...))",
        )
    for key, name, why in _REFUSED:
        if config.get(key):
            return Variant(name, refusal=why)
    if any(n.endswith("." + KASA_PART) or f".{KASA_PART}." in n for n in tensor_names):
        return Variant("KaSA", refusal=next(w for k, _, w in _REFUSED if k == "kasa_config"))
    bd = config.get("use_bdlora")
    if bd:
        spec = bd if isinstance(bd, dict) else {}
        nblocks = int(spec.get("nblocks", 1))  # BdLoraConfig's default
        if nblocks <= 0:
            return Variant("BD-LoRA", refusal="use_bdlora gives no positive nblocks")
        return Variant(
            "BD-LoRA",
            round_delta=True,
            bd_nblocks=nblocks,
            bd_a=tuple(spec.get("target_modules_bd_a") or ()),
            bd_b=tuple(spec.get("target_modules_bd_b") or ()),
        )
    if config.get("velora_config") or any(state_part(n) == "VeLoRA" for n in tensor_names):
        return Variant("VeLoRA")
    if config.get("monteclora_config") or any(state_part(n) == "MonteCLoRA" for n in tensor_names):
        return Variant("MonteCLoRA")
    if init == "mica":
        return Variant("MiCA", round_delta=True)
    if config.get("use_dora"):
        return Variant("DoRA")
    return Variant("LoRA")
