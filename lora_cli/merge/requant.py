"""``--quantize keep``: merged weights re-encoded into the base's own format, a row block
at a time.

A re-quantized weight is a group of output tensors (weight, scale, …) planned as separate
actions. Where the format's scales cover rows apart from each other (FP8 blocks of
``block[0]`` rows, per-row INT4 groups, FP8 channels, MXFP4 experts), the weight streams
through in row blocks: each block is read once, dequantized, merged, re-encoded, and its
weight rows written; its scale rows land in the group's small scale tensor, written once
every block is in. Formats whose scale spans the whole tensor (a per-tensor FP8 scale) are
encoded whole. Either way the bytes are the whole-tensor encoding's, bit for bit.

Re-quantizing can erase a small delta, so each group measures the cosine between the
intended change (merged − base) and the change that survives (decode(encode(merged)) − base),
summed block by block.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from lora_cli.errors import MergeError
from lora_cli.merge.plan import MergePlan, TensorAction
from lora_cli.sources.quantized import DequantizedSource, QuantizedTensor

if TYPE_CHECKING:
    import torch

# Below this cosine between intended and re-quantized change, --quantize keep warns: the
# format's step swamps the delta (docs/quantized-bases.md §5: FP8 reaches ~0.9 only when
# ‖Δ‖ is ~5 % of ‖W‖; 4-bit formats usually fall far below).
COSINE_WARN = 0.9
# The cosine is measured on every SAMPLE_EVERY-th granule of rows (a granule: whole scale
# units of at least SAMPLE_VALUES values; a gpt-oss expert is one), on every row of tensors
# of up to SAMPLE_ALL values: decoding the re-encoded rows back and the sums were 40 % of a
# keep merge's own CPU time (profiled); a quarter of a tensor of over a million values is
# ample for a figure checked against 0.9. Granules are fixed by the tensor, not by how it is
# cut into blocks, so both give the same figure.
SAMPLE_EVERY = 4
SAMPLE_VALUES = 1 << 16
SAMPLE_ALL = 1 << 20
TERMS_CHUNK = 1 << 20  # values per fidelity-sum chunk (4 MiB fp32 work buffers)
WARN_EACH = 3  # more tensors below COSINE_WARN than this: one warning line for all

# compute(merge action, rows, starting value) -> merged bf16 rows (the merge math)
Compute = Callable[..., "torch.Tensor"]


@dataclass
class QuantGroup:
    """One re-quantized weight: encoded whole or block by block, handed out part by part."""

    tensor: QuantizedTensor
    merge: TensorAction  # the bf16 merge of the dequantized weight
    source: DequantizedSource
    unit: int | None  # rows that encode apart (None: the whole tensor at once)
    cosine: float | None = None
    _terms: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # a·i, i·i, a·a
    _parts: dict[str, torch.Tensor] = field(default_factory=dict)
    _scale: torch.Tensor | None = None  # filled block by block
    _covered: int = 0  # rows encoded block by block
    _expected: int = 0  # blocks scheduled and not yet finished
    _failed: bool = False
    _done: bool = False
    _cond: threading.Condition = field(default_factory=threading.Condition)

    @property
    def rows(self) -> int:
        return self.tensor.shape[0]

    def expect(self) -> None:
        """A block of this group was scheduled (the other parts wait for it)."""
        with self._cond:
            self._expected += 1

    def block(self, rows: tuple[int, int], compute: Compute, device: str) -> torch.Tensor:
        """Weight rows ``rows`` re-encoded (CPU); their scale rows are kept for later."""
        try:
            base = self.source.read(self.tensor.name, rows=rows, device=device)
            merged = compute(self.merge, rows, base.clone())
            parts = self.tensor.encode(merged, self.source.raw)
            terms = self._sampled_terms(rows, merged, base, parts)
            del base, merged
            out = {k: v.to("cpu") for k, v in parts.items() if k in ("weight", "scale")}
            with self._cond:
                self._add_scale(rows, out["scale"])
                self._terms = [a + b for a, b in zip(self._terms, terms, strict=True)]
                self._covered += rows[1] - rows[0]
            return out["weight"]
        except BaseException:
            self._failed = True
            raise
        finally:
            with self._cond:
                self._expected = max(0, self._expected - 1)
                self._cond.notify_all()

    def _add_scale(self, rows: tuple[int, int], scale: torch.Tensor) -> None:
        import torch

        raw = self.source.raw
        if self._scale is None:
            info = raw.info(self.tensor.parts["scale"])
            from lora_cli.io.dtypes import to_torch

            self._scale = torch.empty(info.shape, dtype=to_torch(info.dtype))
        span = self.tensor.scale_rows(rows, raw)
        assert span is not None  # (row_unit is None for whole-tensor scales)
        self._scale[span[0] : span[1]] = scale

    def take(self, role: str, compute: Compute, device: str) -> torch.Tensor:
        """Part ``role`` of the whole encoding: from the blocks when every row went through
        them, else computed whole once (validate, small tensors, whole-tensor scales)."""
        with self._cond:
            self._cond.wait_for(lambda: self._expected == 0)
            if self._failed:
                raise MergeError(f"{self.tensor.name}: re-quantizing a row block failed")
            if self._covered == self.rows and role != "weight":
                self.cosine = _cosine(self._terms)
                if role == "scale":  # handed over: a group kept to the end holds no rows
                    scale, self._scale = self._scale, None
                    assert scale is not None
                    return scale
                return self.source.raw.read(self.tensor.parts[role])
            if not self._done:
                base = self.source.read(self.tensor.name, device=device)
                merged = compute(self.merge, None, base.clone())
                parts = self.tensor.encode(merged, self.source.raw)
                self.cosine = _cosine(self._sampled_terms((0, self.rows), merged, base, parts))
                self._parts = {k: v.to("cpu") for k, v in parts.items()}
                self._done = True
            return self._parts.pop(role)

    def sampled_spans(self, rows: tuple[int, int]) -> list[tuple[int, int]]:
        """The rows of ``rows`` the cosine is measured on (see ``SAMPLE_EVERY``)."""
        unit = self.unit or 1
        values = math.prod(self.tensor.shape)
        per_unit = unit * (values // max(1, self.rows))
        granule = unit * max(1, -(-SAMPLE_VALUES // max(1, per_unit)))
        if values <= SAMPLE_ALL:
            return [rows]
        spans = []
        first = rows[0] // granule
        for g in range(first - first % SAMPLE_EVERY, -(-rows[1] // granule), SAMPLE_EVERY):
            start, stop = max(rows[0], g * granule), min(rows[1], (g + 1) * granule)
            if start < stop:
                spans.append((start, stop))
        return spans

    def _sampled_terms(
        self,
        rows: tuple[int, int],
        merged: torch.Tensor,
        base: torch.Tensor,
        parts: dict[str, torch.Tensor],
    ) -> list[float]:
        """The change terms of the sampled rows of ``rows``, their re-encoded parts decoded
        back (weight and scale rows sliced; other parts whole)."""
        raw = self.source.raw
        own = self.tensor.scale_rows(rows, raw) if "scale" in parts else None
        terms = [0.0, 0.0, 0.0]
        for start, stop in self.sampled_spans(rows):
            sub = dict(parts)
            sub["weight"] = parts["weight"][start - rows[0] : stop - rows[0]]
            span = self.tensor.scale_rows((start, stop), raw) if own is not None else None
            if span is not None and own is not None:
                sub["scale"] = parts["scale"][span[0] - own[0] : span[1] - own[0]]
            achieved = self.tensor.decode_parts(sub, start)
            local = slice(start - rows[0], stop - rows[0])
            got = _change_terms(merged[local], base[local], achieved)
            terms = [a + b for a, b in zip(terms, got, strict=True)]
        return terms

    def report(self) -> dict[str, Any]:
        return {
            "tensor": self.tensor.name,
            "scheme": self.tensor.scheme,
            "parts": sorted(self.tensor.parts.values()),
            "cosine": None if self.cosine is None else round(self.cosine, 6),
        }


def _change_terms(
    merged: torch.Tensor, base: torch.Tensor, achieved: torch.Tensor
) -> tuple[float, float, float]:
    """(achieved·intended, intended·intended, achieved·achieved) of the changes, from
    three fp32 work buffers of this thread (profiled: fresh fp32 copies and products made
    this diagnostic cost more than the codec itself; fp64 copies cost 5× more again).
    Products summed by torch's cascade sum: exact to ~1e-7 relative, so a tensor's cosine
    is the same merged whole or in row blocks (BLAS dot products drift by ~1e-5)."""
    import torch

    from lora_cli.scratch import work_buffer

    m, b, a = merged.reshape(-1), base.reshape(-1), achieved.reshape(-1)
    terms = [0.0, 0.0, 0.0]
    for start in range(0, m.numel(), TERMS_CHUNK):  # bounded buffers (a gpt-oss expert: 16.6 M)
        stop = min(start + TERMS_CHUNK, m.numel())
        shape = (stop - start,)
        intended = work_buffer("requant.intended", shape, torch.float32, merged)
        intended.copy_(m[start:stop])
        got = work_buffer("requant.got", shape, torch.float32, merged).copy_(b[start:stop])
        intended.sub_(got)
        got.neg_().add_(a[start:stop])
        product = work_buffer("requant.product", shape, torch.float32, merged)
        for i, (x, y) in enumerate(((intended, got), (intended, intended), (got, got))):
            terms[i] += float(torch.mul(x, y, out=product).sum())
    return terms[0], terms[1], terms[2]


def _cosine(terms: list[float] | tuple[float, float, float]) -> float:
    dot, ii, aa = terms
    if ii == 0:
        return 1.0
    norm = math.sqrt(ii) * math.sqrt(aa)
    return dot / norm if norm > 0 else 0.0


@dataclass
class QuantPart:
    """On a ``TensorAction``: this output tensor is part ``role`` of a re-quantized group."""

    group: QuantGroup
    role: str

    def compute(
        self, compute: Compute, device: str, rows: tuple[int, int] | None = None
    ) -> torch.Tensor:
        if rows is not None:
            assert self.role == "weight"
            return self.group.block(rows, compute, device)
        return self.group.take(self.role, compute, device)


def requantize_actions(plan: MergePlan, view: DequantizedSource) -> None:
    """Replace each merged quantized weight by its parts, in the weight's shard."""
    groups = []
    for shard in plan.shards:
        actions = []
        for act in shard.actions:
            qt = view.exposed.get(act.name)
            if qt is None:
                actions.append(act)
                continue
            problem = qt.requant_problem(view.raw)
            if problem:
                raise MergeError(
                    f"{qt.primary}: --quantize keep cannot re-quantize {problem} yet",
                    "merge without --quantize keep (writes bf16)",
                )
            group = QuantGroup(qt, replace(act), view, qt.row_unit(view.raw))
            groups.append(group)
            for role, raw_name in qt.parts.items():
                info = view.raw.info(raw_name)
                part = TensorAction(raw_name, info.dtype, info.shape, base=None)
                if role == "weight":  # keeps the merge ops so the plan counts it as merged
                    part = replace(act, name=raw_name, dtype=info.dtype, shape=info.shape)
                part.quant = QuantPart(group, role)
                actions.append(part)
        shard.actions = actions
    plan.quantized = groups


def write_order(act: TensorAction, start: Callable[[str], int]) -> tuple[int, int]:
    """Sort key for a shard's actions: file order, except that the other parts of a
    re-quantized weight come right after its weight (they wait for its row blocks)."""
    part = act.quant
    if part is None or part.role == "weight":
        return start(act.name), 0
    return start(part.group.tensor.primary), 1


def fidelity(plan: MergePlan) -> tuple[list[dict[str, Any]], list[str]]:
    """Per re-quantized tensor: the change's cosine; and the warnings for those below the
    bound: one line each, or one line for them all when there are more than a few (a 4-bit
    base typically loses every tensor's delta: 119 identical lines said nothing more)."""
    reports = [g.report() for g in getattr(plan, "quantized", [])]
    low = sorted(
        (r for r in reports if r["cosine"] is not None and r["cosine"] < COSINE_WARN),
        key=lambda r: r["cosine"],
    )
    advice = "write bf16 (the default) to keep it"
    if len(low) <= WARN_EACH:
        return reports, [
            f"{r['tensor']}: re-quantized as {r['scheme']}, the merged change survives with "
            f"cosine {r['cosine']:.3f} (< {COSINE_WARN}); {advice}"
            for r in low
        ]
    lowest = ", ".join(f"{r['tensor']} {r['cosine']:.3f}" for r in low[:WARN_EACH])
    return reports, [
        f"{len(low)} of {len(reports)} re-quantized tensors keep the merged change with cosine "
        f"< {COSINE_WARN} (lowest: {lowest}; every tensor's figure: --json `quantized`); {advice}"
    ]
