"""transformers' own checkpoint ↔ runtime renames, as a function on names.

transformers 5 loads old checkpoints through per-model rules (``conversion_mapping``):
``WeightRenaming`` rewrites a key (Mllama ``language_model.model.`` → ``model.language_model.``,
ViT ``attention.attention.query`` → ``attention.q_proj``, Nemotron-H ``backbone.`` →
``model.``), ``WeightConverter`` also changes tensors (per-expert weights fused into one,
qkv split). PEFT names adapter modules as the model runs, while the checkpoint on disk keeps
the names it was saved with, so both sides are brought to runtime names with the very rules
transformers applies at load (``get_model_conversion_mapping`` on the config's model class,
built on the meta device, and ``core_model_loading.rename_source_key``). A runtime name is
the meeting point, so pairing works in both directions (legacy checkpoint + new adapter,
new checkpoint + legacy adapter).
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RuntimeName:
    """A name as the loaded model holds it, and how transformers got there."""

    name: str
    rules: tuple[str, ...]  # renamings that fired, "source → target" as transformers writes them
    converter: str | None = None  # a shape-changing WeightConverter that consumed the name
    converted: tuple[str, ...] = ()  # with a converter: every runtime name it produces


class TransformersRules:
    """The renames transformers applies when it loads a checkpoint for one model class."""

    def __init__(self, model: Any, transforms: list[Any], version: str) -> None:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming

        self.model_class = type(model).__name__
        self.label = f"transformers {version} rename rules ({self.model_class})"
        self._prefix = getattr(model, "base_model_prefix", None) or None
        self._runtime = dict.fromkeys(model.state_dict())
        self._renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        self._converters = [t for t in transforms if isinstance(t, WeightConverter)]
        legacy = get_checkpoint_conversion_mapping("legacy") or []
        self._legacy = {_describe(t) for t in legacy}

    @property
    def renames_anything(self) -> bool:
        """Whether the model has rules of its own (not only transformers' "legacy" set)."""
        return any(_describe(t) not in self._legacy for t in self._renamings + self._converters)

    def renamed(self, name: str) -> str:
        """``name`` after the renamings alone, before any converter fuses it: Nemotron-H's
        ``backbone.layers.1.mixer.experts.0.up_proj.weight`` is
        ``model.layers.1.mixer.experts.0.up_proj.weight``, one expert's piece of the fused
        ``model.layers.1.mixer.experts.up_proj`` that PEFT's ``target_parameters`` names."""
        for renaming in self._renamings:
            name, _ = _quiet_rename(renaming, name)
        return name

    def to_runtime(self, name: str) -> RuntimeName:
        """``name`` (a checkpoint key, old or new layout) as the loaded model names it."""
        from transformers.core_model_loading import rename_source_key

        fired = []
        key = name
        for renaming in self._renamings:
            new, _ = _quiet_rename(renaming, key)
            if new != key:
                fired.append(_describe(renaming))
                key = new
        converter, converted = None, ()
        for conv in self._converters:
            new, pattern = _quiet_rename(conv, key)
            if pattern is not None:
                converter, first = _describe(conv), conv.target_patterns[0]
                key = new
                converted = tuple(new.replace(first, t, 1) for t in conv.target_patterns)
                break
        final, _ = rename_source_key(
            name, self._renamings, self._converters, self._prefix, self._runtime
        )
        if final != key:
            fired.append(f"base_model_prefix {self._prefix!r}")
        if converter is not None:
            converted = tuple(c.replace(key, final, 1) if c == key else c for c in converted)
        return RuntimeName(final, tuple(fired), converter, converted)


def _quiet_rename(transform: Any, key: str) -> tuple[str, str | None]:
    """``rename_source_key`` of one transform, leaving its ``was_used`` flag as it was (the
    flag steers transformers' own save path, and these transforms are ours alone anyway)."""
    before = transform._was_used
    try:
        return transform.rename_source_key(key)
    finally:
        transform._was_used = before


def _describe(transform: Any) -> str:
    src = ", ".join(transform.source_patterns)
    dst = ", ".join(transform.target_patterns)
    scope = f" (under {transform.scope_prefix}.)" if getattr(transform, "scope_prefix", "") else ""
    return f"{src} → {dst}{scope}"


@contextlib.contextmanager
def _transformers_quiet() -> Iterator[None]:
    """transformers logs config sanity warnings to stderr while it builds a model: the CLI's
    output stays ours."""
    from transformers.utils import logging

    before = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(before)


_FLOATS = {"Infinity": float("inf"), "-Infinity": float("-inf"), "NaN": float("nan")}


def _special_floats(obj: Any) -> Any:
    """config.json spells non-finite floats ``{"__float__": "Infinity"}``; transformers'
    config classes want the floats back (its reader decodes them the same way)."""
    if isinstance(obj, dict):
        if set(obj) == {"__float__"} and obj["__float__"] in _FLOATS:
            return _FLOATS[obj["__float__"]]
        return {k: _special_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_special_floats(v) for v in obj]
    return obj


def transformers_rules(
    config: dict[str, Any] | None, tensor_count: int | None = None
) -> TransformersRules | None:
    """transformers' rules for the model ``config`` describes, or None where it has none
    (no config, an unknown model type or class, transformers before ``conversion_mapping``).

    The rules come from building the model class on the meta device, which costs time in
    proportion to its layer and expert counts: a config.json (from a stranger) that claims
    far more layers or experts than the checkpoint has tensors gets no rules, not a hang.
    """
    if not config or not isinstance(config.get("model_type"), str):
        return None
    if tensor_count is not None and _largest_count(config) > 8 * tensor_count + 1024:
        return None  # (defaults such as an unused expert count stay far below this)
    return _rules_for(json.dumps(config, sort_keys=True, default=str))


# Config keys that count modules: num_hidden_layers, n_layer, num_local_experts, depth, …
_COUNT_KEY = re.compile(r"^(n|num)_\w*(layers?|experts)$|^depth$|_num_layers$")


def _largest_count(config: Any) -> int:
    """The largest layer / expert / block count anywhere in ``config`` (sub-configs too)."""
    if isinstance(config, dict):
        found = [
            v
            for k, v in config.items()
            if _COUNT_KEY.search(str(k)) and isinstance(v, int) and not isinstance(v, bool)
        ]
        found += [_largest_count(v) for v in config.values() if isinstance(v, (dict, list))]
        return max(found, default=0)
    if isinstance(config, list):
        return max((_largest_count(v) for v in config), default=0)
    return 0


@functools.lru_cache(maxsize=8)
def _rules_for(config_json: str) -> TransformersRules | None:
    try:
        import torch
        import transformers
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import rename_source_key  # noqa: F401
    except ImportError:  # transformers < 5: no rules to use (the prefix rules remain)
        return None
    config = _special_floats(json.loads(config_json))
    archs = config.get("architectures")
    if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
        return None
    model_class = getattr(transformers, archs[0], None)
    if not (
        isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel)
    ):
        return None  # only a model class is ever built (a config names it, strangers write it)
    try:
        with _transformers_quiet(), torch.device("meta"):
            cfg = transformers.AutoConfig.for_model(**config)
            model = model_class(cfg)
            transforms = get_model_conversion_mapping(model)
            return TransformersRules(model, transforms, transformers.__version__)
    except Exception:  # noqa: BLE001 - a config transformers cannot build: no rules from it
        return None
