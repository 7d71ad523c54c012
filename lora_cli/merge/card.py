"""The merged folder's ``README.md``: a Hugging Face model card describing this merge.

The base's own card describes the base, not what was merged into it, so it is not copied.
The front matter follows the Hub's model-card metadata: ``base_model`` (a Hub id), and
``base_model_relation: finetune``: of the Hub's four relations (adapter, merge, quantized,
finetune), ``adapter`` is a repo holding adapter weights to load on top of the base and
``merge`` a combination of several models; full weights equal to the base plus a trained
low-rank update are a fine-tune of that base.

The card is a pure function of the inputs and options, so merging twice gives the same bytes:
the output folder is written as ``OUTPUT`` in the command line, and the date honours
``SOURCE_DATE_EPOCH`` (the reproducible-builds convention) before the clock.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_cli import __version__

CARD_NAME = "README.md"
LIBRARY_NAME = "transformers"
TAGS = ["lora", "peft", "merged-lora", "lora-cli"]


@dataclass(frozen=True)
class MergedAdapter:
    """One adapter as the user named it (path or Hub id) and its parsed config."""

    ref: str
    config_path: Path
    config: dict[str, Any]


def model_card(
    *,
    base_ref: str,
    base_hub_id: str | None,
    adapters: Sequence[MergedAdapter],
    command: Sequence[str],
    checksums_name: str,
) -> str:
    """The card's text. ``base_hub_id``: the base's Hub id when one is known (the front
    matter's ``base_model`` must be a Hub id, never a local path)."""
    meta: list[str] = ["---"]
    if base_hub_id:
        meta += [f"base_model: {_q(base_hub_id)}", "base_model_relation: finetune"]
    meta += [f"library_name: {LIBRARY_NAME}", "tags:", *[f"- {_q(t)}" for t in TAGS], "---"]
    names = ", ".join(f"`{a.ref}`" for a in adapters)
    lines = [
        *meta,
        "",
        f"# {Path(base_ref).name or base_ref} + {names}",
        "",
        f"The base model `{base_ref}` with the LoRA adapter{'s' if len(adapters) > 1 else ''} "
        f"{names} merged into its weights by [lora](https://pypi.org/project/lora-cli/) "
        f"{__version__}. It loads like any transformers checkpoint; no PEFT needed.",
        "",
        "| | |",
        "|---|---|",
        f"| base | `{base_ref}` |",
    ]
    for a in adapters:
        lines += _adapter_rows(a, len(adapters) > 1)
    lines += [
        f"| lora version | {__version__} |",
        *_provenance(command, checksums_name),
    ]
    return "\n".join(lines)


def _provenance(command: Sequence[str], checksums_name: str) -> list[str]:
    """The card's last rows (command, date) and its checksums section."""
    return [
        f"| command | `{shlex.join(command)}` (OUTPUT: this folder) |",
        f"| date | {_date()} |",
        "",
        "## Checksums",
        "",
        f"`{checksums_name}` lists the sha256 of every other file in this folder; check them with "
        f"`sha256sum -c {checksums_name}` or `lora validate .`.",
        "",
    ]


def config_sha256(config_path: Path) -> str:
    return hashlib.sha256(config_path.read_bytes()).hexdigest()


def _adapter_rows(a: MergedAdapter, numbered: bool) -> list[str]:
    c = a.config
    targets = c.get("target_modules")
    if isinstance(targets, list):
        targets = ", ".join(str(t) for t in targets)
    label = f"adapter `{a.ref}`" if numbered else "adapter"
    rows = [
        (label, f"`{a.ref}`"),
        ("adapter_config.json sha256", f"`{config_sha256(a.config_path)}`"),
        ("peft_type", c.get("peft_type", "-")),
        ("r / lora_alpha", f"{c.get('r', '-')} / {c.get('lora_alpha', '-')}"),
        ("target_modules", f"`{targets}`" if targets else "-"),
    ]
    for key in ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern", "modules_to_save"):
        if c.get(key):
            rows.append((key, f"`{json.dumps(c[key], sort_keys=True)}`"))
    return [f"| {k} | {_cell(v)} |" for k, v in rows]


def _date() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    when = (
        dt.datetime.fromtimestamp(int(epoch), dt.timezone.utc)
        if epoch.isdigit()
        else dt.datetime.now(dt.timezone.utc)
    )
    return when.date().isoformat()


def _q(text: str) -> str:
    """A YAML scalar: a JSON string is valid YAML."""
    return json.dumps(text)


def _cell(value: object) -> str:
    """A Markdown table cell: a ``|`` in a value would end the cell."""
    return str(value).replace("|", "\\|")


def adapter_card(
    *,
    base_ref: str,
    base_hub_id: str | None,
    tuned_ref: str,
    rows: Sequence[tuple[str, str]],
    command: Sequence[str],
    checksums_name: str,
) -> str:
    """The card of an adapter extracted by ``lora extract``: a PEFT adapter of the base
    (``base_model_relation: adapter``), loaded with PEFT on top of it."""
    meta: list[str] = ["---"]
    if base_hub_id:
        meta += [f"base_model: {_q(base_hub_id)}", "base_model_relation: adapter"]
    tags = ["lora", "peft", "extracted-lora", "lora-cli"]
    meta += ["library_name: peft", "tags:", *[f"- {_q(t)}" for t in tags], "---"]
    lines = [
        *meta,
        "",
        f"# LoRA extracted from `{tuned_ref}`",
        "",
        f"The difference between `{tuned_ref}` and its base `{base_ref}`, as a PEFT LoRA "
        f"adapter (truncated SVD of each weight's change) written by "
        f"[lora](https://pypi.org/project/lora-cli/) {__version__}. Load it with "
        "`PeftModel.from_pretrained(base, this_folder)`, serve it beside other adapters, or "
        "fold it back with `lora merge`.",
        "",
        "| | |",
        "|---|---|",
        f"| base | `{base_ref}` |",
        f"| fine-tuned | `{tuned_ref}` |",
        *[f"| {k} | {_cell(v)} |" for k, v in rows],
        f"| lora version | {__version__} |",
        *_provenance(command, checksums_name),
    ]
    return "\n".join(lines)
