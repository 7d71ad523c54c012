"""A weight change as a balanced low-rank product: ``Δ ≈ B·A`` with ``B = U√S``, ``A = √S·Vᵀ``.

Truncated SVD is the best rank-r approximation in Frobenius norm (Eckart–Young), so the
error reported is the one of the factors actually written (after casting to the output
dtype), measured against Δ rather than inferred from the spectrum. Randomized SVD
(Halko et al.: oversampling plus power iterations) costs a few matmuls per weight instead
of a full decomposition; it is seeded, so the same inputs give the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

OVERSAMPLE = 10
POWER_ITERATIONS = 4
SEED = 0


@dataclass
class Factors:
    b: torch.Tensor  # (out, r), output dtype, CPU
    a: torch.Tensor  # (r, in), output dtype, CPU
    rank: int
    energy: float  # Σ_{i≤r} σᵢ² / ‖Δ‖²_F, as the decomposition sees it
    error: float  # ‖Δ − B·A‖_F / ‖Δ‖_F with the factors as written
    norm: float  # ‖Δ‖_F


@dataclass(frozen=True)
class SvdOptions:
    """How every change is factored: ``rank`` None is ``--rank auto``."""

    rank: int | None
    energy: float
    max_rank: int
    exact: bool
    dtype: torch.dtype

    def factor(self, delta: torch.Tensor) -> Factors:
        return low_rank(
            delta,
            rank=self.rank,
            energy=self.energy,
            max_rank=self.max_rank,
            exact=self.exact,
            dtype=self.dtype,
        )


def choose_rank(s: torch.Tensor, total: float, energy: float, cap: int) -> int:
    """The smallest rank keeping ``energy`` of ‖Δ‖²_F, at most ``cap``."""
    import torch

    kept = torch.cumsum(s.double() ** 2, 0) / total
    reach = int(torch.searchsorted(kept, torch.tensor(energy, dtype=kept.dtype)).item()) + 1
    return max(1, min(reach, cap, s.numel()))


def low_rank(
    delta: torch.Tensor,
    *,
    rank: int | None,
    energy: float,
    max_rank: int,
    exact: bool,
    dtype: torch.dtype,
) -> Factors:
    """Factor ``delta`` (fp32, (out, in), on its device; overwritten by the residual).

    ``rank`` None: the smallest rank keeping ``energy``, capped by ``max_rank``."""
    import torch

    full = min(delta.shape)
    want = min(rank if rank is not None else max_rank, full)
    total = float(torch.linalg.vector_norm(delta, dtype=torch.float64) ** 2)
    q = min(want + OVERSAMPLE, full)
    if exact or q >= full:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    else:
        with torch.random.fork_rng(devices=[delta.device] if delta.is_cuda else []):
            torch.manual_seed(SEED)
            u, s, v = torch.svd_lowrank(delta, q=q, niter=POWER_ITERATIONS)
        vh = v.mT
    r = want if rank is not None else choose_rank(s, total, energy, want)
    root = s[:r].sqrt()
    b = (u[:, :r] * root).to(dtype)
    a = (root[:, None] * vh[:r]).to(dtype)
    kept = float((s[:r].double() ** 2).sum() / total) if total else 1.0
    del u, s, vh
    delta.addmm_(b.float(), a.float(), alpha=-1.0)  # the residual of what is written
    err = float(torch.linalg.vector_norm(delta, dtype=torch.float64) ** 2)
    error = (err / total) ** 0.5 if total else 0.0
    return Factors(b.cpu(), a.cpu(), r, min(kept, 1.0), error, total**0.5)
