"""``lora inspect``: what a path holds, from headers and configs only (no tensor data)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_cli.adapters.findings import value_findings
from lora_cli.adapters.formats import is_adapter, load_adapter
from lora_cli.adapters.peft import (
    Adapter,
    looks_like_peft_state_dict,
    nonfinite_tensors,
    regex_matches,
)
from lora_cli.io.layout import OUTPUT_EMBEDDING
from lora_cli.io.reader import TensorSource, open_source
from lora_cli.merge.plan import load_base_config
from lora_cli.sources.hub import Notice, resolve_input
from lora_cli.sources.model_config import tie_word_embeddings

SCHEMA = "lora-inspect/1"
SUPPORTED_SCHEMES = ("fp8-block", "ct-pack-quantized", "ct-float-quantized", "mxfp4")


@dataclass
class InspectReport:
    path: Path
    kind: str  # adapter | checkpoint | file
    format: str
    files: list[dict[str, Any]]
    tensors: int
    parameters: int
    bytes: int
    dtypes: dict[str, int]
    warnings: list[str] = field(default_factory=list)
    adapter: dict[str, Any] | None = None
    checkpoint: dict[str, Any] | None = None
    training: dict[str, Any] | None = None  # DeepSpeed / FSDP / PeftModel state dict

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "schema": SCHEMA,
            "path": str(self.path),
            "kind": self.kind,
            "format": self.format,
            "files": self.files,
            "tensors": self.tensors,
            "parameters": self.parameters,
            "bytes": self.bytes,
            "dtypes": self.dtypes,
            "warnings": self.warnings,
            "adapter": self.adapter,
            "checkpoint": self.checkpoint,
        }
        if self.training is not None:
            doc["training"] = self.training
        return doc


def inspect_path(
    path: Path | str, *, notice: Notice | None = None, hub_progress: bool = True
) -> InspectReport:
    """What ``path`` holds; a Hub id (``org/name[@revision]``) that is not a local path is
    read from its cached snapshot, fetched as ``merge`` fetches it (``sources/hub.py``)."""
    path = resolve_input(path, "path", notice=notice, progress=hub_progress)
    from lora_cli.sources.checkpoint_detect import is_training_checkpoint

    if is_training_checkpoint(path):
        return _training_report(path)
    if is_adapter(path):
        adapter = load_adapter(path)
        try:
            report = _summary(path, "adapter", adapter.source)
            report.adapter = adapter_details(adapter)
            report.warnings = list(adapter.warnings) + [f.message for f in value_findings(adapter)]
            report.warnings += [
                f"{key}: {count} NaN/Inf values (merge and convert refuse this adapter)"
                for key, count in nonfinite_tensors(adapter)
            ]
        finally:
            adapter.close()
        return report
    with open_source(path) as source:
        kind = "file" if path.is_file() else "checkpoint"
        report = _summary(path, kind, source)
        report.checkpoint = _checkpoint_details(source)
        if source.skipped:
            report.warnings.append(
                f"{len(source.skipped)} non-tensor entries ignored (e.g. {source.skipped[0]})"
            )
        if looks_like_peft_state_dict(source):
            report.warnings.append(
                "holds LoRA tensors (lora_A/lora_B) but no adapter_config.json beside it"
            )
    return report


def _summary(path: Path, kind: str, source: TensorSource) -> InspectReport:
    per_file: dict[Path, list[int]] = {f: [0, 0] for f in source.files}
    dtypes: Counter[str] = Counter()
    params = 0
    for info in source.infos.values():
        per_file[info.file][0] += 1
        per_file[info.file][1] += info.nbytes
        dtypes[info.dtype] += 1
        params += info.numel
    return InspectReport(
        path=path,
        kind=kind,
        format=source.format,
        files=[
            {"name": f.name, "bytes": f.stat().st_size, "tensors": n}
            for f, (n, _) in per_file.items()
        ],
        tensors=len(source.infos),
        parameters=params,
        bytes=source.total_bytes,
        dtypes=dict(sorted(dtypes.items())),
    )


def _target_kind(targets: Any) -> str:
    if isinstance(targets, str):
        return "all-linear" if targets.lower() == "all-linear" else "regex"
    return "list" if targets else "none"


def adapter_details(adapter: Adapter) -> dict[str, Any]:
    cfg = adapter.config
    src = adapter.source
    targets = cfg.get("target_modules")
    modules = []
    for m in sorted(adapter.modules.values(), key=lambda m: m.path):
        a_key = m.parts.get("lora_A.weight") or m.parts.get("lora_embedding_A")
        modules.append(
            {
                "name": m.path,
                "kind": "embedding" if m.is_embedding else "lora",
                "r": m.r,
                "alpha": m.alpha,
                "scale": m.scale,
                "rank_in_file": src.info(a_key).shape[0]
                if a_key and src.info(a_key).shape
                else None,
                "dora": m.has_dora,
                "lora_bias": "lora_B.bias" in m.parts,
            }
        )
    details: dict[str, Any] = {
        "format": adapter.format,
        "weights_file": adapter.weights_file.name,
        "producer": adapter.producer,
        "peft_type": cfg.get("peft_type"),
        "variant": adapter.variant.name,
        "mergeable": adapter.variant.mergeable,
        "refusal": adapter.variant.refusal,
        "base_model_name_or_path": cfg.get("base_model_name_or_path"),
        "r": cfg.get("r"),
        "lora_alpha": cfg.get("lora_alpha"),
        "use_rslora": bool(cfg.get("use_rslora", False)),
        "use_dora": bool(cfg.get("use_dora", False)),
        "fan_in_fan_out": bool(cfg.get("fan_in_fan_out", False)),
        "bias": cfg.get("bias", "none"),
        "lora_bias": bool(cfg.get("lora_bias", False)),
        "init_lora_weights": cfg.get("init_lora_weights", True),
        "target_modules": targets,
        "target_modules_kind": _target_kind(targets),
        "rank_pattern": cfg.get("rank_pattern") or {},
        "alpha_pattern": cfg.get("alpha_pattern") or {},
        "modules_to_save": cfg.get("modules_to_save") or [],
        "trainable_token_indices": cfg.get("trainable_token_indices"),
        "modules": modules,
        "replacements": sorted(adapter.replacements),
        "trainable_tokens": {m: idx for m, (_, idx) in adapter.token_rows.items()},
        "non_adapter_tensors": adapter.non_adapter,
        "variant_state_tensors": adapter.variant_state,
        "skipped_entries": adapter.source.skipped,
    }
    if adapter.native:
        details["native"] = adapter.native
    if details["target_modules_kind"] == "regex":
        matched, unmatched = regex_matches(adapter, targets)
        details["regex_matches"] = matched
        details["regex_unmatched"] = unmatched
    return details


def _checkpoint_details(source: TensorSource) -> dict[str, Any]:
    config = load_base_config(source)
    shared: dict[str, list[str]] = {}
    for info in source.infos.values():
        if info.storage:
            shared.setdefault(info.storage, []).append(info.name)
    groups = [sorted(g) for g in shared.values() if len(g) > 1]
    for meta in source.file_metadata.values():
        for alias, kept in meta.items():
            if alias != "format" and kept in source.infos and alias not in source.infos:
                groups.append(sorted([alias, kept]))
    tie = tie_word_embeddings(config)
    return {
        "config": config is not None,
        "architectures": (config or {}).get("architectures"),
        "model_type": (config or {}).get("model_type"),
        "torch_dtype": (config or {}).get("torch_dtype") or (config or {}).get("dtype"),
        "tie_word_embeddings": tie,
        "has_lm_head": OUTPUT_EMBEDDING in source,
        "index": source.index_path.name if source.index_path else None,
        "shared_tensors": groups,
        "quantization": quantization_details(source, config),
    }


def quantization_details(source: TensorSource, config: Any) -> dict[str, Any] | None:
    """Quantized tensor families found in the headers, and what ``merge`` does with them."""
    from lora_cli.sources.quantized import detect

    scheme = detect(source, config, values=False)
    if scheme.whole is not None:
        fmt, key = scheme.whole
        return {
            "method": scheme.method,
            "families": [{"scheme": fmt, "family": key, "tensors": None, "merge": "refused"}],
        }
    if not scheme.tensors and not scheme.unsupported:
        return None
    families = []
    for entry in scheme.families().values():
        supported = entry["scheme"] in SUPPORTED_SCHEMES
        entry["merge"] = (
            "touched: dequantized, merged in fp32, written bf16 (or re-quantized with "
            "--quantize keep); untouched: copied byte for byte"
            if supported
            else "untouched: copied byte for byte; touched: refused (format not supported)"
        )
        families.append(entry)
    return {"method": scheme.method, "families": families}


def _training_report(path: Path) -> InspectReport:
    """A training checkpoint: its kind, ranks, dtypes, what is LoRA, trained, frozen or tied,
    and whether an adapter file beside it lacks trained base parameters."""
    from lora_cli.adapters.checkpoint import find_adapter_config, is_adapter_key
    from lora_cli.adapters.peft import PREFIX
    from lora_cli.sources.checkpoint_detect import ADAPTER_FILES, open_training_checkpoint

    ckpt = open_training_checkpoint(path)
    with ckpt.source as source:
        report = _summary(path, "training-checkpoint", source)
        report.format = ckpt.kind
        report.files = [
            {"name": p.name, "bytes": p.stat().st_size, "tensors": None}
            for p in sorted(source.files[0].iterdir()) if p.is_file()
        ] if source.files and source.files[0].is_dir() else report.files  # fmt: skip
        names = source.names()
        lora = [n for n in names if is_adapter_key(n)]
        modules = sorted({n.split(".lora_")[0].removeprefix(PREFIX) for n in names
                          if ".lora_" in n})  # fmt: skip
        trained_base = [n for n in (ckpt.trainable or []) if not is_adapter_key(n)]
        config = find_adapter_config(ckpt, None)
        report.training = {
            "kind": ckpt.kind,
            "training_dtype": ckpt.training_dtype,
            **ckpt.details,
            "lora_tensors": len(lora),
            "lora_modules": modules,
            "trained_base_params": trained_base,
            "adapter_config": str(config) if config else None,
            "notes": ckpt.notes,
        }
        if lora and config is None:
            report.warnings.append(
                "LoRA tensors but no adapter_config.json in or beside it: merge needs "
                "--adapter-config (alpha is not in the weights)"
            )
        adapter_files = [path / n for n in ADAPTER_FILES if path.is_dir() and (path / n).is_file()]
        if trained_base and adapter_files:
            weights = adapter_files[0]
            with open_source(weights) as adapter_src:
                saved = {n.removeprefix(PREFIX) for n in adapter_src.names()}
            missing = [n for n in trained_base if n.removeprefix(PREFIX) not in saved]
            if missing:
                report.warnings.append(
                    f"{weights.name} lacks {len(missing)} trained base parameters (e.g. "
                    f"{missing[0].removeprefix(PREFIX)}): merging the adapter file alone loses "
                    "them; merge or convert this folder instead"
                )
    return report
