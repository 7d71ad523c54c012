"""How ``lora extract`` and ``lora validate --tuned`` results look to a person or a machine."""

from __future__ import annotations

from typing import Any

from lora_cli import output
from lora_cli.output import human_bytes


def extract_result(result: Any, json_out: bool, quiet: bool) -> None:
    from lora_cli.stages.extract import ExtractPlan

    if isinstance(result, ExtractPlan):
        doc = result.to_json()
        if json_out:
            output.print_json(doc)
            return
        output.key_values(
            "extract plan (dry run: nothing read or written)",
            [
                ("name resolution", doc["rule"]),
                ("low-rank targets", len(doc["low_rank"])),
                ("other tensors (shipped whole if changed)", len(doc["other"])),
            ],
        )
        for m in doc["low_rank"]:
            output.out().print(f"  {m['kind']:9s} {m['tensor']} {m['shape']}", markup=False)
        for note in doc["notes"]:
            output.info(f"note: {note}")
        return
    doc = result.to_json()
    if json_out:
        output.print_json(doc)
        return
    for note in result.notes:
        output.info(f"note: {note}")
    if quiet:
        return
    t = doc["totals"]
    output.table(
        "worst modules (relative error ‖Δ − BA‖/‖Δ‖)",
        ["module", "kind", "rank", "energy kept", "error"],
        [
            [m["module"], m["kind"], m["rank"], f"{m['energy']:.4f}", f"{m['error']:.4f}"]
            for m in doc["worst"]
        ],
    )
    output.out().print(
        f"extracted {t['modules']} modules (r={doc['r']}"
        + (f", {len(doc['rank_pattern'])} in rank_pattern" if doc["rank_pattern"] else "")
        + f"), {len(doc['modules_to_save'])} modules_to_save, {len(doc['lora_biases'])} "
        f"biases; {doc['unchanged']} tensors unchanged, {doc['below_min_change']} below "
        f"--min-change → {result.output}\n"
        f"error {t['error']:.4f} overall, {t['max_error']:.4f} worst; adapter "
        f"{human_bytes(t['adapter_bytes'])} = {100 * t['size_ratio']:.2f}% of TUNED "
        f"({human_bytes(t['tuned_bytes'])}); device {result.device}; {result.seconds:.2f}s",
        markup=False,
    )


def extract_validation(report: Any, json_out: bool) -> int:
    """One line per finding, a summary; or the JSON document. Returns the exit code."""
    doc = report.to_json()
    if json_out:
        output.print_json(doc)
        return report.exit_code
    for f in doc["findings"]:
        output.out().print(f"FINDING {f}", markup=False)
    worst = sorted(doc["tensors"], key=lambda t: -(t["error"] or 0))[:5]
    if worst:
        output.table(
            "worst tensors (‖BASE + BA − TUNED‖/‖TUNED − BASE‖)",
            ["tensor", "kind", "error"],
            [[t["tensor"], t["kind"], f"{t['error']:.4f}"] for t in worst],
        )
    output.out().print(report.summary_line(), markup=False)
    return report.exit_code
