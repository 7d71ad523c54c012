"""Which BASE tensor each TUNED tensor is compared with, and what kind of module holds it.

Pairing goes through the one name pairing every command uses (``lora_cli.names``):
transformers' own rename rules, then lora's prefix rules, so a TUNED saved by another
transformers major (or as a bare base model, or a VLM with its ``language_model`` moved)
lines up with BASE exactly as an adapter's targets would.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_cli.errors import MergeError
from lora_cli.extract.experts import FusedParam
from lora_cli.io.layout import OUTPUT_EMBEDDING
from lora_cli.io.reader import TensorSource, open_source
from lora_cli.merge.plan import load_base_config as load_config
from lora_cli.merge.resolve import INPUT_EMBEDDING_SUFFIXES, input_embedding
from lora_cli.names import pair_names
from lora_cli.sources.model_config import tie_word_embeddings

__all__ = ["INPUT_EMBEDDING_SUFFIXES", "load_config", "pair_tensors"]


@dataclass
class Pairing:
    rule: str  # the resolution rule that paired every tensor
    pairs: dict[str, str]  # TUNED tensor name → BASE tensor name
    base_tied: bool  # BASE stores no lm_head.weight: it is the input embedding
    tuned_tied: bool
    embed: str | None  # BASE's input embedding


def pair_tensors(
    base: TensorSource,
    tuned: TensorSource,
    base_config: dict[str, Any] | None,
    tuned_config: dict[str, Any] | None,
    *,
    resized_ok: bool,
) -> Pairing:
    """Pair every TUNED tensor with BASE's, or refuse naming both sides. ``resized_ok``: a
    grown vocabulary (embedding / head rows) is accepted (``--include-full``)."""
    base_tied = bool(tie_word_embeddings(base_config)) and OUTPUT_EMBEDDING not in base
    tuned_tied = bool(tie_word_embeddings(tuned_config)) and OUTPUT_EMBEDDING not in tuned
    embed = input_embedding(base) if base_tied else None
    tied_head = base_tied and embed is not None
    base_names = set(base.names())

    def unpaired(mapping: dict[str, str]) -> list[str]:
        return [
            t
            for t, b in mapping.items()
            if b not in base_names and not (b == OUTPUT_EMBEDDING and tied_head)
        ]

    resolution = pair_names(tuned.names(), base_names, base_config, accept=unpaired)
    label, mapping, missing = resolution.rule, resolution.mapping, resolution.problems
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise MergeError(
            f"{tuned.root}: {missing[0]}: TUNED has a tensor BASE {base.root} lacks{more}",
            "extract from the base TUNED was fine-tuned from (same architecture and size)",
        )
    paired = set(mapping.values())
    lacking = [n for n in base.names() if n not in paired]
    if lacking and not (tuned_tied and lacking == [OUTPUT_EMBEDDING]):
        more = f" (and {len(lacking) - 1} more)" if len(lacking) > 1 else ""
        raise MergeError(
            f"{base.root}: {lacking[0]}: BASE has a tensor TUNED {tuned.root} lacks{more}",
            "extract from the base TUNED was fine-tuned from (same architecture and size)",
        )
    for t, b in mapping.items():
        b_info = base.info(embed if b == OUTPUT_EMBEDDING and b not in base else b)
        t_info = tuned.info(t)
        if t_info.shape == b_info.shape:
            continue
        vocab = (
            (t.endswith(INPUT_EMBEDDING_SUFFIXES) or t == OUTPUT_EMBEDDING)
            and len(t_info.shape) == 2
            and t_info.shape[1:] == b_info.shape[1:]
        )
        if vocab and resized_ok:
            continue
        if vocab:
            raise MergeError(
                f"{tuned.root}: {t}: the vocabulary grew from {b_info.shape[0]} to "
                f"{t_info.shape[0]} rows (BASE {b} is {list(b_info.shape)})",
                "pass --include-full to ship the embedding and head in full (resize the "
                "base's token embeddings before loading the adapter)",
            )
        raise MergeError(
            f"{tuned.root}: {t}: shape {list(t_info.shape)} but BASE {base.root}: {b} is "
            f"{list(b_info.shape)}",
            "extract from the base TUNED was fine-tuned from (same architecture and size)",
        )
    return Pairing(label, mapping, base_tied, tuned_tied, embed)


def open_checkpoint(path: Path) -> TensorSource:
    """A checkpoint as plain tensors: quantized weights (FP8, INT4, MXFP4) dequantized by the
    codecs a merge uses; what cannot be decoded is refused by name when it is read."""
    from lora_cli.sources.quantized import DequantizedSource, detect

    source = open_source(path)
    try:
        scheme = detect(source, load_config(source))
    except BaseException:
        source.close()
        raise
    if scheme.whole is not None:
        source.close()
        fmt, key = scheme.whole
        raise MergeError(
            f"{path}: {fmt}-serialized checkpoint ({key}) cannot be extracted from",
            "extract from the original bf16/fp16 checkpoint instead",
        )
    if scheme.unsupported:
        source.close()
        module, (fmt, key) = next(iter(scheme.unsupported.items()))
        raise MergeError(
            f"{path}: {key}: {fmt} weights cannot be dequantized yet",
            "extract from the original bf16/fp16 checkpoint instead",
        )
    if not scheme.tensors:
        return source
    return DequantizedSource(source, scheme, set(scheme.tensors))


@dataclass
class ModelModules:
    """What the model class holds, from the model built on the meta device."""

    kinds: dict[str, tuple[str, int]] = field(default_factory=dict)  # module → (kind, groups)
    fused: dict[str, FusedParam] = field(default_factory=dict)  # 3-D parameters (MoE experts)


def module_kinds(config: dict[str, Any] | None) -> ModelModules:
    """Module path → (kind, groups) for every module of the model ``config`` describes,
    built on the meta device (no memory, no weights): ``linear``, ``conv1d`` (GPT-2),
    ``embedding``, ``conv`` or ``other``; and its 3-D parameters (fused MoE experts). Empty
    when transformers cannot build it."""
    if not config:
        return ModelModules()
    from lora_cli.sources.model_config import quiet_transformers, transformers_config

    built = transformers_config(config)
    if built is None:
        return ModelModules()
    import logging

    import torch

    model = None
    silenced = logging.root.manager.disable
    logging.disable(logging.WARNING)  # modeling imports log from other libraries (DeepSpeed)
    try:
        import transformers
        from transformers.pytorch_utils import Conv1D

        # the class that saved the checkpoint names its tensors; the Auto classes otherwise
        saved = [getattr(transformers, a, None) for a in config.get("architectures") or []]
        builders = [c._from_config for c in saved if isinstance(c, type)]
        builders += [
            transformers.AutoModelForCausalLM.from_config,
            transformers.AutoModel.from_config,
        ]
        with quiet_transformers(), torch.device("meta"):
            for build in builders:
                try:
                    model = build(built)
                    break
                except Exception:  # an architecture transformers cannot build: shapes decide
                    continue
    finally:
        logging.disable(silenced)
    if model is None:
        return ModelModules()
    found = ModelModules()
    kinds = found.kinds
    for name, mod in model.named_modules():
        own = list(mod.named_parameters(recurse=False))
        layer = (torch.nn.Linear, Conv1D, torch.nn.Embedding, torch.nn.modules.conv._ConvNd)
        for order, (leaf, p) in enumerate(own):  # MoE experts; a conv kernel is a conv's
            if p.ndim == 3 and "experts" in name.rsplit(".", 1)[-1] and not isinstance(mod, layer):
                transposed = bool(getattr(mod, "is_transposed", False))
                path = f"{name}.{leaf}"
                found.fused[path] = FusedParam(path, tuple(p.shape), transposed, order)
        if isinstance(mod, torch.nn.Linear):
            kinds[name] = ("linear", 1)
        elif isinstance(mod, Conv1D):
            kinds[name] = ("conv1d", 1)
        elif isinstance(mod, torch.nn.Embedding):
            kinds[name] = ("embedding", 1)
        elif isinstance(mod, torch.nn.Conv1d | torch.nn.Conv2d | torch.nn.Conv3d):
            kinds[name] = ("conv", mod.groups)
        else:
            kinds[name] = ("other", 1)
    return found
