"""``lora validate OUT --base BASE --tuned TUNED``: how close BASE + OUT comes to TUNED.

Every tensor is recomputed as ``lora merge BASE OUT`` computes it (the merge plan and
``merge.run.compute_tensor``, the one code path for the math) and compared with TUNED's,
relative to the change being approximated: ‖merged − TUNED‖_F / ‖TUNED − BASE‖_F, in fp32.
``--max-error`` turns tensors above it into findings (exit 1) for a CI gate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_cli.errors import EXIT_FINDINGS, EXIT_OK, UsageError
from lora_cli.sources.hub import Notice, resolve_input

SCHEMA = "lora-validate-extracted/1"


@dataclass
class TensorError:
    tensor: str
    kind: str  # merge | replace | copy (as the merge plan produces it)
    error: float  # relative to ‖TUNED − BASE‖; 0 for an unchanged tensor reproduced

    def to_json(self) -> dict[str, Any]:
        return {
            "tensor": self.tensor,
            "kind": self.kind,
            "error": self.error if math.isfinite(self.error) else None,
        }


@dataclass
class ExtractValidation:
    path: Path
    base: Path
    tuned: Path
    max_error: float | None
    tensors: list[TensorError] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return EXIT_FINDINGS if self.findings else EXIT_OK

    def summary_line(self) -> str:
        changed = [t for t in self.tensors if t.error > 0]
        worst = max((t.error for t in self.tensors), default=0.0)
        head = (
            f"{self.path}: {len(self.tensors)} tensors of BASE + adapter compared with TUNED, "
            f"{len(changed)} differ; worst relative error {worst:.4g}"
        )
        if not self.findings:
            bound = f" ≤ --max-error {self.max_error:g}" if self.max_error is not None else ""
            return f"valid: {head}{bound}"
        return f"INVALID: {head}; {len(self.findings)} above --max-error {self.max_error:g}"

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "path": str(self.path),
            "base": str(self.base),
            "tuned": str(self.tuned),
            "max_error": self.max_error,
            "valid": not self.findings,
            "exit_code": self.exit_code,
            "tensors": [t.to_json() for t in self.tensors],
            "findings": list(self.findings),
        }


def validate_extracted(
    path: Path | str,
    *,
    base: Path | str,
    tuned: Path | str,
    max_error: float | None = None,
    device: str = "auto",
    notice: Notice | None = None,
    hub_progress: bool = True,
) -> ExtractValidation:
    if max_error is not None and not (math.isfinite(max_error) and max_error >= 0):
        raise UsageError(f"--max-error {max_error} must be a finite number ≥ 0")
    from lora_cli.adapters.formats import is_adapter, load_adapter
    from lora_cli.extract.pairing import load_config, open_checkpoint, pair_tensors
    from lora_cli.merge.plan import build_plan
    from lora_cli.merge.run import resolve_device

    def resolve(ref: Path | str, what: str) -> Path:
        return resolve_input(ref, what, notice=notice, progress=hub_progress)

    path = resolve(path, "path")
    base_path, tuned_path = resolve(base, "base"), resolve(tuned, "tuned")
    if not is_adapter(path):
        raise UsageError(
            f"{path}: not an adapter; --tuned checks an adapter made by `lora extract`",
            "lora validate ADAPTER --base BASE --tuned TUNED",
        )
    dev = resolve_device(device)
    report = ExtractValidation(path, base_path, tuned_path, max_error)
    base_src = open_checkpoint(base_path)
    try:
        tuned_src = open_checkpoint(tuned_path)
        try:
            pairing = pair_tensors(
                base_src, tuned_src, load_config(base_src), load_config(tuned_src), resized_ok=True
            )
            adapter = load_adapter(path, base_src)
            try:
                plan = build_plan(base_src, adapter)
                _compare(report, plan, pairing.pairs, tuned_src, base_src, pairing.embed, dev)
            finally:
                adapter.close()
        finally:
            tuned_src.close()
    finally:
        base_src.close()
    return report


def _compare(
    report: ExtractValidation,
    plan: Any,
    pairs: dict[str, str],
    tuned: Any,
    base: Any,
    embed: str | None,
    device: str,
) -> None:
    import torch

    from lora_cli.merge.run import compute_tensor

    actions = {a.name: a for a in plan.actions()}
    for t_name, b_name in pairs.items():
        act = actions.get(b_name)
        kind = act.kind if act is not None else "copy"
        target = tuned.read(t_name).to(device=device, dtype=torch.float32)
        start = base.read(b_name if b_name in base else (embed or b_name))
        start = start.to(device=device, dtype=torch.float32)
        value = start
        if act is not None and kind != "copy":
            value = compute_tensor(plan, act, device).to(device=device, dtype=torch.float32)
        error = math.inf  # a shape that differs from TUNED's (a grown vocabulary not shipped)
        if value.shape == target.shape:
            miss = float(torch.linalg.vector_norm(value - target, dtype=torch.float64))
            # a grown vocabulary has no BASE to differ from: relative to TUNED itself
            grown = start.shape != target.shape
            change = float(
                torch.linalg.vector_norm(target if grown else target - start, dtype=torch.float64)
            )
            error = miss / change if change else (0.0 if miss == 0 else math.inf)
        report.tensors.append(TensorError(t_name, kind, error))
        last = report.tensors[-1]
        if report.max_error is not None and not last.error <= report.max_error:
            report.findings.append(
                f"{t_name}: relative error {last.error:.4g} > --max-error {report.max_error:g}"
            )
