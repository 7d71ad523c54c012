"""How each stage's result looks to a person (tables) or a machine (one JSON document)."""

from __future__ import annotations

from typing import Any

from lora_cli import output
from lora_cli.output import human_bytes, plural

# Every text line goes through ``output`` (``line``, ``info``, ``warn``, tables), which
# escapes the control characters a name read from a file may carry; JSON stays exact.


def inspect_report(report: Any, json_out: bool) -> None:
    if json_out:
        output.print_json(report.to_json())
        return
    output.key_values(
        f"{report.path} — {report.kind} ({report.format})",
        [
            ("tensors", report.tensors),
            ("parameters", f"{report.parameters:,}"),
            ("size", human_bytes(report.bytes)),
            ("dtypes", ", ".join(f"{k}×{v}" for k, v in report.dtypes.items()) or "-"),
            ("files", ", ".join(f["name"] for f in report.files)),
        ],
    )
    if report.adapter:
        a = report.adapter
        targets = a["target_modules"]
        pairs = [
            ("format", a["format"]),
            ("weights file", a["weights_file"]),
            ("producer", a["producer"]),
            ("peft_type", a["peft_type"]),
            ("variant", a["variant"] + ("" if a["mergeable"] else " (cannot be merged)")),
            ("base model", a["base_model_name_or_path"] or "-"),
            ("r / alpha", f"{a['r']} / {a['lora_alpha']}"),
            ("rslora / dora", f"{a['use_rslora']} / {a['use_dora']}"),
            ("fan_in_fan_out", a["fan_in_fan_out"]),
            ("bias / lora_bias", f"{a['bias']} / {a['lora_bias']}"),
            ("init_lora_weights", a["init_lora_weights"]),
            ("target_modules", f"{targets!r} ({a['target_modules_kind']})"),
        ]
        if a["target_modules_kind"] == "regex":
            pairs.append(
                ("regex matches", f"{len(a['regex_matches'])} of {len(a['modules'])} modules")
            )
        for key, value in (a.get("native") or {}).items():
            if value is not None:
                pairs.append((f"{a['format']} {key}", value))
        if a["modules_to_save"]:
            pairs.append(("modules_to_save", ", ".join(a["modules_to_save"])))
        if a["trainable_tokens"]:
            pairs.append(("trainable tokens", a["trainable_tokens"]))
        output.key_values("adapter", pairs)
        output.table(
            "LoRA modules",
            ["module", "kind", "r", "alpha", "scale", "dora"],
            [
                [m["name"], m["kind"], m["r"], m["alpha"], f"{m['scale']:.4g}", m["dora"]]
                for m in a["modules"]
            ],
        )
        if a["replacements"]:
            output.table("full replacement tensors", ["tensor"], [[r] for r in a["replacements"]])
    if getattr(report, "training", None):
        t = report.training
        skip = ("lora_modules", "trained_base_params", "shared_params", "files", "notes")
        output.key_values("training checkpoint", [(k, v) for k, v in t.items() if k not in skip])
        for note in t["notes"]:
            output.info(note)
        if t["trained_base_params"]:
            output.table("trained base parameters", ["tensor"],
                         [[n] for n in t["trained_base_params"]])  # fmt: skip
    if report.checkpoint:
        c = report.checkpoint
        output.key_values(
            "checkpoint",
            [
                (
                    "architectures",
                    c["architectures"] or ("-" if c["config"] else "- (no config.json)"),
                ),
                ("model_type", c["model_type"] or "-"),
                ("torch_dtype", c["torch_dtype"] or "-"),
                ("tie_word_embeddings", c["tie_word_embeddings"]),
                ("lm_head.weight stored", c["has_lm_head"]),
                ("index", c["index"] or "-"),
                ("shared tensors", "; ".join(", ".join(g) for g in c["shared_tensors"]) or "-"),
            ],
        )
        q = c.get("quantization")
        if q:
            output.table(
                f"quantized tensors ({q['method'] or 'no quantization_config'})",
                ["scheme", "family", "tensors", "merge"],
                [[f["scheme"], f["family"], f["tensors"], f["merge"]] for f in q["families"]],
            )
    for w in report.warnings:
        output.warn(w)


def convert_result(result: Any, json_out: bool, quiet: bool) -> None:
    if json_out:
        output.print_json(result.to_json())
        return
    for note in result.notes:
        output.info(f"note: {note}")
    if result.dropped:
        what = "non-adapter or non-tensor entr"
        output.warn(
            f"dropped {plural(len(result.dropped), what + 'y', what + 'ies')}: "
            + ", ".join(result.dropped[:5])
            + (" …" if len(result.dropped) > 5 else "")
        )
    if quiet:
        return
    output.line(
        f"converted {plural(result.tensors, 'tensor')} ({human_bytes(result.bytes)}) → "
        f"{result.output} in {result.seconds:.2f}s; every tensor re-read and verified bit-exact"
    )


def merge_result(result: Any, json_out: bool, quiet: bool) -> None:
    from lora_cli.stages.merge import DryRun

    if isinstance(result, DryRun):
        doc = result.to_json()
        if json_out:
            output.print_json({"schema": "lora-merge-plan/1", **doc})
            return
        c = doc["counts"]
        output.key_values(
            "merge plan (dry run: nothing written)",
            [
                ("name resolution", doc["rule"]),
                *[
                    ("adapter × weight", f"{a['path']} × {a['weight']:g}")
                    for a in doc.get("adapters", [])
                ],
                ("to merge", c["merge"]),
                ("to replace", c["replace"]),
                ("token rows", c["rows"]),
                ("to copy", c["copy"]),
                ("untie embeddings", doc["untie_embeddings"]),
                ("config updates", doc["config_updates"] or "-"),
                ("tokenizer", _tokenizer_from(doc.get("tokenizer_from"))),
                ("output shards", ", ".join(doc["shards"])),
            ],
        )
        for kind in ("merge", "replace", "rows"):
            for name in doc["tensors"][kind]:
                output.line(f"  {kind:7s} {name}")
        for w in doc["warnings"]:
            output.warn(w)
        return
    doc = merge_json(result)
    if json_out:
        output.print_json(doc)
        return
    for w in result.warnings:
        output.warn(w)
    if result.tokenizer_from:
        output.info(f"note: tokenizer files {_tokenizer_from(result.tokenizer_from)}")
    if result.untied:
        output.info(
            "note: the adapter changes only one of the tied embeddings; wrote both and set "
            "tie_word_embeddings=false"
        )
    if quiet:
        return
    if result.adapters:
        output.line(
            "adapters (weighted sum, one pass): "
            + ", ".join(f"{a['path']} × {a['weight']:g}" for a in result.adapters)
        )
    c = result.counts
    if result.part is not None:
        output.line(f"part {result.part}: {', '.join(result.files)}")
    output.line(
        f"merged {plural(c['merge'], 'tensor')}, replaced {c['replace']}, token rows "
        f"{c['rows']}, copied {c['copy']} → {result.output}"
    )
    output.line(
        f"name resolution: {result.rule}; device {result.device}; "
        f"{result.seconds:.2f}s, {human_bytes(result.throughput)}/s"
    )
    if result.pushed and result.pushed.get("commit_url"):
        output.out().print(
            f"pushed to {result.pushed['repo']}: "
            f"{result.pushed.get('pr_url') or result.pushed['commit_url']}",
            markup=False,
        )
    cosines = [q["cosine"] for q in result.quantized if q["cosine"] is not None]
    if cosines:
        output.line(
            f"re-quantized {plural(len(result.quantized), 'merged tensor')} into the base's "
            "format; "
            f"change kept with cosine {min(cosines):.3f} (worst) to {max(cosines):.3f}"
        )


def _tokenizer_from(side: dict[str, Any] | None) -> str:
    if not side:
        return "the base's"
    return f"from the adapter {side['adapter']}: {', '.join(side['files'])} (not the base's)"


def merge_json(result: Any) -> dict[str, Any]:
    return {
        "schema": "lora-merge/1",
        "output": str(result.output),
        "files": result.files,
        "counts": result.counts,
        "rule": result.rule,
        "renames": result.renames,
        "device": result.device,
        "seconds": round(result.seconds, 3),
        "bytes": result.bytes_written,
        "bytes_per_second": round(result.throughput),
        "untie_embeddings": result.untied,
        "config_updates": result.config_updates,
        "warnings": result.warnings,
        "tokenizer_from": result.tokenizer_from,
        "quantized": result.quantized,
        **({"adapters": result.adapters} if result.adapters else {}),
        "part": result.part,
        **({"fetched": result.fetched} if result.fetched is not None else {}),
        **({"pushed": result.pushed} if result.pushed is not None else {}),
    }


def validate_report(report: Any, json_out: bool) -> int:
    """Findings one per line on stdout (``FINDING file: tensor: check: message``), notes on
    stderr, then one summary line; or the JSON document. Returns the exit code (0 or 1)."""
    if json_out:
        output.print_json(report.to_json())
        return report.exit_code
    for f in report.findings:
        output.line(f"FINDING {f.line()}")
    for w in report.notes:
        output.info(f"note: {w}")
    output.line(report.summary_line())
    return report.exit_code
