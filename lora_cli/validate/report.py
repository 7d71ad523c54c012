"""What ``validate`` returns: findings as records (file, tensor, check, message), the
tensors compared with BASE + ADAPTER, and the ``lora-validate/1`` JSON document.

Nothing here checks anything; every check module fills one ``ValidateReport``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_cli.errors import EXIT_FINDINGS, EXIT_OK
from lora_cli.validate.numeric import DEFAULT_ULPS

SCHEMA = "lora-validate/1"

# Check names, stable in the JSON document.
CHECKS = (
    "header",  # safetensors header (Rust rules) / torch zip structure; the file can be read
    "index",  # index ↔ shards: no missing or extra shard, names agree, total_size
    "duplicates",  # a tensor name in two files; aliased storage
    "shapes",  # dtypes and shapes sane (zero-size tensors)
    "finite",  # NaN / Inf values
    "config",  # config.json ↔ weights (tie_word_embeddings, dtype)
    "manifest",  # lora-checksums.sha256
    "adapter",  # adapter config and tensors (what `inspect` warns about)
    "adapter-base",  # adapter keys and shapes against --base
    "untouched",  # tensors the adapter does not touch are byte-identical to the base's
    "recompute",  # touched tensors equal BASE + ADAPTER within tolerance; coverage
)


@dataclass
class Finding:
    file: str
    tensor: str | None
    check: str
    message: str

    def line(self) -> str:
        where = f"{self.file}: {self.tensor}" if self.tensor else self.file
        return f"{where}: {self.check}: {self.message}"

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "tensor": self.tensor,
            "check": self.check,
            "message": self.message,
        }


@dataclass
class Recomputed:
    """One tensor of PATH compared with what BASE + ADAPTER give."""

    tensor: str
    kind: str  # copy | merge | replace | rows
    max_abs_error: float  # inf where NaN-ness differs
    max_ulp: int | None  # None where NaN-ness differs or the dtype is not floating point
    ok: bool
    rows: list[tuple[int, int]] | None = None  # row ranges compared; None: the whole tensor

    def to_json(self) -> dict[str, Any]:
        return {
            "tensor": self.tensor,
            "kind": self.kind,
            "max_abs_error": self.max_abs_error if math.isfinite(self.max_abs_error) else None,
            "max_ulp": self.max_ulp,
            "ok": self.ok,
            "rows": [list(r) for r in self.rows] if self.rows else None,
        }


@dataclass
class ValidateReport:
    path: Path
    kind: str  # checkpoint | file | adapter
    base: Path | None = None
    adapter: Path | None = None
    adapters: list[Path] = field(default_factory=list)  # several adapters merged together
    weights: list[float] | None = None  # their --weights
    atol: float = 0.0
    rtol: float = 0.0
    sample: int | None = None
    part: str | None = None  # "I/N": only part I's weight files were read
    findings: list[Finding] = field(default_factory=list)
    recomputed: list[Recomputed] = field(default_factory=list)
    checks: dict[str, str] = field(default_factory=dict)  # check → ok | failed
    notes: list[str] = field(default_factory=list)
    tensors_checked: int = 0

    @property
    def valid(self) -> bool:
        return not self.findings

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.valid else EXIT_FINDINGS

    def ran(self, check: str) -> None:
        self.checks.setdefault(check, "ok")

    def add(self, file: str | Path, tensor: str | None, check: str, message: str) -> None:
        name = file.name if isinstance(file, Path) else file
        self.findings.append(Finding(name, tensor, check, message))
        self.checks[check] = "failed"

    def summary_line(self) -> str:
        compared = (
            f", {len(self.recomputed)} compared with BASE + ADAPTER" if self.recomputed else ""
        )
        part = f", part {self.part}" if self.part else ""
        read = f"{self.tensors_checked} tensor{'s' * (self.tensors_checked != 1)} read"
        head = f"{self.path} ({self.kind}{part}): {read}{compared}"
        if self.valid:
            return f"VALID: {head}; checks passed: {', '.join(self.checks)}"
        failed = [c for c, s in self.checks.items() if s == "failed"]
        n = len(self.findings)
        return f"INVALID: {head}; {n} finding{'s' * (n != 1)} ({', '.join(failed)})"

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "path": str(self.path),
            "kind": self.kind,
            "valid": self.valid,
            "exit_code": self.exit_code,
            "base": str(self.base) if self.base else None,
            "adapter": str(self.adapter) if self.adapter else None,
            **(
                {"adapters": [str(a) for a in self.adapters], "weights": self.weights}
                if len(self.adapters) > 1 or self.weights is not None
                else {}
            ),
            "tolerance": {"ulp": DEFAULT_ULPS, "atol": self.atol, "rtol": self.rtol},
            "sample": self.sample,
            "part": self.part,
            "tensors_checked": self.tensors_checked,
            "checks": dict(self.checks),
            "findings": [f.to_json() for f in self.findings],
            "recomputed": [r.to_json() for r in self.recomputed],
            "notes": list(self.notes),
        }
