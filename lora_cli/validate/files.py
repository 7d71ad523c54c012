"""Per-file pieces shared by the checkpoint and the adapter checks: a reader error
turned into a finding's (tensor, message), the readability test that makes validation
impossible rather than failed, a tensor's NaN/Inf finding, and the checksum manifest.
"""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from lora_cli.errors import FormatError, LoraError
from lora_cli.io import sysio
from lora_cli.io.layout import MANIFEST_NAME, read_manifest, sha256_file
from lora_cli.validate.numeric import count_nonfinite
from lora_cli.validate.report import ValidateReport

if TYPE_CHECKING:
    import torch

    from lora_cli.io.reader import TensorInfo

_TENSOR_PREFIX = re.compile(r"^tensor ('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"): ")


def split_error(exc: LoraError, file: Path) -> tuple[str | None, str]:
    """(tensor, message) from a reader error, without the file prefix it already carries."""
    message = exc.message
    for prefix in (f"{file}: ", f"{file.name}: "):
        if message.startswith(prefix):
            message = message[len(prefix) :]
            break
    m = _TENSOR_PREFIX.match(message)
    if m:
        try:
            return str(ast.literal_eval(m.group(1))), message[m.end() :]
        except (ValueError, SyntaxError):
            pass
    return None, message


def ensure_readable(path: Path) -> None:
    """A file we may not open makes validation impossible (exit 2), not a finding."""
    try:
        os.close(sysio.open_regular(path))
    except OSError as exc:
        raise FormatError(f"{path}: cannot read ({exc.strerror})") from None


def check_finite(report: ValidateReport, file: Path, info: TensorInfo, t: torch.Tensor) -> bool:
    """Add a ``finite`` finding when floating point ``t`` holds NaN or Inf; False then."""
    nan, inf = count_nonfinite(t)
    if nan or inf:
        report.add(
            file,
            info.name,
            "finite",
            f"{nan + inf} of {info.numel} values are not finite ({nan} NaN, {inf} Inf)",
        )
    return not (nan or inf)


def check_manifest(
    report: ValidateReport,
    root: Path,
    only: set[str] | None = None,
    *,
    skip: set[str] = frozenset(),
    extra: bool = True,
) -> None:
    """Verify ``lora-checksums.sha256`` when there is one; ``only``: those files' lines;
    ``skip``: files another ``--part`` checks; ``extra``: note files the manifest misses."""
    try:
        entries = read_manifest(root)
    except (LoraError, OSError, UnicodeDecodeError) as exc:
        report.add(MANIFEST_NAME, None, "manifest", getattr(exc, "message", str(exc)))
        return
    if entries is None:
        if only is None and extra:
            report.notes.append(f"no checksum manifest ({MANIFEST_NAME}) to verify")
        return
    report.ran("manifest")
    for name, digest in entries.items():
        if (only is not None and name not in only) or name in skip:
            continue
        p = root / name
        if "/" in name or name in (".", "..") or not p.is_file():
            report.add(name, None, "manifest", "listed in the checksum manifest but missing")
            continue
        ensure_readable(p)
        actual = sha256_file(p)
        if actual != digest.lower():
            report.add(
                name,
                None,
                "manifest",
                f"sha256 {actual[:12]}… differs from the manifest's {digest[:12]}…: the file "
                "changed after it was written",
            )
    if only is not None:
        for name in sorted(only - set(entries)):
            report.notes.append(f"{name} is not listed in {MANIFEST_NAME}")
        return
    if not extra:
        return
    extra = sorted(
        p.name
        for p in root.iterdir()
        if p.is_file() and p.name != MANIFEST_NAME and p.name not in entries
        and not p.name.startswith(".")
    )  # fmt: skip
    if extra:
        report.notes.append(f"files not covered by {MANIFEST_NAME}: {', '.join(extra)}")
