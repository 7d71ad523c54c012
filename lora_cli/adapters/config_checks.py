"""Type and range checks for adapter configs, before any field is used.

One layer per format, called by its reader right after the JSON is parsed: PEFT's
``adapter_config.json`` (``check_peft_config``) and mlx-lm's (``check_mlx_config``).
Every field the readers, planners and merge math use is checked here for type, range
and size, so code further down can trust ``int(config["r"])`` and friends, and a bad
file ends in one line naming the file and the field instead of a traceback deep in a
stage. Scales must be finite in float32, where the merge computes (a ``lora_alpha`` of
1e39 is finite for Python but ``inf`` in the merge's ``delta * scale``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lora_cli.adapters.patterns import MAX_PATTERN_CHARS, PatternBudget
from lora_cli.errors import FormatError

# float32's largest finite value: the merge multiplies in float32, so a scale (or alpha,
# which bounds it since r ≥ 1) beyond this is infinite there.
FLOAT32_MAX = 3.4028234663852886e38
# PEFT writes a list target_modules of full names only below 20 entries and condenses the
# rest to suffixes; hand-written lists of full names for the largest MoE (DeepSeek-V3: 61
# layers × 256 experts × 3 projections ≈ 47k) stay under 2¹⁸. Beyond that a list is a
# memory and output-size attack, not a config.
MAX_NAME_LIST = 1 << 18
# rank_pattern/alpha_pattern hold one key per distinct rank/alpha; tools that spell out
# every module (our own convert, ms-swift) stay within the module count of one model.
MAX_PATTERN_KEYS = 1 << 16
# Token ids are below the vocabulary size; the largest vocabularies are ~260k.
MAX_TOKEN_INDEX = 1 << 31

FIX_PEFT = "fix the field, or re-save the adapter with PEFT's save_pretrained"
FIX_MLX = "fix the field, or re-save the adapter with mlx_lm.lora"


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _refuse(path: Path, field: str, what: str, fix: str) -> FormatError:
    return FormatError(f"{path}: {field}: {what}", fix)


def positive_int(path: Path, field: str, value: Any, fix: str) -> int:
    """An integer ≥ 1 (an integral float such as ``8.0`` is read as PEFT would use it)."""
    if _is_number(value) and math.isfinite(value) and value == int(value) and value >= 1:
        return int(value)
    raise _refuse(path, field, f"must be a positive integer, got {value!r} ({_kind(value)})", fix)


def finite_scale(path: Path, field: str, value: Any, fix: str) -> float:
    """A number whose magnitude float32 can hold (NaN, ±Inf, 1e39 are refused)."""
    if not _is_number(value):
        raise _refuse(path, field, f"must be a number, got {value!r} ({_kind(value)})", fix)
    x = float(value) if abs(value) < 1e308 else math.inf  # a huge JSON int
    if not math.isfinite(x) or abs(x) > FLOAT32_MAX:
        raise _refuse(
            path,
            field,
            f"{value!r} is not a finite float32 number: the merge would write NaN/Inf weights",
            fix,
        )
    return x


def _optional_bool(path: Path, config: dict[str, Any], field: str, fix: str) -> None:
    value = config.get(field)
    if value is not None and not isinstance(value, bool):
        raise _refuse(path, field, f"must be true or false, got {value!r} ({_kind(value)})", fix)


def _names(path: Path, field: str, value: Any, *, regex: bool, fix: str) -> None:
    """null, a list of strings (bounded) or, where PEFT allows one, a regex string."""
    if value is None:
        return
    if isinstance(value, str):
        if not regex:
            raise _refuse(path, field, "must be a list of module names", fix)
        if len(value) > MAX_PATTERN_CHARS:
            raise _refuse(
                path,
                field,
                f"pattern of {len(value)} characters is longer than {MAX_PATTERN_CHARS}",
                "list the module names instead of a regex",
            )
        return
    if not isinstance(value, list):
        raise _refuse(path, field, f"must be a list of strings, got {_kind(value)}", fix)
    if len(value) > MAX_NAME_LIST:
        raise _refuse(path, field, f"{len(value)} entries (at most {MAX_NAME_LIST})", fix)
    bad = [v for v in value if not isinstance(v, str)]
    if bad:
        raise _refuse(path, field, f"entry {bad[0]!r} ({_kind(bad[0])}) is not a string", fix)


def _patterns(
    path: Path, field: str, value: Any, budget: PatternBudget, *, rank: bool, fix: str
) -> None:
    """``rank_pattern`` / ``alpha_pattern``: keys that compile in PEFT's suffix template,
    values that are ranks (positive ints) or finite alphas."""
    if value is None:
        return
    if not isinstance(value, dict):
        raise _refuse(path, field, f"must be an object, got {_kind(value)}", fix)
    if len(value) > MAX_PATTERN_KEYS:
        raise _refuse(path, field, f"{len(value)} keys (at most {MAX_PATTERN_KEYS})", fix)
    for key, v in value.items():
        budget.compile(f"{field}[{key!r}]", key, r"(.*\.)?({})$")
        if rank:
            positive_int(path, f"{field}[{key!r}]", v, fix)
        else:
            finite_scale(path, f"{field}[{key!r}]", v, fix)


def _token_indices(path: Path, value: Any, fix: str) -> None:
    field = "trainable_token_indices"
    if value is None:
        return
    lists = value.items() if isinstance(value, dict) else [(None, value)]  # {module: ids} | ids
    for module, ids in lists:
        where = field if module is None else f"{field}[{module!r}]"
        if not isinstance(ids, list):
            raise _refuse(path, where, f"must be a list of token ids, got {_kind(ids)}", fix)
        bad = [i for i in ids if not isinstance(i, int) or isinstance(i, bool) or i < 0]
        if bad:
            raise _refuse(path, where, f"token id {bad[0]!r} is not a non-negative integer", fix)
        if ids and max(ids) >= MAX_TOKEN_INDEX:
            raise _refuse(path, where, f"token id {max(ids)} is not below {MAX_TOKEN_INDEX}", fix)


def _bdlora(path: Path, spec: Any, fix: str) -> None:
    """``use_bdlora``: null, a flag, or BdLoraConfig's fields (``nblocks``, the factor lists)."""
    if spec is None or isinstance(spec, bool):
        return
    if not isinstance(spec, dict):
        raise _refuse(path, "use_bdlora", f"must be an object, got {_kind(spec)}", fix)
    if spec.get("nblocks") is not None:
        positive_int(path, "use_bdlora.nblocks", spec["nblocks"], fix)
    for key in ("target_modules_bd_a", "target_modules_bd_b"):
        _names(path, f"use_bdlora.{key}", spec.get(key), regex=False, fix=fix)


def check_peft_config(config: dict[str, Any], path: Path, budget: PatternBudget) -> None:
    """Refuse a PEFT ``adapter_config.json`` whose fields have the wrong type or range."""
    fix = FIX_PEFT
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str):
        raise _refuse(path, "peft_type", f"must be a string, got {_kind(peft_type)}", fix)
    if "r" in config:
        positive_int(path, "r", config["r"], fix)
    if "lora_alpha" in config:
        finite_scale(path, "lora_alpha", config["lora_alpha"], fix)
    for field in ("use_rslora", "use_dora", "fan_in_fan_out", "lora_bias"):
        _optional_bool(path, config, field, fix)
    _names(path, "target_modules", config.get("target_modules"), regex=True, fix=fix)
    _names(path, "exclude_modules", config.get("exclude_modules"), regex=True, fix=fix)
    _names(path, "modules_to_save", config.get("modules_to_save"), regex=False, fix=fix)
    _names(path, "target_parameters", config.get("target_parameters"), regex=False, fix=fix)
    _patterns(path, "rank_pattern", config.get("rank_pattern"), budget, rank=True, fix=fix)
    _patterns(path, "alpha_pattern", config.get("alpha_pattern"), budget, rank=False, fix=fix)
    _token_indices(path, config.get("trainable_token_indices"), fix)
    _bdlora(path, config.get("use_bdlora"), fix)
    layers = config.get("layers_to_transform")
    listed = isinstance(layers, list) and all(isinstance(i, int) for i in layers)
    if layers is not None and not (isinstance(layers, int) or listed):
        raise _refuse(path, "layers_to_transform", "must be an integer or a list of integers", fix)


def check_mlx_config(config: dict[str, Any], path: Path) -> dict[str, Any]:
    """Refuse an mlx-lm ``adapter_config.json`` with mistyped fields; returns its
    ``lora_parameters`` (an object, possibly empty)."""
    fix = FIX_MLX
    params = config.get("lora_parameters")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise _refuse(path, "lora_parameters", f"must be an object, got {_kind(params)}", fix)
    ftype = config.get("fine_tune_type")
    if ftype is not None and not isinstance(ftype, str):
        raise _refuse(path, "fine_tune_type", f"must be a string, got {_kind(ftype)}", fix)
    if "scale" in params and params["scale"] is not None:
        finite_scale(path, "lora_parameters.scale", params["scale"], fix)
    if params.get("rank") is not None:
        positive_int(path, "lora_parameters.rank", params["rank"], fix)
    _names(path, "lora_parameters.keys", params.get("keys"), regex=False, fix=fix)
    layers = config.get("num_layers")
    if layers is not None and (not isinstance(layers, int) or isinstance(layers, bool)):
        raise _refuse(path, "num_layers", f"must be an integer, got {_kind(layers)}", fix)
    _optional_bool(path, config, "use_dora", fix)
    return params
