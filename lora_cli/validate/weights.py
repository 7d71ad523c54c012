"""Structural checks of a checkpoint folder, an index or one weights file: which files
make it up, their headers, duplicate names, index ↔ shards, config.json ↔ weights, the
checksum manifest, and one pass over every tensor for NaN/Inf.

That pass reads each tensor once; in recompute mode (``--base`` with ``--adapter``) it
hands the tensor to ``recompute.Recompute`` right away, so memory stays at one tensor.
A corrupt file is a finding, found per file, so one bad shard does not hide the rest.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from lora_cli.adapters.peft import looks_like_peft_state_dict
from lora_cli.errors import FormatError, LoraError
from lora_cli.io.adapter_files import CONFIG_NAME
from lora_cli.io.dtypes import FLOAT_DTYPES, from_torch
from lora_cli.io.layout import OUTPUT_EMBEDDING, read_json
from lora_cli.io.reader import (
    INDEX_SUFFIXES,
    PICKLE_PREFIXES,
    TORCH_SUFFIXES,
    TensorInfo,
    TensorSource,
    find_weight_files,
    open_source,
)
from lora_cli.merge.parts import Part, split_by_bytes
from lora_cli.merge.resolve import INPUT_EMBEDDING_SUFFIXES
from lora_cli.sources.model_config import tie_word_embeddings
from lora_cli.validate.files import check_finite, check_manifest, ensure_readable, split_error
from lora_cli.validate.numeric import compare
from lora_cli.validate.recompute import Recompute
from lora_cli.validate.report import ValidateReport

CAUSAL_HEADS = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def _config_dtype(value: Any) -> str | None:
    """``"bfloat16"`` / ``"torch.bfloat16"`` → ``BF16``; None when unknown."""
    if not isinstance(value, str):
        return None
    try:
        return from_torch(value)
    except FormatError:
        return None


def _close_all(sources: dict[Path, TensorSource]) -> None:
    for src in sources.values():
        src.close()


class WeightsCheck:
    """The structural checks of PATH, in order, and the scan that feeds ``Recompute``."""

    def __init__(
        self,
        report: ValidateReport,
        path: Path,
        device: str,
        part: Part | None = None,
        progress_factory: Any = None,
    ) -> None:
        self.r = report
        self.progress_factory = progress_factory  # (total bytes) -> callback(nbytes, name)
        self.part = part
        self.path = path
        self.root = path if path.is_dir() else path.parent
        self.device = device
        self.sources: dict[Path, TensorSource] = {}
        self.broken: set[Path] = set()  # files that could not be read
        self.incomplete = False  # some weights are unreadable or missing
        self.index: Path | None = None
        self.single: Path | None = None
        self.files: list[Path] = []
        self.recompute: Recompute | None = None  # with --base and --adapter
        self.scanned: list[Path] = []  # the files whose tensors are read (all, or --part's)

    # layout ---------------------------------------------------------------------------
    def _discover(self) -> None:
        p = self.path
        if p.is_file():
            if p.name.endswith(INDEX_SUFFIXES):
                self.index = p
                root = p.parent
                safe = p.name.endswith(".safetensors.index.json")
                suffixes = (".safetensors",) if safe else TORCH_SUFFIXES
                self.root = root
                self.files = sorted(
                    f
                    for f in root.iterdir()
                    if f.is_file()
                    and f.suffix in suffixes
                    and (safe or f.name.startswith(PICKLE_PREFIXES))
                )
                return
            self.root = p.parent
            self.single = p
            self.files = [p]
            return
        self.root = p
        found = find_weight_files(p)
        self.files = found.files
        self.index = found.index or (found.indexes[0] if found.indexes else None)
        if len(found.indexes) > 1:
            self.r.add(
                self.index,
                None,
                "index",
                f"{len(found.indexes)} indexes in one folder "
                f"({', '.join(f.name for f in found.indexes)}); loaders pick one",
            )
        if found.ignored:
            self.r.notes.append(
                f"also holds {', '.join(f.name for f in found.ignored)}; loaders prefer the "
                "safetensors files, which were checked"
            )

    def _open_files(self) -> None:
        self.r.ran("header")
        for f in self.files:
            ensure_readable(f)
            try:
                self.sources[f] = open_source(f)
            except LoraError as exc:
                tensor, message = split_error(exc, f)
                self.r.add(f, tensor, "header", message)
                self.broken.add(f)
                self.incomplete = True

    def _check_names(self) -> None:
        self.r.ran("duplicates")
        owner: dict[str, Path] = {}
        for f, src in self.sources.items():
            for name in src.names():
                if name in owner:
                    self.r.add(
                        f,
                        name,
                        "duplicates",
                        f"also stored in {owner[name].name}; loaders keep one of the two",
                    )
                else:
                    owner[name] = f
            shared: dict[str, list[str]] = {}
            for info in src.infos.values():
                if info.storage and info.nbytes:
                    shared.setdefault(info.storage, []).append(info.name)
            groups = [sorted(g) for g in shared.values() if len(g) > 1]
            if groups:
                self.r.notes.append(
                    f"{f.name}: {len(groups)} groups of tensors share storage (e.g. "
                    f"{', '.join(groups[0])}); safetensors stores each once (`lora convert`)"
                )

    def _check_index(self) -> None:
        index = self.index
        if index is None:
            return
        self.r.ran("index")
        try:
            doc = read_json(index, "index")
        except LoraError as exc:
            self.r.add(index, None, "index", split_error(exc, index)[1])
            return
        weight_map = doc.get("weight_map")
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            self.r.add(index, None, "index", "no 'weight_map' of tensor name → shard file")
            return
        counts = Counter(weight_map.values())
        for shard in sorted(counts):
            p = self.root / shard
            if "/" in shard or shard.startswith(".") or not p.is_file():
                self.r.add(
                    index,
                    None,
                    "index",
                    f"names shard {shard!r} ({counts[shard]} tensors), which is missing",
                )
                self.incomplete = True
        for f in self.files:
            if f.name not in counts:
                self.r.add(f, None, "index", f"shard is not named by {index.name} (extra file)")
        for name, shard in weight_map.items():
            src = self.sources.get(self.root / shard)
            if src is not None and name not in src:
                self.r.add(
                    index, name, "index", f"listed in {shard} but that shard does not hold it"
                )
        for f, src in self.sources.items():
            if f.name not in counts:
                continue
            for name in src.names():
                listed = weight_map.get(name)
                if listed is None:
                    self.r.add(f, name, "index", f"stored in the shard but not in {index.name}")
                elif listed != f.name and (self.root / listed) != f:
                    # the duplicate shows up under `duplicates` when the other shard holds it
                    self.r.add(f, name, "index", f"stored here but {index.name} says {listed}")
        meta = doc.get("metadata")
        total = meta.get("total_size") if isinstance(meta, dict) else None
        if total is None:
            self.r.notes.append(f"{index.name} has no metadata.total_size")
            return
        if isinstance(total, bool) or not isinstance(total, int):
            self.r.add(index, None, "index", f"metadata.total_size {total!r} is not an integer")
            return
        named = [self.root / s for s in counts]
        if any(p in self.broken or p not in self.sources for p in named):
            self.r.notes.append("total_size not checked: some shards could not be read")
            return
        actual = sum(self.sources[p].total_bytes for p in named)
        if total != actual:
            self.r.add(
                index,
                None,
                "index",
                f"metadata.total_size is {total} but the shards hold {actual} tensor bytes "
                f"(off by {total - actual:+d})",
            )

    def _infos(self) -> dict[str, TensorInfo]:
        out: dict[str, TensorInfo] = {}
        for src in self.sources.values():
            for name, info in src.infos.items():
                out.setdefault(name, info)
        return out

    def _check_config(self) -> None:
        config_path = self.root / "config.json"
        infos = self._infos()
        if not config_path.is_file():
            if any(looks_like_peft_state_dict(s) for s in self.sources.values()):
                self.r.ran("adapter")
                self.r.add(
                    self.files[0] if self.files else self.root,
                    None,
                    "adapter",
                    f"holds LoRA tensors (lora_A/lora_B) but no {CONFIG_NAME} beside them: r "
                    "and lora_alpha cannot be recovered",
                )
            else:
                self.r.notes.append("no config.json: config checks skipped")
            return
        self.r.ran("config")
        try:
            config = read_json(config_path, "model config")
        except LoraError as exc:
            self.r.add(config_path, None, "config", split_error(exc, config_path)[1])
            return
        if self.incomplete:
            self.r.notes.append("config.json compared with the readable shards only")
        tie = tie_word_embeddings(config)
        archs = [a for a in config.get("architectures") or [] if isinstance(a, str)]
        heads = [n for n in infos if n == OUTPUT_EMBEDDING or n.endswith("." + OUTPUT_EMBEDDING)]
        embeds = [n for n in infos if n.endswith(INPUT_EMBEDDING_SUFFIXES)]
        if (
            tie is False
            and not heads
            and embeds
            and any(a.endswith(CAUSAL_HEADS) for a in archs)
            and not self.incomplete
        ):
            self.r.add(
                config_path,
                OUTPUT_EMBEDDING,
                "config",
                "tie_word_embeddings is false but lm_head.weight is not stored: transformers "
                "would initialise the output layer at random",
            )
        if tie and OUTPUT_EMBEDDING in infos and len(embeds) == 1:
            self._check_tied_head(config_path, infos[OUTPUT_EMBEDDING], infos[embeds[0]])
        for key in ("dtype", "torch_dtype"):
            value = config.get(key)
            if value is None or value == "auto":
                continue
            want = _config_dtype(value)
            floats = Counter(i.dtype for i in infos.values() if i.dtype in FLOAT_DTYPES)
            if want is None:
                self.r.add(config_path, None, "config", f"{key} {value!r} is not a known dtype")
            elif floats and want not in floats:
                main = ", ".join(f"{d}×{n}" for d, n in floats.most_common())
                self.r.add(
                    config_path,
                    None,
                    "config",
                    f"{key} is {value!r} but no floating point tensor is {want} ({main}); "
                    "loaders would cast every weight",
                )

    def _check_tied_head(self, config_path: Path, head: TensorInfo, embed: TensorInfo) -> None:
        if head.shape != embed.shape or head.dtype != embed.dtype:
            self.r.add(
                config_path,
                OUTPUT_EMBEDDING,
                "config",
                f"tie_word_embeddings is true but lm_head.weight is {head.dtype} "
                f"{list(head.shape)} and {embed.name} is {embed.dtype} {list(embed.shape)}",
            )
            return
        a = self._source_of(head).read(head.name)
        b = self._source_of(embed).read(embed.name)
        if not compare(a, b, head.dtype, 0.0, 0.0).identical:
            self.r.add(
                config_path,
                OUTPUT_EMBEDDING,
                "config",
                f"tie_word_embeddings is true but lm_head.weight differs from {embed.name}: "
                "transformers would discard it and reuse the embedding",
            )

    def _source_of(self, info: TensorInfo) -> TensorSource:
        return next(s for s in self.sources.values() if s.infos.get(info.name) is info)

    # scan -----------------------------------------------------------------------------
    def _choose_part(self) -> None:
        """With ``--part I/N``, the weight files part I reads: the split ``merge --part``
        uses (balanced by bytes), so N parallel jobs read each file once between them."""
        self.scanned = list(self.files)
        if self.part is None:
            return
        sizes = [f.stat().st_size if f.is_file() else 0 for f in self.files]
        mine = split_by_bytes(sizes, self.part.count)[self.part.index - 1]
        self.scanned = [self.files[i] for i in mine]
        self.r.notes.append(
            f"part {self.part.label}: reads {len(self.scanned)} of {len(self.files)} weight "
            "files; headers, index and config are checked for all"
        )

    def _scan(self) -> None:
        r = self.r
        r.ran("shapes")
        r.ran("finite")
        progress = None
        if self.progress_factory is not None:
            sources = [s for f in self.scanned if (s := self.sources.get(f)) is not None]
            total = sum(i.nbytes for s in sources for i in s.infos.values())
            progress = self.progress_factory(total)
        for f in self.scanned:
            src = self.sources.get(f)
            if src is None:
                continue
            for info in src.infos.values():
                r.tensors_checked += 1
                if progress is not None:
                    progress(info.nbytes, info.name)
                if info.numel == 0:
                    r.add(
                        f,
                        info.name,
                        "shapes",
                        f"zero-size tensor {list(info.shape)} (a DeepSpeed ZeRO-3 placeholder?)",
                    )
                try:
                    t = src.read(info.name)
                except LoraError as exc:
                    tensor, message = split_error(exc, f)
                    r.add(f, tensor or info.name, "header", message)
                    continue
                if info.dtype in FLOAT_DTYPES:
                    check_finite(r, f, info, t)
                if self.recompute is not None:
                    self.recompute.compare(f, info.name, t, info.dtype)
                del t

    def run(self) -> None:
        r = self.r
        self._discover()
        try:
            self._open_files()
            self._check_names()
            self._check_index()
            if self.single is None:
                self._check_config()
            self._choose_part()
            if self.single is not None:
                check_manifest(r, self.root, {self.single.name})
            elif self.part is not None:
                others = {f.name for f in self.files} - {f.name for f in self.scanned}
                check_manifest(r, self.root, skip=others, extra=self.part.index == 1)
            else:
                check_manifest(r, self.root)
            if r.base is not None:
                self.recompute = Recompute(r, self.device)
                self.recompute.prepare(self._infos())
                for f, src in self.sources.items():  # other parts compare these
                    if f not in self.scanned:
                        self.recompute.seen.update(src.names())
            self._scan()
            if self.recompute is not None:
                self.recompute.finish(self.index or self.path, self.root, self.incomplete)
        finally:
            _close_all(self.sources)
            if self.recompute is not None:
                self.recompute.close()
