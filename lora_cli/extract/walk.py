"""The extraction walk: one TUNED/BASE tensor pair at a time, Δ in fp32, an SVD for every
weight PEFT's LoRA can target, and a record of everything else that changed.

Which tensors are low-rank targets is decided from headers and the model's module types
(``pairing.module_kinds``) before any data is read; the tensors of one fused MoE expert
parameter (fused, or split per expert on disk) are factored together, per expert
(``extract/experts.py``); whether a tensor changed needs its
data, so factors are kept (they are the adapter: small) and full tensors are only named,
to be re-read when the adapter is written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lora_cli.errors import MergeError
from lora_cli.extract.experts import FusedParam, Piece, factor_experts, locate
from lora_cli.extract.pairing import INPUT_EMBEDDING_SUFFIXES, ModelModules, Pairing
from lora_cli.extract.svd import Factors, SvdOptions
from lora_cli.io.reader import TensorSource
from lora_cli.merge.resolve import CONV1D_LEAVES, CONV1D_MODEL_TYPES

if TYPE_CHECKING:
    import torch

LOW_RANK_KINDS = ("linear", "conv1d", "embedding", "conv")


@dataclass
class Candidate:
    """One TUNED tensor and how it would be shipped if it changed."""

    tuned: str
    base: str  # the BASE tensor it is compared with (the embedding for a tied head)
    module: str
    leaf: str
    kind: str  # linear | conv1d | embedding | conv | expert: low rank; full | unmapped
    shape: tuple[int, ...]
    piece: Piece | None = None  # kind expert: the fused parameter it is (a slice of)


@dataclass
class Extracted:
    module: str  # kind expert: the fused parameter's path
    kind: str
    shape: tuple[int, ...]
    factors: Factors
    param: FusedParam | None = None  # kind expert

    def to_json(self) -> dict[str, Any]:
        f = self.factors
        return {
            "module": self.module,
            "kind": self.kind,
            "shape": list(self.shape),
            "rank": f.rank,
            "energy": round(f.energy, 6),
            "error": round(f.error, 6),
        }


@dataclass
class WalkResult:
    extracted: dict[str, Extracted] = field(default_factory=dict)  # module → factors
    changed_full: list[Candidate] = field(default_factory=list)  # changed, not low rank
    unchanged: int = 0  # bit-identical
    below_min_change: int = 0


def _module_of(name: str) -> tuple[str, str]:
    module, _, leaf = name.rpartition(".")
    return module, leaf


def _kind_of(module: str, kinds: dict[str, tuple[str, int]]) -> tuple[str, int] | None:
    """The module's type from the model built from config, trying the prefixes a checkpoint
    may add or drop (GPT-2's ``transformer.``, a bare base model's missing ``model.``)."""
    for candidate in (
        module,
        "transformer." + module,
        "model." + module,
        module.removeprefix("transformer."),
        module.removeprefix("model."),
    ):
        if candidate in kinds:
            return kinds[candidate]
    return None


def candidates(
    tuned: TensorSource,
    base: TensorSource,
    pairing: Pairing,
    model: ModelModules,
    model_type: Any,
) -> list[Candidate]:
    """Every TUNED tensor, classified from headers and module types alone."""
    kinds = model.kinds
    pieces = locate(model.fused, tuned)
    out = []
    for name in tuned.names():
        paired = pairing.pairs[name]
        base_name = paired if paired in base else (pairing.embed or paired)
        module, leaf = _module_of(name)
        shape = tuned.info(name).shape
        if name in pieces:
            out.append(Candidate(name, base_name, module, leaf, "expert", shape, pieces[name]))
            continue
        known = _kind_of(module, kinds)
        if known is None and kinds:  # stored under a name transformers converts on load
            known = ("unmapped", 1)
        elif known is None:  # no model to ask: shapes and names decide, as merge does
            if len(shape) == 2 and name.endswith(INPUT_EMBEDDING_SUFFIXES):
                known = ("embedding", 1)
            elif len(shape) == 2 and model_type in CONV1D_MODEL_TYPES:
                known = ("conv1d" if module.rsplit(".", 1)[-1] in CONV1D_LEAVES else "linear", 1)
            else:
                known = ("linear", 1) if len(shape) == 2 else ("other", 1)
        kind, groups = known
        resized = shape != base.info(base_name).shape
        if kind == "unmapped":
            pass
        elif len(shape) == 3 and ".experts" in name and leaf != "weight":
            kind = "unmapped"  # a 3-D expert tensor of no parameter the model class has
        elif leaf != "weight" or resized or kind not in LOW_RANK_KINDS:
            kind = "full"
        elif kind == "conv" and (groups != 1 or len(shape) < 3):
            kind = "full"  # PEFT cannot merge LoRA on a grouped convolution
        elif kind != "conv" and len(shape) != 2:
            kind = "full"
        out.append(Candidate(name, base_name, module, leaf, kind, shape))
    return out


def _as_matrix(delta: torch.Tensor, kind: str) -> torch.Tensor:
    """Δ in the (out, in) view PEFT's factors multiply to: GPT-2 Conv1D stores (in, out),
    an embedding (num_embeddings, dim) with B·A = Δᵀ, a conv its flattened kernel."""
    if kind in ("conv1d", "embedding"):
        return delta.mT.contiguous()
    if kind == "conv":
        return delta.reshape(delta.shape[0], -1)
    return delta


def _conv_shapes(factors: Factors, shape: tuple[int, ...]) -> Factors:
    """PEFT's conv LoRA: A (r, in, *k) is a conv like the base's, B (out, r, 1, …) a 1×1."""
    r = factors.rank
    factors.a = factors.a.reshape(r, *shape[1:])
    factors.b = factors.b.reshape(shape[0], r, *([1] * (len(shape) - 2)))
    return factors


def walk(
    tuned: TensorSource,
    base: TensorSource,
    plan: list[Candidate],
    *,
    svd: SvdOptions,
    min_change: float,
    device: str,
    progress: Callable[[int, str], None] | None = None,
) -> WalkResult:
    """Read each pair once, factor the low-rank targets that changed, note the rest."""
    import torch

    result = WalkResult()
    groups: dict[str, list[Candidate]] = {}
    for c in plan:
        if c.piece is not None:
            groups.setdefault(c.piece.param.path, []).append(c)
    for c in plan:
        if c.piece is not None:
            members = groups.pop(c.piece.param.path, None)
            if members is None:  # the whole parameter was handled with its first piece
                continue
            param = c.piece.param
            outcome = factor_experts(
                param,
                [(m.tuned, m.base, m.piece) for m in members if m.piece is not None],
                tuned,
                base,
                svd=svd,
                min_change=min_change,
                device=device,
                progress=progress,
            )
            if outcome.identical:
                result.unchanged += len(members)
            elif outcome.factors is None:
                result.below_min_change += len(members)
            else:
                result.extracted[param.path] = Extracted(
                    param.path, "expert", param.shape, outcome.factors, param
                )
            continue
        t_raw = tuned.read(c.tuned)
        b_raw = base.read(c.base)
        if progress:
            progress(tuned.info(c.tuned).nbytes, c.tuned)
        if t_raw.shape == b_raw.shape and t_raw.dtype == b_raw.dtype and torch.equal(t_raw, b_raw):
            result.unchanged += 1
            continue
        if t_raw.shape != b_raw.shape:  # a grown vocabulary (accepted by pairing)
            result.changed_full.append(c)
            continue
        b = b_raw.to(device=device, dtype=torch.float32)
        del b_raw
        scale = float(torch.linalg.vector_norm(b, dtype=torch.float64))
        delta = t_raw.to(device=device, dtype=torch.float32).sub_(b)
        del t_raw, b
        changed = float(torch.linalg.vector_norm(delta, dtype=torch.float64))
        if not torch.isfinite(delta).all():
            raise MergeError(
                f"{tuned.root}: {c.tuned}: the change from BASE is not finite (NaN or Inf)",
                "check TUNED and BASE with `lora validate`",
            )
        if changed <= min_change * scale:
            result.below_min_change += 1
            continue
        if c.kind == "unmapped" and ".experts" in c.tuned:
            raise MergeError(
                f"{tuned.root}: {c.tuned}: changed MoE expert weights that are neither a "
                "module nor (a slice of) a fused expert parameter of the model class, so PEFT "
                "could not load them as target_modules or target_parameters",
                "keep the full checkpoint for a fine-tune that changed its experts",
            )
        if c.kind == "unmapped":
            raise MergeError(
                f"{tuned.root}: {c.tuned}: changed, but the model class has no module "
                f"{c.module} (transformers renames it on load), so PEFT could not load it",
                "keep the full checkpoint for this fine-tune",
            )
        if c.kind == "full":
            result.changed_full.append(c)
            continue
        factors = svd.factor(_as_matrix(delta, c.kind))
        del delta
        if c.kind == "conv":
            factors = _conv_shapes(factors, c.shape)
        result.extracted[c.module] = Extracted(c.module, c.kind, c.shape, factors)
    return result
