"""A PeftModel training checkpoint → base tensors (HF names) + a canonical ``Adapter``.

A full PeftModel state dict (from ``torch.save``, safetensors, accelerate, DeepSpeed or
FSDP) names tensors the way the wrapped model holds them in memory:
``base_model.model.<m>.base_layer.weight`` next to ``<m>.lora_A.<adapter>.weight``,
``<m>.original_module.weight`` next to ``<m>.modules_to_save.<adapter>.weight``,
``<m>.token_adapter.base_layer.weight`` next to ``…trainable_tokens_delta.<adapter>``.
Base tensors are renamed to the model's own names (the view the merge reads as "base");
LoRA factors, ``modules_to_save`` copies and token deltas become the adapter, classified
by the same code as a PEFT adapter folder. Trained base parameters (an unfrozen
embedding) are simply base tensors whose checkpoint values are the trained ones.

The scale is not in the weights: ``lora_alpha`` (and rsLoRA, patterns) must come from an
``adapter_config.json`` in or beside the checkpoint, or ``--adapter-config``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_cli.adapters.peft import PREFIX, Adapter, classify_adapter
from lora_cli.errors import FormatError
from lora_cli.io.adapter_files import CONFIG_NAME
from lora_cli.io.dtypes import FLOAT_DTYPES
from lora_cli.io.layout import OUTPUT_EMBEDDING, read_json
from lora_cli.io.reader import TensorSource, open_source
from lora_cli.sources.checkpoint_detect import TrainingCheckpoint
from lora_cli.sources.model_config import tie_word_embeddings
from lora_cli.sources.view import ViewSource

_ADAPTER_MARKS = (".lora_", ".modules_to_save.", ".trainable_tokens_delta")


def is_adapter_key(name: str) -> bool:
    return any(m in name for m in _ADAPTER_MARKS)


def base_name(name: str) -> str:
    """In-memory PEFT name of a base tensor → the model's own name."""
    if name.startswith(PREFIX):
        name = name[len(PREFIX) :]
    for wrapper in (".token_adapter.base_layer.", ".original_module.", ".base_layer."):
        while wrapper in name:
            name = name.replace(wrapper, ".")
    return name


def find_adapter_config(ckpt: TrainingCheckpoint, given: Path | None) -> Path | None:
    """``--adapter-config`` (file or folder), else adapter_config.json in or beside CKPT."""
    if given is not None:
        given = Path(given)
        path = given / CONFIG_NAME if given.is_dir() else given
        if not path.is_file():
            raise FormatError(f"{given}: no {CONFIG_NAME} there")
        return path
    for folder in (ckpt.folder, ckpt.folder.parent):
        if (folder / CONFIG_NAME).is_file():
            return folder / CONFIG_NAME
    return None


@dataclass
class SplitCheckpoint:
    """The base view, the adapter (None for a plain model) and what was decided."""

    base: ViewSource
    adapter: Adapter | None
    config: dict[str, Any] | None  # the model's config.json, if one is known
    config_root: Path | None
    from_base: list[str] = field(default_factory=list)  # tensors taken from --base
    notes: list[str] = field(default_factory=list)

    def close(self) -> None:
        if self.adapter is not None:
            self.adapter.close()
        self.base.close()


def _aliases(source: TensorSource) -> dict[str, str]:
    """``safetensors.torch.save_model`` keeps one name per storage and records the dropped
    ones as ``__metadata__ {dropped: kept}``."""
    out = {}
    for meta in source.file_metadata.values():
        for dropped, kept in meta.items():
            if dropped != "format" and dropped not in source.infos and kept in source.infos:
                out[dropped] = kept
    return out


def split_checkpoint(
    ckpt: TrainingCheckpoint,
    *,
    base: Path | None = None,
    adapter_config: Path | None = None,
) -> SplitCheckpoint:
    """Base view + adapter. Raises when LoRA tensors are present but no config gives alpha."""
    raw = ckpt.source
    members: dict[str, tuple[TensorSource, str, str | None]] = {}
    for dropped, kept in _aliases(raw).items():
        members[dropped] = (raw, kept, f"alias:{kept}")
    kept = {k for _, k, _ in members.values()}
    for name in raw.names():
        members[name] = (raw, name, f"alias:{name}" if name in kept else None)
    adapter_keys = [n for n in members if is_adapter_key(n)]
    base_members: dict[str, tuple[TensorSource, str, str | None]] = {}
    for name, member in members.items():
        if name not in adapter_keys:
            base_members.setdefault(base_name(name), member)
    base_src = open_source(Path(base)) if base is not None else None
    owned = [raw] + ([base_src] if base_src else [])
    from_base: list[str] = []
    if base_src is not None:
        for name in base_src.names():
            if name not in base_members:
                base_members[name] = (base_src, name, None)
                from_base.append(name)
    config_root = Path(base) if base is not None else None
    if config_root is not None and config_root.is_file():
        config_root = config_root.parent
    if (
        config_root is None
        and ckpt.kind == "state-dict"
        and (ckpt.folder / "config.json").is_file()
    ):
        config_root = ckpt.folder
    config = None
    if config_root is not None and (config_root / "config.json").is_file():
        config = read_json(config_root / "config.json", "model config")
    notes: list[str] = []
    if from_base:
        notes.append(f"{len(from_base)} tensors not in the checkpoint taken from --base")
    _drop_tied_copies(base_members, adapter_keys, members, config, notes)
    # the view's root is where the merge copies config and side files from; a training
    # folder's own files (latest, optimizer states, trainer state) are never copied
    root = config_root or ckpt.folder / ".lora-no-side-files"
    view = ViewSource(root, ckpt.source.format, base_members, owned)
    split = SplitCheckpoint(view, None, config, config_root, from_base, notes)
    if not adapter_keys:
        return split
    config_path = find_adapter_config(ckpt, adapter_config)
    if config_path is None:
        view.close()
        raise FormatError(
            f"{ckpt.path}: LoRA tensors but no {CONFIG_NAME} in or beside the checkpoint",
            "pass --adapter-config PATH (lora_alpha cannot be recovered from the weights)",
        )
    adapter_cfg = read_json(config_path, "adapter config")
    if "peft_type" not in adapter_cfg:
        view.close()
        raise FormatError(f"{config_path}: no 'peft_type'", "this is not a PEFT adapter config")
    adapter_view = ViewSource(
        ckpt.folder, ckpt.source.format, {k: members[k] for k in adapter_keys}, []
    )
    try:
        split.adapter = classify_adapter(
            ckpt.folder, ckpt.path, config_path, adapter_cfg, adapter_view
        )
    except BaseException:
        view.close()
        raise
    split.adapter.producer = f"{ckpt.kind} checkpoint"
    return split


def _drop_tied_copies(
    base_members: dict[str, tuple[TensorSource, str, str | None]],
    adapter_keys: list[str],
    members: dict[str, tuple[TensorSource, str, str | None]],
    config: dict[str, Any] | None,
    notes: list[str],
) -> None:
    """A tied model holds ``lm_head`` as a second name of the embedding (and so do its
    token-adapter tensors): with a tying config, keep the embedding's names only."""
    if not tie_word_embeddings(config):
        return

    def identity(member: tuple[TensorSource, str, str | None]) -> tuple:
        src, old, storage = member
        info = src.info(old)
        return (id(src), storage or info.storage or old, info.byte_span)

    head = base_members.get(OUTPUT_EMBEDDING)
    if head is not None:
        twins = [n for n, m in base_members.items() if n != OUTPUT_EMBEDDING and
                 identity(m) == identity(head)]  # fmt: skip
        if twins:
            del base_members[OUTPUT_EMBEDDING]
            notes.append(f"{OUTPUT_EMBEDDING} is tied to {twins[0]}: kept once")
    seen: dict[tuple, str] = {}
    for key in sorted(adapter_keys, key=lambda k: "lm_head" in k):
        ident = identity(members[key])
        if ident in seen and ident[1] is not None:
            adapter_keys.remove(key)
        else:
            seen[ident] = key


def default_dtype(split: SplitCheckpoint, base: Path | None, training: str | None) -> str | None:
    """The base's dtype where a base is known, else the training dtype."""
    if base is not None:
        counts = Counter(
            i.dtype
            for n, i in split.base.infos.items()
            if i.dtype in FLOAT_DTYPES and n in split.from_base
        )
        if not counts:  # every tensor came from the checkpoint: ask the base itself
            with open_source(base) as src:
                counts = Counter(i.dtype for i in src.infos.values() if i.dtype in FLOAT_DTYPES)
        if counts:
            return counts.most_common(1)[0][0]
    return training


def adapter_folder_tensors(
    ckpt: TrainingCheckpoint, split: SplitCheckpoint
) -> tuple[ViewSource, dict[str, str], list[str]]:
    """What ``convert`` writes as ``adapter_model.safetensors``: the adapter in PEFT's saved
    key form, plus the base parameters the run trained under their PEFT names (as
    ``save_embedding_layers`` would save an embedding). Returns (source, out → source
    name, notes)."""
    adapter = split.adapter
    assert adapter is not None
    members: dict[str, tuple[TensorSource, str, str | None]] = {}
    skip = set(adapter.non_adapter)
    for key in adapter.source.names():
        if key not in skip:
            src, old = adapter.source.origin(key)  # type: ignore[attr-defined]
            members[adapter.key_renames.get(key, key)] = (src, old, None)
    notes = []
    if ckpt.trainable is None:
        notes.append(
            f"a {ckpt.kind} checkpoint does not record which base parameters were trained: "
            "only LoRA, modules_to_save and trainable-token tensors are written"
        )
    else:
        trained = [n for n in ckpt.trainable if not is_adapter_key(n) and n in ckpt.source]
        for name in trained:
            members[name] = (ckpt.source, name, None)
        if trained:
            notes.append(f"{len(trained)} trained base parameters included "
                         f"(e.g. {trained[0]})")  # fmt: skip
    view = ViewSource(ckpt.folder, ckpt.source.format, members, [])
    return view, {n: n for n in members}, notes


def open_checkpoint_adapter(path: Path, base: Path | None) -> SplitCheckpoint:
    """Open a training checkpoint as base view + adapter (``validate --adapter CKPT``)."""
    from lora_cli.errors import MergeError
    from lora_cli.sources.checkpoint_detect import open_training_checkpoint

    ckpt = open_training_checkpoint(Path(path))
    try:
        split = split_checkpoint(ckpt, base=base)
    except BaseException:
        ckpt.close()
        raise
    if split.adapter is None:
        split.close()
        raise MergeError(f"{path}: the checkpoint holds no LoRA tensors")
    return split
