"""Where a merge's BASE and ADAPTER come from, and the model card that records them.

BASE and ADAPTER are local paths or Hugging Face Hub ids (``sources/hub.py``); without BASE the
adapter's own ``base_model_name_or_path`` names it. The card (``merge/card.py``) keeps the
names as the user gave them, not the cache folders they resolved to.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lora_cli.adapters.peft import Adapter, find_adapter_files
from lora_cli.io.hub_cache import cached_repo_id
from lora_cli.io.layout import MANIFEST_NAME, MAX_ADAPTER_CONFIG_BYTES, read_json
from lora_cli.io.reader import TensorSource, open_source
from lora_cli.merge.card import MergedAdapter, model_card
from lora_cli.sources.hub import (
    Notice,
    base_from_adapter_config,
    parse_repo_ref,
    resolve_input,
)
from lora_cli.sources.hub_remote import RemoteBase
from lora_cli.sources.hub_remote import remote_base as pin_hub_base

__all__ = ["MergeInputs", "Notice", "merge_card", "resolve_inputs"]


@dataclass(frozen=True)
class MergeInputs:
    base: Path  # local folder or file (a Hub snapshot in the cache for a Hub id)
    adapters: list[Path]
    base_ref: str  # as named: the argument, or the adapter config's base_model_name_or_path
    base_from_config: bool
    remote: RemoteBase | None = None  # a Hub base read from its headers, fetched as read

    def open_base(self) -> TensorSource:
        """The base as a tensor source: remote headers and lazy shards, or the local files."""
        return self.remote.open() if self.remote else open_source(self.base)

    @property
    def adapter(self) -> Path:
        return self.adapters[0]


def resolve_inputs(
    base: Path | str | None,
    adapters: Path | str | Sequence[Path | str],
    *,
    notice: Notice | None = None,
    progress: bool = True,
    remote_base: bool = False,
) -> MergeInputs:
    """Local paths for BASE and every ADAPTER; without BASE, the first adapter's base.
    ``remote_base``: a Hub base (online) is pinned and planned from its headers, its shards
    fetched when read (``sources/hub_remote.py``), instead of downloading its snapshot now."""
    refs = [adapters] if isinstance(adapters, str | Path) else list(adapters)
    paths = [resolve_input(a, "adapter", notice=notice, progress=progress) for a in refs]
    from_config = base is None
    if base is None:
        config_path, _ = find_adapter_files(paths[0])
        config = read_json(config_path, "adapter config", max_bytes=MAX_ADAPTER_CONFIG_BYTES)
        base = base_from_adapter_config(config, config_path, notice)
    remote = pin_hub_base(base, "base", notice, progress) if remote_base else None
    if remote is not None:
        base_path = remote.folder
    else:
        base_path = resolve_input(base, "base", notice=notice, progress=progress)
    return MergeInputs(base_path, paths, str(base), from_config, remote)


def base_hub_id(inputs: MergeInputs, adapter_configs: Sequence[dict]) -> str | None:
    """The base's Hub id for the card's ``base_model``: the id it was named by, the repo of
    the cache snapshot it lives in, else the one the adapter says it was trained on."""
    named = parse_repo_ref(inputs.base_ref)
    if named is not None and not Path(inputs.base_ref).exists():
        return named.repo_id
    cached = cached_repo_id(inputs.base)
    if cached:
        return cached
    for config in adapter_configs:
        trained_on = parse_repo_ref(str(config.get("base_model_name_or_path") or ""))
        if trained_on is not None:
            return trained_on.repo_id
    return None


def merge_card(
    inputs: MergeInputs,
    base_arg: Path | str | None,
    adapters: Sequence[tuple[str, Adapter]],
    options: Sequence[str],
) -> str:
    """The output's README.md for these inputs; ``options`` shape the bytes (``--dtype``…)."""
    command = ["lora", "merge"]
    if base_arg is not None:
        command.append(str(base_arg))
    command += [ref for ref, _ in adapters]
    command += ["-o", "OUTPUT", *options]
    return model_card(
        base_ref=inputs.base_ref,
        base_hub_id=base_hub_id(inputs, [ad.config for _, ad in adapters]),
        adapters=[MergedAdapter(ref, ad.config_path, ad.config) for ref, ad in adapters],
        command=command,
        checksums_name=MANIFEST_NAME,
    )
