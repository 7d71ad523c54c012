"""Fused MoE expert parameters ([E, …] ``experts.gate_up_proj`` / ``down_proj``, transformers
v5) extracted as PEFT ``target_parameters``, laid out exactly as PEFT 0.21's ``ParamWrapper``.

``ParamWrapper`` keeps one parameter's factors for all E experts in two matrices:
``lora_A`` (E·r, in), whose rows e·r … (e+1)·r are expert e's A (``reshape(E, r, in)``), and
``lora_B`` (out, r·E), whose column k·E + e is column k of expert e's B
(``reshape(out, r, E)``); ``get_delta_weight`` is ``einsum("o r e, e r i -> e o i")``, or
``e i o`` for experts stored (E, in, out) (``is_transposed``, gpt-oss). So every expert gets
an independent rank-r product: the SVD runs per expert, and the parameter has one rank (PEFT
has one ``r`` per target): the fixed ``--rank``, or with ``--rank auto`` the largest any
expert needs (an expert that needs fewer keeps zero columns, so each expert's error is its
own truncation's). Several targets on one module nest: the first registered is innermost,
saved as ``<module>.base_layer.lora_A.weight``, the last as ``<module>.lora_A.weight``.

On disk transformers v5 writes Mixtral / Qwen3-MoE experts per expert
(``experts.{e}.w1/w3/w2``, ``gate_proj/up_proj/down_proj``) and gpt-oss fused; the pieces are
found as ``lora merge`` finds them (``merge.experts``), one expert's pieces read at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lora_cli.errors import MergeError
from lora_cli.extract.svd import Factors, SvdOptions
from lora_cli.io.reader import TensorSource
from lora_cli.merge.experts import find_expert_param

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class FusedParam:
    """A 3-D parameter of the model class, as PEFT's ``ParamWrapper`` sees it."""

    path: str  # <module>.<parameter> as the model names it
    shape: tuple[int, ...]  # (E, out, in), or (E, in, out) when transposed
    transposed: bool  # the module's ``is_transposed`` (PEFT swaps in/out on it)
    order: int  # registration index among the module's parameters (PEFT's nesting order)

    @property
    def out_in(self) -> tuple[int, int]:
        _, d1, d2 = self.shape
        return (d2, d1) if self.transposed else (d1, d2)


@dataclass(frozen=True)
class Piece:
    """A TUNED tensor holding (a slice of) a fused parameter."""

    param: FusedParam
    expert: int | None  # None: the whole fused tensor
    rows: tuple[int, int] | None  # rows of the expert's (out, in) matrix it holds


def locate(fused: dict[str, FusedParam], tuned: TensorSource) -> dict[str, Piece]:
    """TUNED tensor name → the fused parameter it stores, for every parameter found on disk
    either fused or split per expert with the shape the model class has."""
    pieces: dict[str, Piece] = {}
    for path, param in fused.items():
        owner, _, leaf = path.rpartition(".")
        for prefix in dict.fromkeys((owner, owner.removeprefix("model."), "model." + owner)):
            found = find_expert_param(prefix, leaf, tuned)
            if found is None or tuple(found.shape) != param.shape:
                continue
            split = any(expert is not None for _, expert, _ in found.pieces)
            if split and param.transposed:  # per-expert Linear weights are (out, in)
                continue
            for name, expert, rows in found.pieces:
                pieces[name] = Piece(param, expert, rows)
            break
    return pieces


def _matrices(
    param: FusedParam,
    members: list[tuple[str, str, Piece]],
    tuned: TensorSource,
    base: TensorSource,
    progress: Callable[[int, str], None] | None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(TUNED, BASE) of each expert in turn, as stored: one expert's pieces in memory at a
    time, or the one fused tensor pair."""
    import torch

    def read(t_name: str, b_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        t, b = tuned.read(t_name), base.read(b_name)
        if progress:
            progress(tuned.info(t_name).nbytes, t_name)
        return t, b

    whole = [m for m in members if m[2].expert is None]
    if whole:
        t, b = read(whole[0][0], whole[0][1])
        for e in range(param.shape[0]):
            yield t[e], b[e]
        return
    for e in range(param.shape[0]):
        mine = sorted(
            (m for m in members if m[2].expert == e), key=lambda m: (m[2].rows or (0,))[0]
        )
        pairs = [read(t_name, b_name) for t_name, b_name, _ in mine]
        yield torch.cat([t for t, _ in pairs]), torch.cat([b for _, b in pairs])


@dataclass
class ExpertOutcome:
    factors: Factors | None  # None: unchanged or below --min-change
    identical: bool


def factor_experts(
    param: FusedParam,
    members: list[tuple[str, str, Piece]],
    tuned: TensorSource,
    base: TensorSource,
    *,
    svd: SvdOptions,
    min_change: float,
    device: str,
    progress: Callable[[int, str], None] | None = None,
) -> ExpertOutcome:
    """Factor each expert's change of ``param`` (members: TUNED name, BASE name, piece) and
    pack the factors in PEFT's ``ParamWrapper`` layout."""
    import torch

    per_expert: list[Factors | None] = []
    identical, changed2, scale2 = True, 0.0, 0.0
    for t_raw, b_raw in _matrices(param, members, tuned, base, progress):
        if t_raw.dtype == b_raw.dtype and torch.equal(t_raw, b_raw):
            scale2 += float(torch.linalg.vector_norm(b_raw, dtype=torch.float64) ** 2)
            per_expert.append(None)
            continue
        identical = False
        b = b_raw.to(device=device, dtype=torch.float32)
        scale2 += float(torch.linalg.vector_norm(b, dtype=torch.float64) ** 2)
        delta = t_raw.to(device=device, dtype=torch.float32).sub_(b)
        del b
        if not torch.isfinite(delta).all():
            raise MergeError(
                f"{tuned.root}: {param.path}: the change from BASE is not finite (NaN or Inf)",
                "check TUNED and BASE with `lora validate`",
            )
        matrix = delta.mT.contiguous() if param.transposed else delta
        changed = float(torch.linalg.vector_norm(matrix, dtype=torch.float64))
        changed2 += changed**2
        per_expert.append(svd.factor(matrix) if changed else None)
        del delta, matrix
    if identical or changed2**0.5 <= min_change * scale2**0.5:
        return ExpertOutcome(None, identical)
    return ExpertOutcome(_pack(param, per_expert, svd.dtype), False)


def _pack(param: FusedParam, per_expert: list[Factors | None], dtype: torch.dtype) -> Factors:
    """A (E·r, in) and B (out, r·E) as ``ParamWrapper`` reshapes them; totals over experts."""
    import torch

    experts = param.shape[0]
    out, inn = param.out_in
    done = [f for f in per_expert if f is not None]
    r = max(f.rank for f in done)
    a = torch.zeros(experts, r, inn, dtype=dtype)
    b = torch.zeros(out, r, experts, dtype=dtype)
    for e, f in enumerate(per_expert):
        if f is not None:
            a[e, : f.rank] = f.a
            b[:, : f.rank, e] = f.b
    norm2 = sum(f.norm**2 for f in done)
    kept = sum(f.energy * f.norm**2 for f in done) / norm2
    residual = sum((f.error * f.norm) ** 2 for f in done)
    return Factors(
        b.reshape(out, r * experts),
        a.reshape(experts * r, inn),
        r,
        min(kept, 1.0),
        (residual / norm2) ** 0.5,
        norm2**0.5,
    )


def saved_modules(params: list[FusedParam]) -> dict[str, str]:
    """Parameter path → the module path its factors are saved under: PEFT nests one
    ``ParamWrapper`` per targeted parameter of a module, in registration order."""
    by_owner: dict[str, list[FusedParam]] = {}
    for p in params:
        by_owner.setdefault(p.path.rpartition(".")[0], []).append(p)
    saved = {}
    for owner, ps in by_owner.items():
        ps.sort(key=lambda p: p.order)
        for i, p in enumerate(ps):
            saved[p.path] = owner + ".base_layer" * (len(ps) - 1 - i)
    return saved
