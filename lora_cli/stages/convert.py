"""``lora convert``: pickled weights → deduplicated safetensors, verified bit for bit.

Adapters become ``adapter_model.safetensors`` in PEFT's saved key form, with
non-adapter entries dropped and reported; full checkpoints become sharded
``model*.safetensors`` with an index. The pickle is parsed by our restricted
reader, so a malicious file is refused without running any of its code.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_cli.adapters.formats import adapter_format
from lora_cli.adapters.peft import (
    Adapter,
    check_adapter_tensors,
    load_adapter,
    regex_matches,
)
from lora_cli.errors import FormatError, UsageError
from lora_cli.io.adapter_files import CONFIG_NAME, has_adapter_weights, is_peft_adapter
from lora_cli.io.dedup import deduplicate
from lora_cli.io.destination import check_destination
from lora_cli.io.dtypes import FLOAT_DTYPES, parse_dtype_option, to_torch
from lora_cli.io.hub_cache import in_hub_cache
from lora_cli.io.layout import (
    ShardPlan,
    config_dtype_update,
    copy_side_files,
    parse_size,
    plan_shards,
    read_json,
    write_index,
    write_json,
    write_manifest,
)
from lora_cli.io.reader import TensorSource, open_source
from lora_cli.io.writer import (
    TMP_MARK,
    OutputDir,
    ShardWriter,
    remove_stale_temporaries,
)
from lora_cli.sources.hub import Notice, names_hub_repo, resolve_input
from lora_cli.sources.model_config import tie_word_embeddings

Progress = Callable[[int, str], None]


@dataclass
class ConvertResult:
    input: Path
    output: Path
    kind: str  # adapter | checkpoint
    files: list[str]
    tensors: int
    bytes: int
    seconds: float
    dropped: list[str] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)
    renamed: int = 0
    notes: list[str] = field(default_factory=list)
    verified: bool = False
    formats: tuple[str, str] | None = None  # (input format, --to format) with --to

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": "lora-convert/1",
            "input": str(self.input),
            "output": str(self.output),
            "kind": self.kind,
            "files": self.files,
            "tensors": self.tensors,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 3),
            "dropped": self.dropped,
            "aliases": self.aliases,
            "renamed_keys": self.renamed,
            "notes": self.notes,
            "verified": self.verified,
            **({"from": self.formats[0], "to": self.formats[1]} if self.formats else {}),
        }


def convert(
    input_path: Path | str,
    output: Path | None,
    *,
    dtype: str = "keep",
    max_shard_size: str = "5GB",
    targets_as_list: bool = False,
    overwrite: bool = False,
    progress_factory: Any = None,
    to: str | None = None,
    base: Path | str | None = None,
    adapter_config: Path | None = None,
    notice: Notice | None = None,
    hub_progress: bool = True,
) -> ConvertResult:
    """Convert ``input_path``; it and ``base`` may be Hub ids (``sources/hub.py``). An input in
    the Hugging Face cache needs ``output``: nothing is written beside it there."""
    named = input_path
    if output is None and names_hub_repo(named):  # refused before any download
        _refuse_writing_beside(named)
    if output is not None and any(names_hub_repo(p) for p in (input_path, base) if p):
        local = [Path(p) for p in (input_path, base) if p is not None and Path(p).exists()]
        check_destination(output, overwrite, local, file_output=(to or "").lower() == "gguf")
    input_path = resolve_input(input_path, "input", notice=notice, progress=hub_progress)
    if not input_path.exists():
        raise FormatError(f"{input_path}: no such file or directory")
    if output is None and in_hub_cache(input_path):
        _refuse_writing_beside(named)
    if to is not None or adapter_format(input_path) in ("mlx-lm", "gguf"):
        if targets_as_list or parse_dtype_option(dtype) is not None:
            raise UsageError("--targets-as-list and --dtype do not apply with --to")
        if base is not None:
            base = resolve_input(base, "base", notice=notice, progress=hub_progress)
        return _convert_to(input_path, output, to or "peft", base, overwrite, progress_factory)
    if base is not None:
        raise UsageError("--base applies with --to only")
    if has_adapter_weights(input_path) and not is_peft_adapter(input_path):
        raise FormatError(
            f"{input_path}: adapter weights without {CONFIG_NAME}",
            "put the adapter's config next to it (r and lora_alpha cannot be recovered "
            "from the weights)",
        )
    from lora_cli.sources.checkpoint_detect import is_training_checkpoint

    if is_training_checkpoint(input_path):  # DeepSpeed, FSDP, PeftModel state dicts
        return _convert_training_checkpoint(
            input_path, output, parse_dtype_option(dtype), parse_size(max_shard_size),
            overwrite, progress_factory, adapter_config,
        )  # fmt: skip
    if is_peft_adapter(input_path):
        if parse_dtype_option(dtype) is not None:
            raise UsageError("--dtype applies to full checkpoints, not adapters")
        return _convert_adapter(input_path, output, targets_as_list, overwrite, progress_factory)
    if targets_as_list:
        raise UsageError("--targets-as-list applies to adapters only")
    return _convert_checkpoint(
        input_path,
        output,
        parse_dtype_option(dtype),
        parse_size(max_shard_size),
        overwrite,
        progress_factory,
    )


def _refuse_writing_beside(named: Path | str) -> None:
    """Without ``-o`` convert writes beside its input: never into the Hugging Face cache."""
    raise UsageError(
        f"input {named} is in the Hugging Face cache, and without -o convert writes beside "
        "its input",
        "pass -o OUTPUT (outside the cache)",
    )


# -- other ecosystems (--to) --------------------------------------------------------------
TARGET_FORMATS = ("peft", "mlx", "gguf")


def _convert_to(
    path: Path, output: Path | None, to: str, base: Path | None, overwrite: bool, factory: Any
) -> ConvertResult:
    """Any adapter format → ``to`` (the writers live in ``lora_cli.adapters.to_*``)."""
    from lora_cli.adapters.formats import load_adapter

    start = time.perf_counter()
    to = to.lower()
    if to not in TARGET_FORMATS:
        raise UsageError(f"--to {to!r} is not a format", f"use one of {', '.join(TARGET_FORMATS)}")
    if adapter_format(path) is None:
        raise FormatError(f"{path}: not an adapter (PEFT, mlx-lm or GGUF LoRA)")
    if output is None:
        raise UsageError("--to needs an output path", "pass -o OUTPUT")
    if to == "gguf" and base is None:
        raise UsageError("--to gguf needs the base model", "pass --base BASE_MODEL_FOLDER")
    read = [path] + ([base] if base else [])
    check_destination(output, overwrite, read, file_output=to == "gguf")
    base_src = open_source(base) if base is not None else None
    try:
        adapter = load_adapter(path, base_src)
        try:
            if adapter.native.get("requires_base") and base_src is None:
                raise UsageError(f"{path}: {adapter.warnings[-1]}", "pass --base BASE_MODEL_FOLDER")
            progress = factory(adapter.source.total_bytes) if factory else None
            if to == "gguf":
                from lora_cli.adapters.to_gguf import write_gguf

                assert base_src is not None
                done = write_gguf(adapter, base_src, Path(output), overwrite, progress)
            else:
                with OutputDir(output, overwrite) as out:
                    if to == "peft":
                        from lora_cli.adapters.to_peft import write_peft

                        done = write_peft(adapter, out.path, progress)
                    else:
                        from lora_cli.adapters.to_mlx import write_mlx

                        done = write_mlx(adapter, base_src, out.path, progress)
                    write_manifest(out.path)
                    done.files = sorted(p.name for p in out.path.iterdir())
        finally:
            adapter.close()
    finally:
        if base_src is not None:
            base_src.close()
    return ConvertResult(
        input=path,
        output=Path(output),
        kind="adapter",
        files=done.files,
        tensors=done.tensors,
        bytes=done.bytes,
        seconds=time.perf_counter() - start,
        dropped=list(adapter.non_adapter),
        notes=done.notes,
        verified=True,
        formats=(adapter.format, to),
    )


# -- adapters ----------------------------------------------------------------------------
def _adapter_source_file(path: Path) -> Path:
    """For a folder, the pickle is what needs converting even if a safetensors exists."""
    if path.is_file():
        return path
    for name in ("adapter_model.bin", "adapter_model.pt", "adapter_model.safetensors"):
        if (path / name).is_file():
            return path / name
    raise FormatError(f"{path}: no adapter_model.bin or adapter_model.safetensors")


def _convert_adapter(
    path: Path, output: Path | None, targets_as_list: bool, overwrite: bool, factory: Any
) -> ConvertResult:
    start = time.perf_counter()
    if output is not None:  # refuse a bad destination before reading anything
        check_destination(output, overwrite, [path])
    adapter = load_adapter(_adapter_source_file(path))
    try:
        check_adapter_tensors(adapter)
        if not (adapter.modules or adapter.replacements or adapter.token_rows):
            raise FormatError(
                f"{adapter.weights_file}: the adapter holds no LoRA tensors",
                "an empty save (often DeepSpeed ZeRO-3 without gathering); re-export it",
            )
        keep = _adapter_keys(adapter)
        names = {k: adapter.key_renames.get(k, k) for k in keep}
        config = dict(adapter.config)
        notes: list[str] = []
        if targets_as_list:
            config, note = _targets_as_list(adapter, config)
            notes.append(note)
        dedup = deduplicate([adapter.source.info(k) for k in keep], tie_word_embeddings=None)
        notes += dedup.notes
        leftover, more_notes = _unclassified(adapter, keep)
        notes += more_notes
        specs = [
            (names[k], adapter.source.info(k).dtype, adapter.source.info(k).shape)
            for k in dedup.keep
        ]
        aliases = {names[a]: names[k] for a, k in dedup.aliases.items() if names[a] != names[k]}
        meta = {"format": "pt", **aliases}
        plan = ShardPlan("adapter_model.safetensors", specs, meta)
        dropped = list(adapter.non_adapter) + leftover + list(adapter.source.skipped)
        source_of = {names[k]: k for k in dedup.keep}
        total = sum(adapter.source.info(k).nbytes for k in dedup.keep)
        progress = factory(total) if factory else None

        if output is None:
            if targets_as_list:
                raise UsageError(
                    "--targets-as-list rewrites adapter_config.json, and inputs are never modified",
                    "pass -o OUTPUT to write the converted adapter to a new folder",
                )
            folder = adapter.root
            final = folder / "adapter_model.safetensors"
            if adapter.weights_file == final:
                raise UsageError(
                    f"{final} is already safetensors", "pass -o OUTPUT to write a normalized copy"
                )
            if final.exists() and not overwrite:
                raise UsageError(f"{final} already exists", "pass --overwrite to replace it")
            remove_stale_temporaries(final)
            tmp = folder / f".{final.name}{TMP_MARK}{os.getpid()}"
            try:
                _write_shard(tmp, plan, adapter.source, source_of, None, progress)
                _verify(tmp.parent, [plan], adapter.source, source_of, None, tmp_name=tmp.name)
                os.replace(tmp, final)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            files = [final.name]
            out_path = final
        else:
            with OutputDir(output, overwrite) as out:
                _write_shard(
                    out.path / plan.filename, plan, adapter.source, source_of, None, progress
                )
                _verify(out.path, [plan], adapter.source, source_of, None)
                write_json(out.path / "adapter_config.json", config)
                copy_side_files(adapter.root, out.path, skip={"adapter_config.json"})
                write_manifest(out.path)
                files = sorted(p.name for p in out.path.iterdir())
            out_path = Path(output)
        return ConvertResult(
            input=path,
            output=out_path,
            kind="adapter",
            files=files,
            tensors=len(specs),
            bytes=total,
            seconds=time.perf_counter() - start,
            dropped=dropped,
            aliases=aliases,
            renamed=sum(1 for k in dedup.keep if names[k] != k),
            notes=notes,
            verified=True,
        )
    finally:
        adapter.close()


def _unclassified(adapter: Adapter, keep: list[str]) -> tuple[list[str], list[str]]:
    """Keys neither kept nor reported as non-adapter: (shadowed copies, notes).

    Two different tensors that become one PEFT key (``lora_A.default.weight`` and
    ``lora_A.other.weight``: two adapters in one file) cannot both be kept, so that is
    refused rather than one silently picked. Identical views of one tensor under two
    spellings are stored once; anything else left over is returned to be reported.
    """
    src = adapter.source
    reported = set(adapter.non_adapter)
    by_name: dict[str, list[str]] = {}
    for key in src.names():
        if key not in reported:
            by_name.setdefault(adapter.key_renames.get(key, key), []).append(key)
    kept = set(keep)
    leftover: list[str] = []
    notes: list[str] = []
    for name, keys in by_name.items():
        if len(keys) > 1:
            views = {
                (i.storage, i.byte_span, i.dtype, i.shape) if i.storage else i.name
                for i in map(src.info, keys)
            }
            if len(views) > 1:
                raise FormatError(
                    f"{adapter.weights_file}: tensors {keys[0]!r} and {keys[1]!r} both become "
                    f"{name!r} in PEFT's saved form",
                    "the file holds more than one adapter (or two different copies of a "
                    "tensor); save each adapter on its own with PEFT's save_pretrained",
                )
            notes.append(f"{', '.join(keys)} are one tensor: stored once as {name}")
            continue
        leftover += [k for k in keys if k not in kept]
    return leftover, notes


def _adapter_keys(adapter: Adapter) -> list[str]:
    """LoRA factors, DoRA magnitudes, replacements, token deltas and variant state (VeLoRA,
    MonteCLoRA: PEFT loads them back), in file order."""
    wanted = {k for m in adapter.modules.values() for k in m.parts.values()}
    wanted |= set(adapter.variant_state)
    wanted |= set(adapter.replacements.values())
    wanted |= {k for k, _ in adapter.token_rows.values()}
    return [k for k in adapter.source.names() if k in wanted]


def _targets_as_list(adapter: Adapter, config: dict[str, Any]) -> tuple[dict[str, Any], str]:
    targets = config.get("target_modules")
    modules = sorted(adapter.modules)
    if not isinstance(targets, str):
        return config, "target_modules is already a list; left as is"
    matched, _ = regex_matches(adapter, targets) if targets != "all-linear" else (modules, [])
    config = dict(config)
    config["target_modules"] = modules
    return config, (
        f"target_modules regex replaced by the {len(modules)} module names present "
        f"({len(matched)} matched the regex)"
    )


# -- full checkpoints ---------------------------------------------------------------------
def _default_checkpoint_output(path: Path) -> Path:
    path = path.absolute()
    if path.is_dir():
        return path.parent / f"{path.name}-safetensors"
    if path.name.endswith(".index.json"):  # the index stands for its whole folder
        return path.parent.parent / f"{path.parent.name}-safetensors"
    return path.parent / f"{path.stem}-safetensors"


def _convert_checkpoint(
    path: Path,
    output: Path | None,
    out_dtype: str | None,
    max_shard: int,
    overwrite: bool,
    factory: Any,
) -> ConvertResult:
    start = time.perf_counter()
    output = output or _default_checkpoint_output(path)
    check_destination(output, overwrite, [path])
    with open_source(path) as source:
        root = source.root
        config_path = root / "config.json"
        config = read_json(config_path, "model config") if config_path.is_file() else None
        tie = tie_word_embeddings(config)
        infos = list(source.infos.values())
        dedup = deduplicate(infos, tie)
        specs = []
        for name in dedup.keep:
            info = source.info(name)
            dt = out_dtype if out_dtype and info.dtype in FLOAT_DTYPES else info.dtype
            specs.append((name, dt, info.shape))
        shards = plan_shards(specs, max_shard)
        # aliases found now, plus those an earlier conversion recorded in the source files
        aliases = {
            a: k
            for meta in source.file_metadata.values()
            for a, k in meta.items()
            if a != "format" and a not in source.infos and k in source.infos
        }
        aliases.update(dedup.aliases)
        for shard in shards:
            names = {n for n, _, _ in shard.specs}
            shard.metadata.update({a: k for a, k in aliases.items() if k in names})
        source_of = {n: n for n in dedup.keep}
        total = sum(source.info(n).nbytes for n in dedup.keep)
        progress = factory(total) if factory else None
        with OutputDir(output, overwrite) as out:
            for shard in shards:
                _write_shard(
                    out.path / shard.filename, shard, source, source_of, out_dtype, progress
                )
            _verify(out.path, shards, source, source_of, out_dtype)
            write_index(out.path, shards)
            if config is not None and out_dtype:
                config = {**config, **config_dtype_update(config, out_dtype)}
            copy_side_files(root, out.path, skip={"config.json"} if config else set())
            if config is not None:
                write_json(out.path / "config.json", config)
            write_manifest(out.path)
            files = sorted(p.name for p in out.path.iterdir())
        return ConvertResult(
            input=path,
            output=Path(output),
            kind="checkpoint",
            files=files,
            tensors=len(specs),
            bytes=sum(s.nbytes for s in shards),
            seconds=time.perf_counter() - start,
            dropped=list(source.skipped),
            aliases=aliases,
            notes=dedup.notes,
            verified=True,
        )


# -- training checkpoints -----------------------------------------------------------------
def _convert_training_checkpoint(
    path: Path,
    output: Path | None,
    out_dtype: str | None,
    max_shard: int,
    overwrite: bool,
    factory: Any,
    adapter_config: Path | None,
) -> ConvertResult:
    """A plain model's training checkpoint → a safetensors model (what zero_to_fp32 and
    ``accelerate merge-weights`` do, streaming); a PeftModel's → a PEFT adapter folder with
    the trained base parameters included (the recovery for empty ZeRO-3 adapter saves)."""
    from lora_cli.adapters.checkpoint import adapter_folder_tensors, split_checkpoint
    from lora_cli.sources.checkpoint_detect import open_training_checkpoint

    start = time.perf_counter()
    output = output or _default_checkpoint_output(path)
    check_destination(output, overwrite, [path] + ([adapter_config] if adapter_config else []))
    ckpt = open_training_checkpoint(path)
    try:
        split = split_checkpoint(ckpt, adapter_config=adapter_config)
    except BaseException:
        ckpt.close()
        raise
    with split.base:
        notes = ckpt.notes + split.notes
        if split.adapter is None:
            kind, source, names = "checkpoint", split.base, {n: n for n in split.base.names()}
            stem = "model"
        else:
            check_adapter_tensors(split.adapter)
            kind, stem = "adapter", "adapter_model"
            source, names, more = adapter_folder_tensors(ckpt, split)
            notes += more
        specs = []
        for name, src_name in names.items():
            info = source.info(src_name)
            dt = out_dtype if out_dtype and info.dtype in FLOAT_DTYPES else info.dtype
            specs.append((name, dt, info.shape))
        shards = plan_shards(specs, max_shard if kind == "checkpoint" else 1 << 62, stem=stem)
        total = sum(source.info(n).nbytes for n in names.values())
        progress = factory(total) if factory else None
        with OutputDir(output, overwrite) as out:
            for shard in shards:
                _write_shard(out.path / shard.filename, shard, source, names, out_dtype, progress)
            _verify(out.path, shards, source, names, out_dtype)
            if kind == "checkpoint":
                write_index(out.path, shards)
            else:
                assert split.adapter is not None
                write_json(out.path / CONFIG_NAME, split.adapter.config)
            write_manifest(out.path)
            files = sorted(p.name for p in out.path.iterdir())
        if split.adapter is not None:
            split.adapter.close()
    return ConvertResult(
        input=path,
        output=Path(output),
        kind=kind,
        files=files,
        tensors=len(specs),
        bytes=sum(s.nbytes for s in shards),
        seconds=time.perf_counter() - start,
        dropped=list(ckpt.source.skipped),
        notes=notes,
        verified=True,
    )


# -- shared streaming ---------------------------------------------------------------------
def _write_shard(
    path: Path,
    plan: ShardPlan,
    source: TensorSource,
    source_of: dict[str, str],
    out_dtype: str | None,
    progress: Progress | None,
) -> None:
    writer = ShardWriter(path, plan.specs, plan.metadata)
    try:
        for name in sorted(writer.entries, key=lambda n: writer.entries[n].start):
            info = source.info(source_of[name])
            entry = writer.entries[name]
            if info.raw_offset is not None and info.dtype == entry.dtype:
                writer.copy_from(name, source.fd(info.file), info.raw_offset, info.nbytes)
            else:
                writer.write(name, source.read(info.name).to(to_torch(entry.dtype)))
            if progress:
                progress(info.nbytes, name)
        writer.close()
    except BaseException:
        writer.abort()
        raise


def _verify(
    folder: Path,
    plans: list[ShardPlan],
    source: TensorSource,
    source_of: dict[str, str],
    out_dtype: str | None,
    tmp_name: str | None = None,
) -> None:
    """Re-read every written tensor and compare it bit for bit with its source."""
    import torch

    for plan in plans:
        written = open_source(folder / (tmp_name or plan.filename))
        try:
            for name, dtype, _ in plan.specs:
                expected = source.read(source_of[name]).to(to_torch(dtype))
                got = written.read(name)
                if got.shape != expected.shape or not torch.equal(
                    got.reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8)
                ):
                    raise FormatError(
                        f"{folder / plan.filename}: tensor {name!r} does not match its source "
                        "after writing",
                        "the disk or the source file changed during conversion; rerun",
                    )
        finally:
            written.close()
