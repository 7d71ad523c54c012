"""Validation of an adapter folder or adapter weights file: its config, every tensor
(readable, finite), the checksum manifest, what ``inspect`` warns about (all-zero
lora_B, regex target_modules that match nothing), and, with ``--base``, whether the
adapter's keys and shapes fit that base model (the merge preflight).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lora_cli.adapters.findings import AdapterFinding, config_findings, value_findings
from lora_cli.adapters.formats import adapter_format
from lora_cli.adapters.formats import load_adapter as load_any_adapter
from lora_cli.adapters.peft import find_adapter_files, load_adapter
from lora_cli.errors import LoraError
from lora_cli.io.adapter_files import CONFIG_NAME
from lora_cli.io.dtypes import FLOAT_DTYPES
from lora_cli.io.layout import MAX_ADAPTER_CONFIG_BYTES, read_json
from lora_cli.io.reader import TensorSource, open_source
from lora_cli.validate.files import check_finite, check_manifest, ensure_readable, split_error
from lora_cli.validate.report import ValidateReport


def validate_adapter(report: ValidateReport, path: Path, base: Path | TensorSource | None) -> None:
    """Fill ``report`` with the findings on the adapter at ``path`` (against ``base``)."""
    r = report
    r.ran("adapter")
    if adapter_format(path) in ("mlx-lm", "gguf"):
        _validate_converted(r, path, base)
        return
    try:
        config_path, weights = find_adapter_files(path)
    except LoraError as exc:
        r.add(CONFIG_NAME, None, "adapter", exc.message)
        return
    root = config_path.parent
    ensure_readable(config_path)
    ensure_readable(weights)
    config: dict[str, Any] | None = None
    try:
        config = read_json(config_path, "adapter config", max_bytes=MAX_ADAPTER_CONFIG_BYTES)
        if "peft_type" not in config:
            r.add(config_path, None, "adapter", "no 'peft_type': not a PEFT adapter config")
            config = None
    except LoraError as exc:
        r.add(config_path, None, "adapter", split_error(exc, config_path)[1])

    r.ran("header")
    r.ran("finite")
    tensors_ok = True
    try:
        src = open_source(weights)
    except LoraError as exc:
        tensor, message = split_error(exc, weights)
        r.add(weights, tensor, "header", message)
        src = None
        tensors_ok = False
    if src is not None:
        with src:
            for info in src.infos.values():
                r.tensors_checked += 1
                try:
                    t = src.read(info.name)
                except LoraError as exc:
                    tensor, message = split_error(exc, weights)
                    r.add(weights, tensor or info.name, "header", message)
                    tensors_ok = False
                    continue
                if (
                    info.dtype in FLOAT_DTYPES
                    and info.numel
                    and not check_finite(r, weights, info, t)
                ):
                    tensors_ok = False
    if path.is_dir():
        check_manifest(r, root)
    else:
        check_manifest(r, root, {weights.name})
    if config is None or src is None:
        return
    try:
        adapter = load_adapter(path)
    except LoraError as exc:
        r.add(weights, None, "adapter", split_error(exc, weights)[1])
        return
    try:
        for w in adapter.warnings:
            r.add(weights, None, "adapter", w)
            tensors_ok = tensors_ok and "zero-size" not in w and "no LoRA tensors" not in w
        add_adapter_findings(r, value_findings(adapter) + config_findings(adapter))
        if base is not None:
            _adapter_against_base(r, adapter, base, tensors_ok)
    finally:
        adapter.close()


def add_adapter_findings(r: ValidateReport, findings: list[AdapterFinding]) -> None:
    """The findings ``merge`` refuses are validate findings; its warnings are notes."""
    r.ran("adapter")
    for f in findings:
        if f.refuses:
            r.add(f.file, None, "adapter", f.message)
        else:
            r.notes.append(f"{f.file.name}: {f.message}")


def _adapter_against_base(
    r: ValidateReport, adapter: Any, base: Path | TensorSource, tensors_ok: bool
) -> None:
    """The merge preflight (``plan_merge``) of ``adapter`` on ``base``, as a finding."""
    from lora_cli.errors import MergeError
    from lora_cli.merge.quantized import plan_merge

    if not tensors_ok:
        r.notes.append("adapter not checked against --base: fix the tensor findings first")
        return
    r.ran("adapter-base")
    if isinstance(base, TensorSource):
        base_src, owned = base, False
    else:
        base_src, owned = open_source(base), True
    try:
        plan = plan_merge(base_src, adapter)  # (quantized bases included)
        if plan.renames():
            r.notes.append(
                f"{len(plan.renames())} adapter names paired with differently named base "
                f"tensors by {plan.rule} (`lora merge --dry-run --json` lists each)"
            )
    except MergeError as exc:
        r.add(adapter.config_path, None, "adapter-base", exc.message)
    finally:
        if owned:
            base_src.close()


def _validate_converted(r: ValidateReport, path: Path, base: Path | TensorSource | None) -> None:
    """mlx-lm and GGUF LoRA adapters: every tensor in its PEFT form (readable, finite),
    the reader's warnings, and with ``base`` the merge preflight against it."""
    r.ran("header")
    r.ran("finite")
    base_src = open_source(base) if isinstance(base, Path) else base
    try:
        try:
            adapter = load_any_adapter(path, base_src)
        except LoraError as exc:
            r.add(path, None, "adapter", exc.message)
            return
        try:
            tensors_ok = True
            src = adapter.source
            for info in src.infos.values():
                r.tensors_checked += 1
                t = src.read(info.name)
                if info.dtype in FLOAT_DTYPES and info.numel:
                    tensors_ok = check_finite(r, adapter.weights_file, info, t) and tensors_ok
            for w in adapter.warnings:
                r.add(adapter.weights_file, None, "adapter", w)
            add_adapter_findings(r, value_findings(adapter) + config_findings(adapter))
            if base_src is not None:
                _adapter_against_base(r, adapter, base_src, tensors_ok)
        finally:
            adapter.close()
    finally:
        if base_src is not None:
            base_src.close()
