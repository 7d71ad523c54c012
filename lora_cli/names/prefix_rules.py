"""lora's own prefix rules: the fallback where transformers knows no rename for a model.

They cover checkpoints that transformers loads through ``base_model_prefix`` juggling
rather than a conversion rule (GPT-2's ``transformer.``, a bare base model without
``model.``), and VLM layouts on transformers releases without ``conversion_mapping``.
A rule rewrites each name with its first pair whose result exists in the checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable

# Ordered: (label, [(adapter prefix, checkpoint prefix), ...]).
PREFIX_RULES: list[tuple[str, list[tuple[str, str]]]] = [
    ("strip 'transformer.' (GPT-2 style checkpoint)", [("transformer.", "")]),
    ("add 'transformer.'", [("", "transformer.")]),
    ("strip 'model.' (bare base model)", [("model.", "")]),
    ("add 'model.'", [("", "model.")]),
    (
        "VLM: model. → model.language_model.",
        [("model.language_model.", "model.language_model."), ("model.", "model.language_model.")],
    ),
    (
        "VLM: model.language_model. → model.",
        [("model.language_model.", "model."), ("model.visual.", "visual.")],
    ),
    (
        "VLM: model.language_model. → language_model.model.",
        [
            ("model.language_model.", "language_model.model."),
            ("lm_head.", "language_model.lm_head."),
            ("model.vision_tower.", "vision_tower."),
            ("model.multi_modal_projector.", "multi_modal_projector."),
        ],
    ),
    (
        "VLM: language_model.model. → model.language_model.",
        [
            ("language_model.model.", "model.language_model."),
            ("language_model.lm_head.", "lm_head."),
        ],
    ),
    ("VLM: model. → language_model.model.", [("model.", "language_model.model.")]),
    ("drop doubled 'model.'", [("model.model.", "model.")]),
]


def apply_prefix_rule(
    name: str, rule: list[tuple[str, str]], present: Callable[[str], bool]
) -> tuple[str, str | None]:
    """(checkpoint name, the ``"src → dst"`` pair used or None): ``name`` itself when it is
    present or no pair gives a present name."""
    if present(name):
        return name, None
    for src, dst in rule:
        if name.startswith(src):
            candidate = dst + name[len(src) :]
            if present(candidate):
                return candidate, f"{src or '^'} → {dst or '^'}"
    return name, None
