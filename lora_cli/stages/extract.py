"""``lora extract BASE TUNED -o OUT``: a full fine-tune back into a PEFT LoRA adapter.

The inverse of ``merge``, built from the same rooms: the one reader (``io/reader.py``,
quantized bases dequantized by ``sources/quantized.py``), the merge's name resolution
(``extract/pairing.py``), the one writer (``io/writer.py``: temporary sibling, renamed when
complete) and the merge card and checksum helpers. Memory: one tensor pair and its SVD
workspace, plus the factors written so far (the adapter itself).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_cli.errors import MergeError, UsageError
from lora_cli.extract.adapter import AdapterLayout, adapter_config, layout, write_adapter
from lora_cli.extract.pairing import (
    Pairing,
    load_config,
    module_kinds,
    open_checkpoint,
    pair_tensors,
)
from lora_cli.extract.svd import SvdOptions
from lora_cli.extract.walk import Candidate, candidates, walk
from lora_cli.io.destination import check_destination
from lora_cli.io.hub_cache import cached_repo_id
from lora_cli.io.layout import MANIFEST_NAME
from lora_cli.sources.hub import Notice, parse_repo_ref, resolve_input

SCHEMA = "lora-extract/1"
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
WORST = 5


@dataclass
class ExtractOptions:
    rank: int | None  # None: --rank auto
    energy: float
    max_rank: int
    exact: bool
    dtype: str  # bf16 | fp16 | fp32
    min_change: float
    include_full: bool | None  # None: the default (on, but a grown vocabulary is refused)

    def to_json(self) -> dict[str, Any]:
        return {
            "rank": "auto" if self.rank is None else self.rank,
            "energy": self.energy if self.rank is None else None,
            "max_rank": self.max_rank if self.rank is None else None,
            "exact": self.exact,
            "dtype": self.dtype,
            "min_change": self.min_change,
            "include_full": self.include_full is not False,
        }


def parse_options(
    rank: str | int,
    energy: float,
    max_rank: int,
    exact: bool,
    dtype: str,
    min_change: float,
    include_full: bool | None,
) -> ExtractOptions:
    text = str(rank).strip().lower()
    if text == "auto":
        chosen = None
    elif text.isdigit() and int(text) > 0:
        chosen = int(text)
    else:
        raise UsageError(f"--rank {rank!r} must be a positive integer or 'auto'")
    if not (math.isfinite(energy) and 0 < energy <= 1):
        raise UsageError(f"--energy {energy} must be in (0, 1]", "e.g. --energy 0.99")
    if max_rank < 1:
        raise UsageError(f"--max-rank {max_rank} must be ≥ 1")
    if dtype not in DTYPES:
        raise UsageError(f"unknown --dtype {dtype!r}", "use bf16, fp16 or fp32")
    if not (math.isfinite(min_change) and min_change >= 0):
        raise UsageError(f"--min-change {min_change} must be a finite number ≥ 0")
    return ExtractOptions(chosen, energy, max_rank, exact, dtype, min_change, include_full)


@dataclass
class ExtractPlan:
    """``--dry-run``: what would be extracted, from headers alone."""

    base: Path
    tuned: Path
    rule: str
    options: ExtractOptions
    plan: list[Candidate]
    notes: list[str]

    def to_json(self) -> dict[str, Any]:
        low = [c for c in self.plan if c.kind not in ("full", "unmapped", "expert")]
        fused = {c.piece.param.path: c.piece.param for c in self.plan if c.piece is not None}
        return {
            "schema": "lora-extract-plan/1",
            "base": str(self.base),
            "tuned": str(self.tuned),
            "rule": self.rule,
            "options": self.options.to_json(),
            "low_rank": [{"tensor": c.tuned, "kind": c.kind, "shape": list(c.shape)} for c in low]
            + [{"tensor": p, "kind": "expert", "shape": list(f.shape)} for p, f in fused.items()],
            "other": [c.tuned for c in self.plan if c.kind in ("full", "unmapped")],
            "notes": self.notes,
        }


@dataclass
class ExtractResult:
    output: Path
    base: Path
    tuned: Path
    rule: str
    device: str
    options: ExtractOptions
    adapter: AdapterLayout
    files: list[str]
    adapter_bytes: int
    tuned_bytes: int
    unchanged: int
    below_min_change: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    def modules(self) -> list[dict[str, Any]]:
        return [e.to_json() for _, e in sorted(self.adapter.lora.items())]

    def totals(self) -> dict[str, Any]:
        fs = [e.factors for e in self.adapter.lora.values()]
        energy = sum(f.norm**2 for f in fs)
        residual = sum((f.error * f.norm) ** 2 for f in fs)
        return {
            "modules": len(fs),
            "parameters": sum(f.a.numel() + f.b.numel() for f in fs),
            "error": math.sqrt(residual / energy) if energy else 0.0,
            "max_error": max((f.error for f in fs), default=0.0),
            "adapter_bytes": self.adapter_bytes,
            "tuned_bytes": self.tuned_bytes,
            "size_ratio": self.adapter_bytes / self.tuned_bytes if self.tuned_bytes else 0.0,
        }

    def worst(self) -> list[dict[str, Any]]:
        return sorted(self.modules(), key=lambda m: -m["error"])[:WORST]

    def to_json(self) -> dict[str, Any]:
        a = self.adapter
        return {
            "schema": SCHEMA,
            "output": str(self.output),
            "base": str(self.base),
            "tuned": str(self.tuned),
            "rule": self.rule,
            "device": self.device,
            "options": self.options.to_json(),
            "files": self.files,
            "r": a.r,
            "rank_pattern": a.rank_pattern(),
            "modules": self.modules(),
            "modules_to_save": a.full_modules,
            "full_tensors": a.full_tensors,
            "lora_biases": a.lora_biases,
            "dropped": a.dropped,
            "unchanged": self.unchanged,
            "below_min_change": self.below_min_change,
            "totals": self.totals(),
            "worst": self.worst(),
            "seconds": round(self.seconds, 3),
            "notes": self.notes,
        }


def base_model_id(base_ref: str, base_path: Path, config: dict[str, Any] | None) -> str:
    """``base_model_name_or_path``: the Hub id BASE was named by or lives in the cache of,
    else the one its config records, else BASE as given."""
    named = parse_repo_ref(base_ref)
    if named is not None and not Path(base_ref).exists():
        return named.repo_id
    cached = cached_repo_id(base_path)
    if cached:
        return cached
    recorded = parse_repo_ref(str((config or {}).get("_name_or_path") or ""))
    if recorded is not None and not Path(recorded.repo_id).exists():
        return recorded.repo_id
    return base_ref


def extract(
    base: Path | str,
    tuned: Path | str,
    output: Path | None,
    *,
    rank: str | int = 32,
    energy: float = 0.99,
    max_rank: int = 128,
    exact: bool = False,
    dtype: str = "bf16",
    min_change: float = 0.0,
    include_full: bool | None = None,
    device: str = "auto",
    dry_run: bool = False,
    overwrite: bool = False,
    progress_factory: Any = None,
    notice: Notice | None = None,
    hub_progress: bool = True,
) -> ExtractResult | ExtractPlan:
    """Extract TUNED − BASE as a LoRA adapter at ``output``; raises ``LoraError`` (exit 2)
    for inputs that cannot be paired, before anything is written."""
    opts = parse_options(rank, energy, max_rank, exact, dtype, min_change, include_full)
    if not dry_run:
        if output is None:
            raise UsageError("no output folder given", "pass -o OUTPUT")
        local = [Path(p) for p in (base, tuned) if Path(p).exists()]
        check_destination(output, overwrite, local)  # before any download
    from lora_cli.merge.run import resolve_device

    dev = resolve_device(device)
    base_path = resolve_input(base, "base", notice=notice, progress=hub_progress)
    tuned_path = resolve_input(tuned, "tuned", notice=notice, progress=hub_progress)
    if not dry_run:
        check_destination(Path(output), overwrite, [base_path, tuned_path])
    started = time.monotonic()
    base_src = open_checkpoint(base_path)
    try:
        tuned_src = open_checkpoint(tuned_path)
        try:
            base_config, tuned_config = load_config(base_src), load_config(tuned_src)
            pairing = pair_tensors(
                base_src, tuned_src, base_config, tuned_config, resized_ok=include_full is True
            )
            config = tuned_config or base_config
            model_type = (config or {}).get("model_type")
            plan = candidates(tuned_src, base_src, pairing, module_kinds(config), model_type)
            notes = _tie_notes(pairing)
            if dry_run:
                return ExtractPlan(base_path, tuned_path, pairing.rule, opts, plan, notes)
            import torch

            total = sum(tuned_src.info(c.tuned).nbytes for c in plan)
            progress = progress_factory(total) if progress_factory else None
            walked = walk(
                tuned_src,
                base_src,
                plan,
                svd=SvdOptions(
                    opts.rank,
                    opts.energy,
                    opts.max_rank,
                    opts.exact,
                    getattr(torch, DTYPES[opts.dtype]),
                ),
                min_change=opts.min_change,
                device=dev,
                progress=progress,
            )
            shipped = layout(walked, tuned_src, include_full is not False)
            embed_module = (pairing.embed or "").removesuffix(".weight")
            if embed_module not in shipped.lora and embed_module not in shipped.full_modules:
                notes = [n for n in notes if not n.startswith("lm_head is tied")]
            if not shipped.lora and not shipped.full_tensors:
                raise MergeError(
                    f"{tuned_path}: nothing to extract: no tensor differs from BASE "
                    f"{base_path}" + (" beyond --min-change" if walked.below_min_change else ""),
                    "check that TUNED is the fine-tuned model and BASE its base",
                )
            base_id = base_model_id(str(base), base_path, base_config)
            card = _card(base, tuned, base_id, shipped, opts)
            files, size = write_adapter(
                Path(output),
                shipped,
                tuned_src,
                adapter_config(shipped, base_id),
                card,
                overwrite=overwrite,
            )
            if shipped.dropped:
                notes.append(
                    f"{len(shipped.dropped)} changed tensors are not low-rank targets and were "
                    f"dropped (--no-include-full): {', '.join(shipped.dropped[:5])}"
                    + (" …" if len(shipped.dropped) > 5 else "")
                )
            return ExtractResult(
                Path(output),
                base_path,
                tuned_path,
                pairing.rule,
                dev,
                opts,
                shipped,
                files,
                size,
                tuned_src.total_bytes,
                walked.unchanged,
                walked.below_min_change,
                time.monotonic() - started,
                notes,
            )
        finally:
            tuned_src.close()
    finally:
        base_src.close()


def _tie_notes(pairing: Pairing) -> list[str]:
    if pairing.base_tied and pairing.tuned_tied and pairing.embed:
        return [
            f"lm_head is tied to {pairing.embed} in both models: its change is extracted "
            f"once, on {pairing.embed}; PEFT's merge_and_unload adds it to the shared tensor "
            "(TUNED on both sides), while PEFT's unmerged forward and `lora merge` (which "
            "unties the head) apply it to the input side only"
        ]
    if pairing.tuned_tied and not pairing.base_tied:
        return [
            "TUNED ties lm_head to its input embedding but BASE stores its own: the head is "
            "not compared (load the adapter on a base that ties them too)"
        ]
    if pairing.base_tied and not pairing.tuned_tied:
        return [
            "BASE ties lm_head to its input embedding but TUNED stores its own: lm_head is "
            "extracted against the embedding; merging it unties them"
        ]
    return []


def _card(
    base: Path | str,
    tuned: Path | str,
    base_id: str,
    shipped: AdapterLayout,
    opts: ExtractOptions,
) -> str:
    from lora_cli.merge.card import adapter_card

    hub = base_id if parse_repo_ref(base_id) and not Path(base_id).exists() else None
    command = ["lora", "extract", str(base), str(tuned), "-o", "OUTPUT"]
    command += ["--rank", "auto" if opts.rank is None else str(opts.rank)]
    if opts.rank is None:
        command += ["--energy", f"{opts.energy:g}", "--max-rank", str(opts.max_rank)]
    command += ["--dtype", opts.dtype] + (["--exact"] if opts.exact else [])
    rows = [
        ("r / lora_alpha", f"{shipped.r} / {shipped.r}"),
        ("modules", str(len(shipped.lora))),
        ("modules_to_save", ", ".join(shipped.full_modules) or "-"),
    ]
    return adapter_card(
        base_ref=str(base),
        base_hub_id=hub,
        tuned_ref=str(tuned),
        rows=rows,
        command=command,
        checksums_name=MANIFEST_NAME,
    )
