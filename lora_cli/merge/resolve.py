"""Which base tensor each adapter entry lands in, and whether it fits there.

Adapter paths come from the model class that was trained; checkpoint names from
the class that saved it. The pairing itself lives below this layer (``lora_cli.names``:
transformers' own rename rules, then lora's prefix rules); this module says whether a
candidate pairing fits (shapes, orientation, ranks), so a rename is accepted only if every
target resolves with compatible shapes; otherwise every offender is reported with the
likely cause. Nothing is ever silently skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from lora_cli.adapters.peft import Adapter, LoraModule
from lora_cli.errors import MergeError
from lora_cli.io.layout import OUTPUT_EMBEDDING
from lora_cli.io.reader import TensorInfo, TensorSource
from lora_cli.names import CONVERTED, MISSING, Resolution, pair_names

# transformers models whose projections are GPT-2 ``Conv1D`` (weight stored (in, out)).
CONV1D_MODEL_TYPES = {"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp"}
CONV1D_LEAVES = {"c_attn", "c_proj", "c_fc", "q_attn"}
INPUT_EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")


def input_embedding(base: TensorSource) -> str | None:
    """The checkpoint's one input embedding, which a tied ``lm_head`` shares; None when there
    is none or more than one, so a tie is never guessed between candidates."""
    names = [n for n in base.names() if n.endswith(INPUT_EMBEDDING_SUFFIXES)]
    return names[0] if len(names) == 1 else None


@dataclass
class _Target:
    """A base tensor an adapter entry wants, before name resolution."""

    name: str
    key: str  # adapter key, for error messages
    what: str  # lora | bias | replace | rows
    module: LoraModule | None = None


def _targets(adapter: Adapter, skip: set[str]) -> list[_Target]:
    out = []
    for module in adapter.modules.values():
        if module.path in skip:
            continue
        for part, key in module.parts.items():
            if part == "lora_B.bias":
                out.append(_Target(module.bias, key, "bias", module))
            elif part in ("lora_A.weight", "lora_embedding_A"):
                out.append(_Target(module.weight, key, "lora", module))
    for name, key in adapter.replacements.items():
        out.append(_Target(name, key, "replace"))
    for module, (key, _) in adapter.token_rows.items():
        out.append(_Target(module + ".weight", key, "rows"))
    return out


def factor_infos(module: LoraModule, adapter: Adapter) -> tuple[TensorInfo, TensorInfo]:
    """Header info of (A, B) as the merge uses them: BD-LoRA's compact block-diagonal
    factor is reported at its expanded shape (``block_diag`` of ``nblocks`` row chunks)."""
    src = adapter.source
    parts = module.parts
    a = src.info(parts.get("lora_A.weight") or parts["lora_embedding_A"])
    b = src.info(parts.get("lora_B.weight") or parts["lora_embedding_B"])
    n = adapter.variant.bd_nblocks
    which = adapter.variant.block_factor(module.path)
    if which == "A" and len(a.shape) == 2:
        a = replace(a, shape=(a.shape[0], a.shape[1] * n))
    elif which == "B" and len(b.shape) == 2:
        b = replace(b, shape=(b.shape[0], b.shape[1] * n))
    return a, b


def lora_kind(module: LoraModule, w: TensorInfo) -> str:
    if module.is_embedding:
        return "embedding"
    if len(w.shape) == 3 and module.parts.get("lora_A.weight"):
        return "conv"
    if len(w.shape) in (4, 5):
        return "conv"
    return "linear"


def fan_in_fan_out(
    module: LoraModule, w: TensorInfo, a: TensorInfo, b: TensorInfo, adapter: Adapter, mt: Any
) -> bool | None:
    """Orientation of a 2-D weight: from the architecture, else from shapes; None = no fit."""
    out_in = (b.shape[0], a.shape[1])
    in_out = (a.shape[1], b.shape[0])
    if mt in CONV1D_MODEL_TYPES:
        ffo = module.path.rsplit(".", 1)[-1] in CONV1D_LEAVES
        return ffo if w.shape == (in_out if ffo else out_in) else None
    if out_in != in_out:
        if w.shape == out_in:
            return False
        return True if w.shape == in_out else None
    return bool(adapter.config.get("fan_in_fan_out", False)) if w.shape == out_in else None


def _check_targets(
    targets: list[_Target],
    mapping: dict[str, str],
    base: TensorSource,
    adapter: Adapter,
    config: dict[str, Any] | None,
    tied_head: bool,
    embed: str | None,
) -> list[str]:
    problems = []
    src = adapter.source
    mt = (config or {}).get("model_type")
    for t in targets:
        name = mapping[t.name]
        if name not in base:
            if tied_head and name == OUTPUT_EMBEDDING and embed:
                w = base.info(embed)
            else:
                problems.append(f"{t.key}: {MISSING} {name!r}")
                continue
        else:
            w = base.info(name)
        if t.what == "replace":
            r = src.info(t.key)
            if r.shape != w.shape and not (
                len(r.shape) == 2
                and len(w.shape) == 2
                and r.shape[1] == w.shape[1]
                and (name.endswith(INPUT_EMBEDDING_SUFFIXES) or name == OUTPUT_EMBEDDING)
            ):
                problems.append(
                    f"{t.key}: shape {list(r.shape)} but base {name} is {list(w.shape)}"
                )
        elif t.what == "rows":
            key, idx = adapter.token_rows[t.name[: -len(".weight")]]
            d = src.info(key)
            if len(w.shape) != 2 or d.shape != (len(idx), w.shape[1]) or max(idx) >= w.shape[0]:
                problems.append(
                    f"{key}: {len(idx)} token rows of shape {list(d.shape)} do not fit "
                    f"{name} {list(w.shape)}"
                )
        elif t.what == "bias":
            assert t.module is not None
            d = src.info(t.module.parts["lora_B.bias"])
            if d.shape != w.shape:
                problems.append(
                    f"{t.key}: shape {list(d.shape)} but base {name} is {list(w.shape)}"
                )
        else:
            assert t.module is not None
            msg = _check_lora_shapes(t.module, w, adapter, mt)
            if msg:
                problems.append(f"{t.key}: {msg} (base {name} is {list(w.shape)})")
    return problems


def _check_lora_shapes(module: LoraModule, w: TensorInfo, adapter: Adapter, mt: Any) -> str:
    src = adapter.source
    parts = module.parts
    block = adapter.variant.block_factor(module.path)
    if block:
        key = parts.get(f"lora_{block}.weight", "")
        rows = src.info(key).shape[0] if key in src.infos and src.info(key).shape else 0
        if rows % adapter.variant.bd_nblocks:
            return (
                f"BD-LoRA lora_{block} has {rows} rows, not a multiple of "
                f"nblocks={adapter.variant.bd_nblocks}"
            )
    if module.is_embedding:
        if "lora_embedding_B" not in parts:
            return "lora_embedding_A without lora_embedding_B"
        a, b = factor_infos(module, adapter)
        if len(w.shape) != 2 or w.shape != (a.shape[1], b.shape[0]) or a.shape[0] != b.shape[1]:
            return f"embedding LoRA A {list(a.shape)} B {list(b.shape)} does not fit"
        out = w.shape[1]
    else:
        if "lora_B.weight" not in parts:
            return "lora_A without lora_B"
        a, b = factor_infos(module, adapter)
        groups = _conv_groups(w.shape, a.shape, b.shape)
        if groups > 1:
            return (
                f"{GROUPED_CONV} (groups={groups}): convolutions with groups > 1 cannot be "
                "merged, PEFT refuses them too"
            )
        if a.shape[0] != b.shape[1]:
            return f"lora_A has rank {a.shape[0]} but lora_B has {b.shape[1]}"
        if len(w.shape) >= 3:
            if len(a.shape) != len(w.shape):
                return f"conv LoRA A {list(a.shape)} does not fit"
            if a.shape[1] != w.shape[1]:
                return f"conv LoRA A {list(a.shape)} does not fit"
            if b.shape[0] != w.shape[0] or a.shape[2:] != w.shape[2:]:
                return f"conv LoRA A {list(a.shape)} B {list(b.shape)} does not fit"
            out = w.shape[0]
        elif len(w.shape) == 2:
            if fan_in_fan_out(module, w, a, b, adapter, mt) is None:
                return f"LoRA A {list(a.shape)} B {list(b.shape)} does not fit"
            out = b.shape[0]
        else:
            return "LoRA target is not a matrix or kernel"
    if module.r != a.shape[0]:
        return f"lora_A has {a.shape[0]} rows but adapter_config.json gives rank {module.r}"
    mag = parts.get("lora_magnitude_vector")
    if mag and src.info(mag).numel != out:
        return f"DoRA magnitude has {src.info(mag).numel} values for {out} outputs"
    return ""


GROUPED_CONV = "LoRA on a grouped convolution"


def _conv_groups(w: tuple[int, ...], a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """``groups`` of a conv LoRA made by PEFT for a grouped base: A sees every input channel
    (``(r, in, *k)``), the base one group's (``(out, in/g, *k)``); 1 when not grouped."""
    if len(w) < 3 or len(a) != len(w) or len(b) != len(w) or not w[1] or a[1] % w[1]:
        return 1
    groups = a[1] // w[1]
    return groups if groups > 1 and a[2:] == w[2:] and b[0] == w[0] else 1


def problem_message(adapter: Adapter, problems: list[str], base: TensorSource) -> str:
    shown = "; ".join(problems[:3])
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    unsupported = [p for p in problems if GROUPED_CONV in p]
    if unsupported and len(unsupported) == len(problems):
        return f"{adapter.root}: cannot merge: {unsupported[0]}" + (
            f" (and {len(unsupported) - 1} more)" if len(unsupported) > 1 else ""
        )
    converted = [p for p in problems if CONVERTED in p]
    if converted:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        return f"{adapter.root}: cannot merge: {converted[0]}{more}"
    missing = sum(MISSING in p for p in problems)
    if missing == len(problems):
        cause = (
            "likely cause: the adapter was trained on a different model or layer count "
            f"than {base.root}"
        )
    elif missing == 0:
        cause = "likely cause: the adapter was trained for a different model size"
    else:
        cause = "likely cause: the adapter does not belong to this base model"
    return (
        f"{adapter.root}: {len(problems)} adapter tensors do not fit the base: "
        f"{shown}{more}; {cause}"
    )


def resolve_targets(
    adapter: Adapter,
    base: TensorSource,
    config: dict[str, Any] | None,
    *,
    skip: set[str],
    tied_head: bool,
    embed: str | None,
) -> tuple[Resolution, bool]:
    """(the accepted pairing of adapter target names with base names, any targets at all)."""
    targets = _targets(adapter, skip)
    names = set(base.names())
    if tied_head:
        names.add(OUTPUT_EMBEDDING)  # written from the embedding when the merge unties it

    def fits(mapping: dict[str, str]) -> list[str]:
        return _check_targets(targets, mapping, base, adapter, config, tied_head, embed)

    resolution = pair_names((t.name for t in targets), names, config, accept=fits)
    if resolution.problems:
        raise MergeError(problem_message(adapter, resolution.problems, base))
    return resolution, bool(targets)
