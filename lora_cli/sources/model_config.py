"""A checkpoint's ``config.json`` as the installed transformers reads it.

Defaults belong to transformers, not to us: ``tie_word_embeddings`` absent from the file means
False for Llama, Qwen2 or Mistral and True for Gemma or GPT-2, and only the model type's own
config class knows which. So the effective value comes from transformers' config classes
(offline, from the dictionary already read from disk; never remote code). For a model type
the installed transformers does not know, what the file states (top level or ``text_config``)
decides, and only a file that states nothing falls back to the base ``PretrainedConfig``; a
config transformers refuses to build falls back to what the file itself says.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

# The key transformers checks on the top-level config, then (composite models) on the text part.
TIE_KEY = "tie_word_embeddings"


def transformers_config(config: dict[str, Any]) -> Any | None:
    """The transformers config object for ``config`` (a parsed config.json), or None when
    transformers cannot build one from it."""
    from transformers import PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    known = _known_type(config)
    classes = [CONFIG_MAPPING[config["model_type"]]] if known else []
    classes.append(PretrainedConfig)
    with quiet_transformers():
        for cls in classes:
            try:
                return cls.from_dict(dict(config))
            except Exception:  # transformers validates values; a config it rejects is not ours
                continue
    return None


def tie_word_embeddings(config: dict[str, Any] | None) -> bool | None:
    """Whether transformers ties ``lm_head`` to the input embeddings for this config;
    None without a config."""
    if config is None:
        return None
    if TIE_KEY in config and not isinstance(config.get("text_config"), dict):
        # stated for a single config: every transformers version takes it as written, and
        # not importing transformers keeps small commands fast
        return bool(config[TIE_KEY])
    if _states_tie(config) and not _known_type(config):
        # the base PretrainedConfig knows nothing of this model (transformers 4.x would say
        # True and ignore text_config): what the file states is the better answer
        return _written_tie(config)
    built = transformers_config(config)
    value = None if built is None else getattr(built, TIE_KEY, None)
    if value is None and built is not None:
        with contextlib.suppress(Exception):  # composite configs keep it on the text part
            value = getattr(built.get_text_config(decoder=True), TIE_KEY, None)
    # transformers had no opinion (unknown or rejected config): what the file says
    return bool(value) if value is not None else _written_tie(config)


def _known_type(config: dict[str, Any]) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config.get("model_type")
    return isinstance(model_type, str) and model_type in CONFIG_MAPPING


def _states_tie(config: dict[str, Any]) -> bool:
    text = config.get("text_config")
    return TIE_KEY in config or (isinstance(text, dict) and TIE_KEY in text)


def _written_tie(config: dict[str, Any]) -> bool:
    """What the file states (top level, else ``text_config``); False when it states nothing."""
    if TIE_KEY in config:
        return bool(config[TIE_KEY])
    text = config.get("text_config")
    return bool(isinstance(text, dict) and text.get(TIE_KEY, False))


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers logs about config keys it renames or ignores; that is not our user's news."""
    logger = logging.getLogger("transformers")  # configured by the import above
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
