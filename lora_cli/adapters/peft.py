"""PEFT-format adapters (PEFT, ms-swift, LLaMA-Factory, axolotl, unsloth, transformers).

They all write ``adapter_config.json`` beside ``adapter_model.safetensors`` or
``adapter_model.bin``; they differ in key spellings (adapter names left in,
``modules_to_save`` infixes, prefixes) and in config details (regex
``target_modules``). This module turns any of them into one canonical ``Adapter``
whose modules are discovered from the tensor keys, never from ``target_modules``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_cli.adapters.config_checks import (
    FIX_PEFT,
    check_peft_config,
    finite_scale,
    positive_int,
)
from lora_cli.adapters.patterns import PatternBudget
from lora_cli.adapters.variants import BASE_CHANGING_INITS, Variant, classify, state_part
from lora_cli.errors import FormatError, MergeError
from lora_cli.io.adapter_files import CONFIG_NAME, WEIGHT_NAMES
from lora_cli.io.dtypes import FLOAT_DTYPES
from lora_cli.io.layout import MAX_ADAPTER_CONFIG_BYTES, read_json
from lora_cli.io.reader import TensorSource, open_source

PREFIX = "base_model.model."
# Parts of a LoRA module, as PEFT saves them (after the module path).
LORA_PARTS = (
    "lora_A.weight",
    "lora_B.weight",
    "lora_B.bias",
    "lora_embedding_A",
    "lora_embedding_B",
    "lora_magnitude_vector",
    "lora_diag",
)
TOKEN_DELTA = "token_adapter.trainable_tokens_delta"


@dataclass
class LoraModule:
    """One adapted module: its factors (source keys) and its effective rank/alpha."""

    path: str
    parts: dict[str, str] = field(default_factory=dict)  # part name → adapter tensor key
    r: int = 0
    alpha: float = 0.0
    scale: float = 1.0
    # The base tensor the delta lands in: ``<path>.weight`` with PEFT's ``base_layer.``
    # nesting removed; ``in_proj_weight`` for an ``nn.MultiheadAttention`` module.
    weight: str = ""
    # "" for ordinary layers; "mha_in" / "mha_out" for the two halves of a LoRA on an
    # ``nn.MultiheadAttention`` (PEFT merges those with their own rounding, see merge/math.py).
    role: str = ""

    def __post_init__(self) -> None:
        if not self.weight:  # readers other than PEFT's (mlx-lm, GGUF, checkpoints, experts)
            self.weight = _strip_base_layer(self.path + ".") + "weight"

    @property
    def bias(self) -> str:
        """The base bias a ``lora_B.bias`` is added to."""
        return _strip_base_layer(self.path + ".") + "bias"

    @property
    def is_embedding(self) -> bool:
        return "lora_embedding_A" in self.parts

    @property
    def has_dora(self) -> bool:
        return "lora_magnitude_vector" in self.parts


@dataclass
class Adapter:
    root: Path
    weights_file: Path
    config_path: Path
    config: dict[str, Any]
    source: TensorSource
    modules: dict[str, LoraModule]
    replacements: dict[str, str]  # base tensor name → adapter key (full tensors)
    token_rows: dict[str, tuple[str, list[int]]]  # embedding module → (key, indices)
    non_adapter: list[str]  # tensors that are not part of the adapter
    key_renames: dict[str, str]  # original key → PEFT saved form, where they differ
    producer: str
    variant: Variant = field(default_factory=lambda: Variant("LoRA"))
    variant_state: list[str] = field(default_factory=list)  # training-only variant tensors
    warnings: list[str] = field(default_factory=list)
    # The on-disk format ("peft", "mlx-lm", "gguf"); other formats are presented in PEFT's
    # saved key form with a synthesized PEFT config, and keep their own facts in ``native``.
    format: str = "peft"
    native: dict[str, Any] = field(default_factory=dict)
    # The NaN/Inf scan of the weights (torch) is left to the merge run, which does it before
    # the first merged tensor (``check_adapter_values``): planning then needs no torch.
    values_pending: bool = False
    # The time left for this config's regexes (target_modules, rank/alpha patterns).
    patterns: PatternBudget | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.patterns is None:
            self.patterns = PatternBudget(self.config_path)

    @property
    def peft_type(self) -> str:
        return str(self.config.get("peft_type", ""))

    def close(self) -> None:
        self.source.close()


def find_adapter_files(path: Path) -> tuple[Path, Path]:
    """(config, weights) for an adapter folder or weights file; safetensors wins over .bin."""
    path = Path(path)
    if path.is_file():
        config = path.parent / CONFIG_NAME
        if not config.is_file():
            raise FormatError(
                f"{path}: no {CONFIG_NAME} beside the adapter weights",
                "put the adapter's config next to it (r and lora_alpha cannot be recovered "
                "from the weights)",
            )
        return config, path
    if not path.is_dir():
        raise FormatError(f"{path}: no such file or directory")
    config = path / CONFIG_NAME
    if not config.is_file():
        subs = [p for p in path.iterdir() if (p / CONFIG_NAME).is_file()] if path.is_dir() else []
        hint = (
            f"adapters were found in subfolders: {', '.join(p.name for p in subs)}"
            if subs
            else "point at the folder holding adapter_config.json"
        )
        raise FormatError(f"{path}: not an adapter folder (no {CONFIG_NAME})", hint)
    for name in WEIGHT_NAMES:
        if (path / name).is_file():
            return config, path / name
    raise FormatError(
        f"{path}: {CONFIG_NAME} found but no adapter_model.safetensors or adapter_model.bin",
        "the adapter weights were not saved; check the trainer's output folder",
    )


def load_adapter(path: Path) -> Adapter:
    """Read config and tensor listing (no tensor data) and classify every key."""
    config_path, weights = find_adapter_files(path)
    config = read_json(config_path, "adapter config", max_bytes=MAX_ADAPTER_CONFIG_BYTES)
    if "peft_type" not in config:
        raise FormatError(f"{config_path}: no 'peft_type'", "this is not a PEFT adapter config")
    check_peft_config(config, config_path, PatternBudget(config_path))  # before any I/O
    source = open_source(weights)
    try:
        adapter = classify_adapter(config_path.parent, weights, config_path, config, source)
    except BaseException:
        source.close()
        raise
    return adapter


def _normalize_key(key: str) -> str:
    """PEFT's saved form: no adapter-name component, no ``modules_to_save.<name>`` infix."""
    parts = key.split(".")
    out: list[str] = []
    i = 0
    while i < len(parts):
        p = parts[i]
        out.append(p)
        if p in ("lora_A", "lora_B") and i + 2 < len(parts) and parts[i + 2] in ("weight", "bias"):
            i += 2  # skip adapter name
            continue
        if p in (
            "lora_embedding_A",
            "lora_embedding_B",
            "lora_magnitude_vector",
            "lora_diag",
            "trainable_tokens_delta",
        ) and i + 1 < len(parts):
            # "<part>.<adapter>" or "<part>.<adapter>.weight": drop the rest
            break
        if p == "modules_to_save" and i + 2 < len(parts):  # modules_to_save.<adapter>.<param>
            out.pop()
            i += 2  # drop "modules_to_save.<adapter>"
            continue
        if p == "modules_to_save" and i + 2 == len(parts):
            # bias="all" also saves the copy's bias as "<module>.modules_to_save.bias"
            out.pop()
        i += 1
    return ".".join(out)


def _split_lora(key: str) -> tuple[str, str] | None:
    for part in LORA_PARTS:
        if key.endswith("." + part):
            return key[: -len(part) - 1], part
    return None


def _strip_base_layer(name: str) -> str:
    name = name.replace(".token_adapter.base_layer.", ".")
    while ".base_layer." in name:
        name = name.replace(".base_layer.", ".")
    return name


MHA_OUT = ".base_layer.out_proj"  # PEFT nests the out_proj LoRA of an nn.MultiheadAttention


def _assign_weights(modules: dict[str, LoraModule]) -> None:
    """Each module's base tensor; the two halves of an ``nn.MultiheadAttention`` LoRA."""
    for path, module in modules.items():
        module.weight = _strip_base_layer(path + ".") + "weight"
        if path + MHA_OUT in modules:
            module.weight, module.role = _strip_base_layer(path + ".") + "in_proj_weight", "mha_in"
        elif path.endswith(MHA_OUT) and path[: -len(MHA_OUT)] in modules:
            # PEFT builds the out_proj LoRA with the attention module's own rank and alpha
            outer = modules[path[: -len(MHA_OUT)]]
            module.role, module.r, module.alpha, module.scale = (
                "mha_out",
                outer.r,
                outer.alpha,
                outer.scale,
            )


def pattern_value(
    patterns: dict[str, Any] | None, name: str, budget: PatternBudget, field: str
) -> tuple[str, Any] | None:
    """PEFT's ``get_pattern_key``: first key (dict order) matching a dotted suffix wins;
    ``(field[key], value)`` or None."""
    key = budget.suffix_key(field, list(patterns or {}), name)
    return None if key is None else (f"{field}[{key!r}]", patterns[key])  # type: ignore[index]


def scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """PEFT's per-module scale: ``alpha / r``, or ``alpha / sqrt(r)`` with rslora."""
    if r <= 0:
        raise MergeError(f"LoRA rank must be positive, got r={r}")
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def module_scale(
    config: dict[str, Any], name: str, budget: PatternBudget
) -> tuple[int, float, float]:
    """(r, alpha, scale) for one module, with rank/alpha patterns applied as PEFT does.

    The config has passed ``check_peft_config`` (or was synthesized by a reader); the
    scale is checked once more, as the merge will use it, so a file a reader did not
    check still cannot make the merge multiply by NaN or Inf."""
    path = budget.config_path
    rank = pattern_value(config.get("rank_pattern"), name, budget, "rank_pattern")
    alpha = pattern_value(config.get("alpha_pattern"), name, budget, "alpha_pattern")
    r_field, r = rank or ("r", config.get("r", 8))
    a_field, a = alpha or ("lora_alpha", config.get("lora_alpha", 8))
    r = positive_int(path, r_field, r, FIX_PEFT)
    a = finite_scale(path, a_field, a, FIX_PEFT)
    return r, a, scaling(r, a, bool(config.get("use_rslora")))


def detect_producer(root: Path, config: dict[str, Any]) -> str:
    """A hint for people: which tool most likely wrote this adapter."""
    if any((root / n).is_file() for n in ("additional_config.json", "args.json", "sft_args.json")):
        return "ms-swift"
    if isinstance(config.get("target_modules"), str) and config["target_modules"] != "all-linear":
        return "ms-swift (regex target_modules)"
    if (root / "trainer_state.json").is_file() or (root / "training_args.bin").is_file():
        return "PEFT (HF Trainer)"
    # PeftModel.save_pretrained always writes inference_mode=true, and fills auto_mapping
    # when task_type is null; transformers' own add_adapter/save_pretrained does neither.
    if config.get("inference_mode") is False or (
        "peft_version" in config
        and config.get("task_type") is None
        and not config.get("auto_mapping")
    ):
        return "transformers integration"
    if config.get("peft_version") is None and config.get("auto_mapping") is None:
        return "PEFT-compatible"
    return "PEFT"


def classify_adapter(
    root: Path,
    weights: Path,
    config_path: Path,
    config: dict[str, Any],
    source: TensorSource,
) -> Adapter:
    """The canonical Adapter from a PEFT config (type-checked here: every PEFT-config
    reader, training checkpoints included, comes through) and a tensor listing."""
    budget = PatternBudget(config_path)
    check_peft_config(config, config_path, budget)
    modules: dict[str, LoraModule] = {}
    replacements: dict[str, str] = {}
    token_rows: dict[str, tuple[str, list[int]]] = {}
    non_adapter: list[str] = []
    variant_state: list[str] = []
    renames: dict[str, str] = {}
    keys = source.names()
    prefixed = any(k.startswith(PREFIX) for k in keys)
    for key in keys:
        norm = _normalize_key(key)
        if norm.endswith(".original_module.weight") or ".original_module." in norm:
            non_adapter.append(key)
            continue
        if norm != key:
            renames[key] = norm
        if prefixed and not norm.startswith(PREFIX) and "lora_" not in norm:
            non_adapter.append(key)
            continue
        name = norm[len(PREFIX) :] if norm.startswith(PREFIX) else norm
        if state_part(name):
            variant_state.append(key)
            continue
        split = _split_lora(name)
        if split:
            path, part = split
            modules.setdefault(path, LoraModule(path)).parts[part] = key
        elif name.endswith("." + TOKEN_DELTA):
            module = name[: -len(TOKEN_DELTA) - 1]
            token_rows[module] = (key, _token_indices(config, module))
        else:
            target = _strip_base_layer(name)
            previous = replacements.get(target)
            if previous is not None:
                # one tensor saved twice (bias="all" + modules_to_save): keep the plain key
                if norm != key:
                    non_adapter.append(key)
                    continue
                non_adapter.append(previous)
            replacements[target] = key
    for path, module in modules.items():
        module.r, module.alpha, module.scale = module_scale(config, path, budget)
    _assign_weights(modules)
    adapter = Adapter(
        root=root,
        weights_file=weights,
        config_path=config_path,
        config=config,
        source=source,
        modules=modules,
        replacements=replacements,
        token_rows=token_rows,
        non_adapter=non_adapter,
        key_renames=renames,
        producer=detect_producer(root, config),
        variant=classify(config, keys),
        variant_state=variant_state,
        patterns=budget,
    )
    adapter.warnings = adapter_warnings(adapter)
    return adapter


def _token_indices(config: dict[str, Any], module: str) -> list[int]:
    spec = config.get("trainable_token_indices")
    if isinstance(spec, list):
        return [int(i) for i in spec]
    if isinstance(spec, dict):
        for name, idx in spec.items():
            if module == name or module.endswith("." + name):
                return [int(i) for i in idx]
    raise FormatError(
        f"adapter has trainable-token rows for {module!r} but trainable_token_indices in "
        "adapter_config.json does not list its indices"
    )


def adapter_warnings(adapter: Adapter) -> list[str]:
    """Problems worth telling a person about; merge turns the serious ones into errors."""
    out = []
    cfg = adapter.config
    infos = adapter.source.infos
    zero = [k for k, i in infos.items() if i.numel == 0]
    if zero:
        out.append(
            f"{len(zero)} zero-size tensors (e.g. {zero[0]}): a DeepSpeed ZeRO-3 placeholder "
            "save; re-export the adapter with gathered weights"
        )
    if not adapter.modules and not adapter.replacements and not adapter.token_rows:
        out.append("the adapter holds no LoRA tensors (empty save)")
    if adapter.non_adapter:
        out.append(
            f"{len(adapter.non_adapter)} non-adapter tensors (e.g. {adapter.non_adapter[0]})"
        )
    if adapter.source.skipped:
        out.append(
            f"{len(adapter.source.skipped)} non-tensor entries in {adapter.weights_file.name}"
        )
    init = str(cfg.get("init_lora_weights", True)).lower()
    if init.startswith(BASE_CHANGING_INITS):
        out.append(
            f"init_lora_weights={cfg['init_lora_weights']!r} changes the base weights: convert "
            "the adapter to plain LoRA (PEFT save_pretrained with "
            "path_initial_model_for_weight_conversion) before merging"
        )
    for module in adapter.modules.values():
        a = module.parts.get("lora_A.weight") or module.parts.get("lora_embedding_A")
        rows = infos[a].shape[0] if a and infos[a].shape and infos[a].numel else module.r
        if rows != module.r and not cfg.get("target_parameters"):
            out.append(
                f"{module.path}: lora_A has {infos[a].shape[0]} rows but the config rank "
                f"is {module.r}"
            )
            break
    return out


def unmergeable_reasons(adapter: Adapter) -> list[str]:
    """Why a merge would be wrong for this adapter's variant; merge refuses these."""
    v = adapter.variant
    return [] if v.mergeable else [f"{v.name} adapter: {v.refusal}"]


def check_adapter_tensors(adapter: Adapter) -> None:
    """Refuse adapters whose weights are broken: what merge or convert would write from
    them is broken too (a ZeRO-3 placeholder save, a diverged run)."""
    zero = [k for k, i in adapter.source.infos.items() if i.numel == 0]
    if zero:
        raise MergeError(
            f"{adapter.weights_file}: tensor {zero[0]!r} is empty"
            + (f" (and {len(zero) - 1} more)" if len(zero) > 1 else ""),
            "a DeepSpeed ZeRO-3 placeholder save; re-export the adapter with gathered weights",
        )
    if not adapter.values_pending:
        check_adapter_values(adapter)


def check_adapter_values(adapter: Adapter) -> None:
    """The weights' NaN/Inf scan of ``check_adapter_tensors`` (a deferred one included)."""
    adapter.values_pending = False
    bad = nonfinite_tensors(adapter)
    if bad:
        key, count = bad[0]
        raise MergeError(
            f"{adapter.weights_file}: tensor {key!r} has {count} NaN/Inf values",
            "the training run diverged; use an earlier checkpoint",
        )


def nonfinite_tensors(adapter: Adapter) -> list[tuple[str, int]]:
    """(key, count) of every adapter tensor holding NaN or Inf values."""
    import torch

    out = []
    for key in adapter.source.names():
        if adapter.source.info(key).dtype not in FLOAT_DTYPES:
            continue
        t = adapter.source.read(key)
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            out.append((key, bad))
    return out


def regex_matches(adapter: Adapter, pattern: str) -> tuple[list[str], list[str]]:
    """Which adapter modules PEFT's ``re.fullmatch`` of a string target_modules selects.

    An invalid regex selects nothing (PEFT would fail to load it: ``validate`` reports
    that); a runaway one is refused within the adapter's pattern budget."""
    modules = sorted(adapter.modules)
    budget = adapter.patterns or PatternBudget(adapter.config_path)
    if not budget.valid("target_modules", pattern):
        return [], modules
    matched = budget.fullmatch("target_modules", pattern, modules)
    return matched, sorted(set(modules) - set(matched))


def looks_like_peft_state_dict(source: TensorSource) -> bool:
    """LoRA factor names in a plain state dict: an adapter saved without its config."""
    return any(".lora_A." in n or ".lora_B." in n for n in source.names())
