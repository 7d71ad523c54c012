"""Recompute mode of ``validate``: every tensor of PATH against what merging BASE with
ADAPTER gives. Untouched tensors must match the base's bytes; adapter-touched ones must
equal ``merge.run.compute_tensor`` (the one shared code path) within the tolerance, in
full or, with ``--sample``, on seeded row blocks. Coverage (missing and extra tensors,
config updates) is checked at the end.

``weights.WeightsCheck`` owns the pass over PATH and calls ``compare`` once per tensor.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_cli.adapters.findings import config_findings, value_findings
from lora_cli.adapters.formats import load_adapter
from lora_cli.errors import LoraError
from lora_cli.io.dtypes import FLOAT_DTYPES
from lora_cli.io.layout import read_json
from lora_cli.io.reader import TensorInfo, TensorSource, open_source
from lora_cli.validate.adapter import add_adapter_findings
from lora_cli.validate.numeric import DEFAULT_ULPS, Diff, compare
from lora_cli.validate.report import Recomputed, ValidateReport

if TYPE_CHECKING:
    import torch

    from lora_cli.merge.plan import MergePlan, TensorAction

SAMPLE_BLOCKS = 2  # row blocks recomputed per big adapter-touched tensor with --sample


class Recompute:
    """The merge plan of BASE + ADAPTER and the tensors of PATH compared with it so far."""

    def __init__(self, report: ValidateReport, device: str) -> None:
        self.r = report
        self.device = device
        self.plan: MergePlan | None = None
        self.actions: dict[str, TensorAction] = {}
        self.selected: set[str] = set()
        self.seen: set[str] = set()
        self.dev = "cpu"
        self.row_sampled = 0
        self.sample_note = ""
        self.base_src: TensorSource | None = None
        self.adapter_objs: list[Any] = []

    def prepare(self, infos: dict[str, TensorInfo]) -> None:
        """Open BASE and ADAPTER, plan the merge, and choose the tensors to compare."""
        from lora_cli.merge.quantized import (
            is_quantized_base,
            plan_merge,
            quantize_mode_of,
            refuse_quantized_base,
        )
        from lora_cli.merge.run import resolve_device

        r = self.r
        assert r.base is not None and r.adapter is not None
        self.dev = resolve_device(self.device)
        from lora_cli.sources.checkpoint_detect import is_training_checkpoint

        if len(r.adapters or [r.adapter]) == 1 and is_training_checkpoint(r.adapter):
            # DeepSpeed, FSDP, PeftModel state dict: base view + adapter from the checkpoint
            from lora_cli.adapters.checkpoint import open_checkpoint_adapter

            split = open_checkpoint_adapter(r.adapter, r.base)
            self.base_src = split.base
            self.adapter_objs.append(split.adapter)
        else:
            self.base_src = open_source(r.base)
            for path in r.adapters or [r.adapter]:
                self.adapter_objs.append(load_adapter(path, self.base_src))
        for ad in self.adapter_objs:  # what merge refuses or warns about, found here too
            add_adapter_findings(r, config_findings(ad) + value_findings(ad))
        # (a merge into a quantized base writes bf16 without --dtype, which it refuses)
        quantized_base = is_quantized_base(self.base_src)
        path_floats = {i.dtype for i in infos.values() if i.dtype in FLOAT_DTYPES}
        base_floats = {i.dtype for i in self.base_src.infos.values() if i.dtype in FLOAT_DTYPES}
        out_dtype = None
        quantize = quantize_mode_of(self.base_src, infos)
        if len(path_floats) == 1 and path_floats != base_floats and not quantized_base:
            out_dtype = next(iter(path_floats))
            r.notes.append(
                f"every floating point tensor of PATH is {out_dtype} (BASE: "
                f"{', '.join(sorted(base_floats))}): recomputed as `merge --dtype` {out_dtype}"
            )
        if quantize == "keep":
            r.notes.append(
                "PATH keeps the base's quantization: recomputed as `merge --quantize keep`"
            )
            out_dtype = None  # re-quantized weights are not a --dtype
        if len(self.adapter_objs) == 1 and r.weights is None:
            self.plan = plan_merge(
                self.base_src, self.adapter_objs[0], out_dtype=out_dtype, quantize=quantize
            )
        else:  # several adapters: the same combined plan as `merge A1 A2 … --weights`
            from lora_cli.merge.combine import build_combined_plan

            refuse_quantized_base(self.base_src, "several adapters in one pass")
            self.plan = build_combined_plan(
                self.base_src,
                self.adapter_objs,
                r.weights or [1.0] * len(self.adapter_objs),
                out_dtype=out_dtype,
            )
        self.base_src = self.plan.base  # the (possibly dequantizing) view the plan reads
        self.actions = {a.name: a for a in self.plan.actions()}
        touched = [n for n, a in self.actions.items() if a.kind != "copy"]
        untouched = [n for n, a in self.actions.items() if a.kind == "copy"]
        if r.sample is None:
            chosen = untouched
        else:
            chosen = sorted(untouched, key=lambda n: hashlib.sha256(n.encode()).hexdigest())
            chosen = chosen[: r.sample]
            self.sample_note = (
                f"--sample {r.sample}: {len(chosen)} of {len(untouched)} untouched tensors "
                f"compared with the base (chosen by sha256 of the name); all {len(touched)} "
                "adapter-touched tensors recomputed"
            )
        self.selected = set(touched) | set(chosen)
        r.ran("untouched")
        r.ran("recompute")

    def compare(self, file: Path, name: str, got: torch.Tensor, dtype: str) -> None:
        """Compare one tensor of PATH with the base's bytes or the merge's value."""
        from lora_cli.io.dtypes import from_torch
        from lora_cli.merge.run import compute_tensor

        r = self.r
        act = self.actions.get(name)
        if act is None:
            r.add(file, name, "recompute", "not produced by merging BASE with ADAPTER (extra)")
            return
        self.seen.add(name)
        if name not in self.selected:
            return
        if dtype != act.dtype or tuple(got.shape) != tuple(act.shape):
            r.add(
                file,
                name,
                "recompute",
                f"is {dtype} {list(got.shape)} but the merge gives {act.dtype} {list(act.shape)}",
            )
            return
        assert self.plan is not None and self.base_src is not None
        base_info = self.base_src.info(act.base) if act.base else None
        if act.kind == "copy" and base_info is not None and base_info.dtype == act.dtype:
            expected = self.base_src.read(act.base)
            check = "untouched"
        else:
            check = "untouched" if act.kind == "copy" else "recompute"
            blocks = self._sampled_rows(act) if check == "recompute" else None
            if blocks is not None:
                d = Diff.combine(
                    compare(got[a:b], compute_tensor(self.plan, act, self.dev, None, (a, b)),
                            dtype, r.atol, r.rtol)
                    for a, b in blocks
                )  # fmt: skip
                ok = d.bad == 0
                r.recomputed.append(Recomputed(name, act.kind, d.max_abs, d.max_ulp, ok, blocks))
                self._report(file, name, check, d, got, ok, blocks)
                return
            expected = compute_tensor(self.plan, act, self.dev)
        if from_torch(expected.dtype) != dtype:  # defensive: the planned dtype is dtype
            expected = expected.to(got.dtype)
        d = compare(got, expected.reshape(got.shape), dtype, r.atol, r.rtol)
        del expected
        ok = d.identical if check == "untouched" else d.bad == 0
        r.recomputed.append(Recomputed(name, act.kind, d.max_abs, d.max_ulp, ok))
        self._report(file, name, check, d, got, ok, None)

    def _sampled_rows(self, act: TensorAction) -> list[tuple[int, int]] | None:
        """With --sample, a seeded random choice of the row blocks ``merge`` streams a big
        tensor in (same math, fewer rows); None to recompute the whole tensor."""
        from lora_cli.merge.run import row_blocks

        if self.r.sample is None or self.plan is None:
            return None
        blocks = row_blocks(self.plan, act)
        if not blocks or len(blocks) <= SAMPLE_BLOCKS:
            return None
        rng = random.Random(hashlib.sha256(act.name.encode()).digest())
        self.row_sampled += 1
        return sorted(rng.sample(blocks, SAMPLE_BLOCKS))

    def _report(
        self,
        file: Path,
        name: str,
        check: str,
        d: Diff,
        got: torch.Tensor,
        ok: bool,
        blocks: list[tuple[int, int]] | None,
    ) -> None:
        r = self.r
        if ok:
            return
        ulp = f"{d.max_ulp} ulp" if d.max_ulp is not None else "NaN where the other has none"
        if check == "untouched":
            r.add(
                file,
                name,
                check,
                f"differs from the base's bytes (max abs error {d.max_abs:.3g}, {ulp}); "
                "tensors the adapter does not touch must be byte-identical",
            )
        else:
            tol = f"{DEFAULT_ULPS} ulp"
            if r.atol or r.rtol:
                tol += f" or atol {r.atol:g} + rtol {r.rtol:g}"
            where = f" in sampled rows {blocks}" if blocks else ""
            r.add(
                file,
                name,
                check,
                f"{d.bad} of {got.numel()} values{where} differ from BASE + ADAPTER by more "
                f"than {tol} (max abs error {d.max_abs:.3g}, {ulp})",
            )

    def finish(self, where: Path, root: Path, incomplete: bool) -> None:
        """Notes and coverage findings once every tensor of PATH was read; ``where`` names
        missing tensors (the index, else PATH), ``incomplete``: some shards were unreadable."""
        r = self.r
        if r.sample is not None:
            how = (
                f", {self.row_sampled} of them (those merge streams in row blocks) on "
                f"{SAMPLE_BLOCKS} row blocks chosen at random, seeded by the name, the rest "
                "in full"
                if self.row_sampled
                else " in full"
            )
            r.notes.append(self.sample_note + how)
        missing = [n for n in self.actions if n not in self.seen]
        if missing and incomplete:
            r.notes.append(
                f"{len(missing)} tensors of the merge were not compared: their shards could "
                "not be read"
            )
        elif missing:
            for name in missing:
                r.add(
                    where,
                    name,
                    "recompute",
                    "missing: merging BASE with ADAPTER produces it",
                )
        assert self.plan is not None
        if self.plan.config_updates:
            config_path = root / "config.json"
            try:
                config = read_json(config_path, "model config")
            except LoraError:
                config = None
            for key, value in self.plan.config_updates.items():
                got = (config or {}).get(key, "<absent>")
                if value is None and got == "<absent>":  # the merge removes this key
                    continue
                if got != value:
                    r.add(
                        config_path,
                        None,
                        "recompute",
                        f"{key} is {got!r} but merging BASE with ADAPTER sets {value!r}",
                    )

    def close(self) -> None:
        if self.base_src is not None:
            self.base_src.close()
        for adapter in self.adapter_objs:
            adapter.close()
