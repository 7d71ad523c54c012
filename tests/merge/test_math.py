"""lora_cli.merge.math against PEFT 0.21.2 ``merge_and_unload()`` as the oracle.

Each case builds a tiny module, wraps it with ``get_peft_model`` (non-zero B,
scaling != 1), takes A, B (and the DoRA magnitude) from the PeftModel and
compares our merge with the weight PEFT's merge produces.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft_oracle import product_threads  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

from lora_cli.adapters.peft import scaling  # noqa: E402
from lora_cli.errors import MergeError  # noqa: E402
from lora_cli.merge import math as mm  # noqa: E402


@pytest.fixture(autouse=True)
def _at_lora_math_threads():
    """merge/math.py called directly runs at the thread count merge/run.py gives it, like the
    PEFT oracle (pinned to it suite-wide, tests/peft_oracle.py): torch's kernels, and so the
    bits, change with the thread count."""
    with product_threads():
        yield


# PEFT warns about fan_in_fan_out fix-ups and the like on these toy modules.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

_INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def _ordered(t: torch.Tensor) -> torch.Tensor:
    """Map floats to integers whose difference is the distance in ulps."""
    bits = t.dtype.itemsize * 8
    i = t.contiguous().view(_INT_VIEW[t.dtype]).to(torch.int64)
    magnitude = i & ((1 << (bits - 1)) - 1)
    return torch.where(i < 0, -magnitude, magnitude)


def max_ulp_diff(a: torch.Tensor, b: torch.Tensor) -> int:
    assert a.dtype == b.dtype and a.shape == b.shape
    if a.numel() == 0:
        return 0
    return int((_ordered(a) - _ordered(b)).abs().max())


def assert_close_ulp(ours: torch.Tensor, ref: torch.Tensor, *, max_frac: float = 0.01) -> None:
    """At most 1 ulp apart, on at most ``max_frac`` of the elements."""
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    assert max_ulp_diff(ours, ref) <= 1
    assert (ours != ref).float().mean().item() <= max_frac


def test_max_ulp_diff_helper():
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x = torch.tensor([1.0, -1.0, 0.0, -0.0, 3.5], dtype=dtype)
        info = torch.finfo(dtype)
        up = x + torch.tensor([info.eps, -info.eps / 2, 0, 0, 0], dtype=dtype)
        assert max_ulp_diff(x, x) == 0
        assert max_ulp_diff(x[2:3], x[3:4]) == 0  # +0 and -0
        assert max_ulp_diff(x, up) == 1
        tiny = torch.tensor([info.tiny], dtype=dtype)
        # crossing zero counts the ulps on both sides
        assert max_ulp_diff(tiny, -tiny) == 2 * max_ulp_diff(tiny, torch.zeros_like(tiny))


# --------------------------------------------------------------------------- models


class Net(nn.Module):
    """One module ``m`` (whatever the case needs) under a parent, so PEFT can target it."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.m = layer

    def forward(self, x):
        return self.m(x)


LAYERS = {
    "linear": lambda: nn.Linear(64, 48),
    "conv1D": lambda: Conv1D(48, 64),  # GPT-2 style, weight stored (in=64, out=48)
    "embedding": lambda: nn.Embedding(40, 24),
    "conv1d": lambda: nn.Conv1d(6, 10, 3),
    "conv2d": lambda: nn.Conv2d(6, 10, 3),
    "conv2d_1x1": lambda: nn.Conv2d(12, 10, 1),
    "conv3d": lambda: nn.Conv3d(4, 6, 3),
    "conv3d_wide": lambda: nn.Conv3d(32, 48, 3),
}
KIND = {"linear": "linear", "conv1D": "linear", "embedding": "embedding"}


def _kind(layer: str) -> str:
    return KIND.get(layer, "conv")


def _factors(lay) -> tuple[torch.Tensor, torch.Tensor]:
    if "default" in lay.lora_embedding_A:
        return (
            lay.lora_embedding_A["default"].detach().clone(),
            lay.lora_embedding_B["default"].detach().clone(),
        )
    return lay.lora_A["default"].weight.detach().clone(), lay.lora_B[
        "default"
    ].weight.detach().clone()


def run_peft(layer: str, dtype: torch.dtype, seed: int = 0, **cfg):
    """Build, wrap and merge with PEFT; return what our merge needs and PEFT's result."""
    torch.manual_seed(seed)
    model = Net(LAYERS[layer]()).to(dtype)
    config = LoraConfig(
        target_modules=["m"],
        init_lora_weights=False,
        fan_in_fan_out=layer == "conv1D",
        **cfg,
    )
    pm = get_peft_model(model, config)
    lay = pm.base_model.model.m
    magnitude = None
    if cfg.get("use_dora"):
        mag = lay.lora_magnitude_vector["default"].weight
        with torch.no_grad():
            mag.mul_(1 + 0.2 * torch.randn_like(mag))
        magnitude = mag.detach().clone()
    base = lay.get_base_layer()
    got = {
        "W": base.weight.detach().clone(),
        "b": None if getattr(base, "bias", None) is None else base.bias.detach().clone(),
        "bB": lay.lora_B["default"].bias.detach().clone() if cfg.get("lora_bias") else None,
        "magnitude": magnitude,
        "peft_scale": lay.scaling["default"],
    }
    got["A"], got["B"] = _factors(lay)
    merged = pm.merge_and_unload().m
    got["W_peft"] = merged.weight.detach().clone()
    bias = getattr(merged, "bias", None)
    got["b_peft"] = None if bias is None else bias.detach().clone()
    return got


# (layer, dtype, r, alpha, rslora): scaling is never 1
VANILLA = [
    ("linear", torch.bfloat16, 4, 12, False),
    ("linear", torch.float16, 4, 6, True),
    ("linear", torch.float32, 8, 4, False),
    ("conv1D", torch.bfloat16, 4, 12, False),
    ("embedding", torch.bfloat16, 4, 12, False),
    ("embedding", torch.float16, 2, 5, True),
    ("conv1d", torch.bfloat16, 3, 7, False),
    ("conv2d", torch.bfloat16, 4, 12, False),
    ("conv2d_1x1", torch.bfloat16, 4, 6, True),
    ("conv3d", torch.bfloat16, 2, 5, False),
    # fp32 bases show every fp32 ulp of the delta (summation order of the conv path)
    ("conv1D", torch.float32, 4, 12, False),
    ("embedding", torch.float32, 4, 12, False),
    ("conv1d", torch.float32, 3, 7, False),
    ("conv2d", torch.float32, 4, 12, False),
    ("conv3d_wide", torch.float32, 2, 5, False),
]


def _alternative_rounding(g, kind, delta):
    """The merge with the *other* rounding order than PEFT's for this layer type."""
    W = g["W"]
    if kind == "embedding":
        return (W.float() + delta).to(W.dtype)
    return W + delta.to(W.dtype)


@pytest.mark.parametrize(("layer", "dtype", "r", "alpha", "rslora"), VANILLA)
def test_vanilla_matches_peft(layer, dtype, r, alpha, rslora):
    g = run_peft(layer, dtype, r=r, lora_alpha=alpha, use_rslora=rslora)
    assert g["A"].dtype == g["B"].dtype == torch.float32  # PEFT's default autocast
    kind = _kind(layer)
    s = scaling(r, alpha, rslora)
    assert s == g["peft_scale"] and s != 1
    W_before = g["W"].clone()
    ours = mm.merge_weight(g["W"], g["A"], g["B"], s, kind=kind, fan_in_fan_out=layer == "conv1D")
    assert torch.equal(g["W"], W_before)  # the input is left alone (also for fp32 bases)
    assert ours.dtype == dtype and ours.device == g["W"].device
    assert not torch.equal(g["W_peft"], g["W"])  # the adapter changes the weight
    assert torch.equal(ours, g["W_peft"])
    if dtype != torch.float32:
        # the test can tell one rounding from two
        delta = mm.lora_delta(
            g["A"], g["B"], s, kind=kind, base_shape=g["W"].shape, fan_in_fan_out=layer == "conv1D"
        )
        assert not torch.equal(_alternative_rounding(g, kind, delta), g["W_peft"])


DORA = [
    ("linear", torch.bfloat16, 4, 12, False),
    ("linear", torch.float16, 4, 6, True),
    ("conv1D", torch.bfloat16, 4, 12, False),
    ("embedding", torch.bfloat16, 4, 12, False),
    ("conv1d", torch.bfloat16, 3, 7, False),
    ("conv2d", torch.bfloat16, 4, 12, False),
    ("conv2d_1x1", torch.float32, 4, 6, True),
    ("conv3d", torch.bfloat16, 2, 5, False),
    # fp32 bases show every fp32 ulp of the norm, i.e. its reduction order
    ("linear", torch.float32, 4, 12, False),
    ("conv1D", torch.float32, 4, 12, False),
    ("embedding", torch.float32, 4, 12, False),
    ("conv1d", torch.float32, 3, 7, False),
    ("conv2d", torch.float32, 4, 12, False),
    ("conv3d_wide", torch.float32, 2, 5, True),
]


@pytest.mark.parametrize(("layer", "dtype", "r", "alpha", "rslora"), DORA)
def test_dora_matches_peft(layer, dtype, r, alpha, rslora):
    g = run_peft(layer, dtype, r=r, lora_alpha=alpha, use_rslora=rslora, use_dora=True)
    kind = _kind(layer)
    s = scaling(r, alpha, rslora)
    assert s == g["peft_scale"] and s != 1
    fifo = layer == "conv1D"
    ours = mm.merge_weight(
        g["W"], g["A"], g["B"], s, kind=kind, fan_in_fan_out=fifo, magnitude=g["magnitude"]
    )
    vanilla = mm.merge_weight(g["W"], g["A"], g["B"], s, kind=kind, fan_in_fan_out=fifo)
    assert not torch.equal(g["W_peft"], vanilla)  # the magnitude matters
    assert torch.equal(ours, g["W_peft"])


@pytest.mark.parametrize("layer", ["linear", "conv2d"])
def test_lora_bias_matches_peft(layer):
    g = run_peft(layer, torch.bfloat16, r=4, lora_alpha=12, lora_bias=True)
    s = scaling(4, 12, False)
    assert g["bB"].abs().sum() > 0
    b = mm.merge_bias(g["b"], g["bB"], s)
    assert not torch.equal(g["b_peft"], g["b"])
    assert torch.equal(b, g["b_peft"])
    W = mm.merge_weight(g["W"], g["A"], g["B"], s, kind=_kind(layer))
    assert torch.equal(W, g["W_peft"])


def test_lora_bias_single_rounding():
    b = torch.tensor([1.0, 1.0], dtype=torch.bfloat16)
    bB = torch.tensor([2**-9, 3 * 2**-10])  # below half a bf16 ulp of 1.0 once scaled by 1
    merged = mm.merge_bias(b, bB, 1.0)
    assert torch.equal(merged, (b.float() + bB).to(torch.bfloat16))
    with pytest.raises(MergeError):
        mm.merge_bias(b, torch.zeros(3), 1.0)


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("layer", ["conv3d", "conv2d", "conv1d"])
def test_conv_fp32_sums_like_peft(layer, use_dora):
    """fp32 bases show every bit of the delta: the conv delta must be summed the way PEFT's
    ``_ConvNd.get_delta_weight`` sums it (``convNd(A.transpose(0, 1), B)``), not as a
    flattened matmul, whose order differs on some CPUs by up to 1024 ulp near zero."""
    g = run_peft(layer, torch.float32, r=4, lora_alpha=5, use_dora=use_dora)
    s = scaling(4, 5, False)
    ours = mm.merge_weight(g["W"], g["A"], g["B"], s, kind="conv", magnitude=g["magnitude"])
    assert not torch.equal(g["W_peft"], g["W"])
    assert torch.equal(ours, g["W_peft"])


def test_block_diagonal_expands_bdlora_factors():
    w = torch.arange(12.0).reshape(4, 3)
    full = mm.block_diagonal(w, 2)
    assert full.shape == (4, 6)
    assert torch.equal(full[:2, :3], w[:2]) and torch.equal(full[2:, 3:], w[2:])
    assert not full[:2, 3:].any() and not full[2:, :3].any()
    with pytest.raises(MergeError):
        mm.block_diagonal(w, 3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rounding_orders(dtype):
    """``delta``: W + round(Δ); ``mha_out``: round((W + round(Δ)) + Δ) (PEFT's MHA out_proj)."""
    torch.manual_seed(3)
    W = torch.randn(32, 16).to(dtype)
    A, B = torch.randn(4, 16) / 7, torch.randn(32, 4) / 7
    delta = mm.lora_delta(A, B, 1.5, kind="linear", base_shape=W.shape)
    once = mm.merge_weight(W, A, B, 1.5, kind="linear")
    twice = mm.merge_weight(W, A, B, 1.5, kind="linear", rounding="delta")
    assert torch.equal(twice, W + delta.to(dtype))
    assert not torch.equal(once, twice)  # the test tells the two orders apart
    doubled = mm.merge_weight(W, A, B, 1.5, kind="linear", rounding="mha_out")
    assert torch.equal(doubled, ((W + delta.to(dtype)).float() + delta).to(dtype))
    with pytest.raises(MergeError):
        mm.merge_weight(W, A, B, 1.5, kind="linear", rounding="thrice")


# --------------------------------------------------------------------------- 1x1xk conv3d


def _conv_reference(W, A, B, s):
    """round(W32 + s · Σ_k B[o,k] A[k,i,...]) written out with einsum in fp64."""
    delta = torch.einsum("ok,ki...->oi...", B.double().flatten(1), A.double()) * s
    return (W.double() + delta.float().double()).to(W.dtype)


@pytest.mark.parametrize("kernel", [(1, 1, 3), (1, 1, 1)])
def test_conv3d_1x1xk(kernel):
    torch.manual_seed(1)
    model = Net(nn.Conv3d(4, 6, kernel)).to(torch.bfloat16)
    pm = get_peft_model(
        model, LoraConfig(target_modules=["m"], r=3, lora_alpha=7, init_lora_weights=False)
    )
    lay = pm.base_model.model.m
    W, (A, B) = lay.get_base_layer().weight.detach().clone(), _factors(lay)
    s = scaling(3, 7, False)
    ours = mm.merge_weight(W, A, B, s, kind="conv")
    assert ours.shape == W.shape and not torch.equal(ours, W)
    assert_close_ulp(ours, _conv_reference(W, A, B, s))
    # PEFT 0.21.2 cannot merge these (issue #3768); when it can, it must agree with us.
    try:
        merged = pm.merge_and_unload().m.weight.detach()
    except RuntimeError:
        return
    assert torch.equal(ours, merged)


# --------------------------------------------------------------------------- trainable tokens


def test_trainable_tokens_match_peft():
    torch.manual_seed(0)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(40, 24)
            self.lin = nn.Linear(24, 8)

    model = M().to(torch.bfloat16)
    idx = [7, 1, 30]
    pm = get_peft_model(
        model,
        LoraConfig(target_modules=["lin"], trainable_token_indices={"emb": idx}),
    )
    layer = pm.base_model.model.emb.token_adapter
    delta = layer.trainable_tokens_delta["default"]
    with torch.no_grad():
        delta.add_(torch.randn_like(delta))
    W = layer.base_layer.weight.detach().clone()
    rows = delta.detach().clone()
    assert rows.dtype == torch.float32
    W_peft = pm.merge_and_unload().emb.weight.detach()
    ours = mm.replace_rows(W, idx, rows)
    assert not torch.equal(W_peft, W)
    assert torch.equal(ours, W_peft)
    assert torch.equal(ours[idx], rows.to(torch.bfloat16))


def test_replace_rows_refusals():
    W = torch.zeros(5, 3)
    with pytest.raises(MergeError):
        mm.replace_rows(W, [0, 1], torch.zeros(3, 3))
    with pytest.raises(MergeError):
        mm.replace_rows(W, [1, 1], torch.zeros(2, 3))
    with pytest.raises(MergeError):
        mm.replace_rows(W, [5], torch.zeros(1, 3))


# --------------------------------------------------------------------------- target_parameters


class Experts(nn.Module):
    def __init__(self, shape, is_transposed=False):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(*shape))
        self.is_transposed = is_transposed

    def forward(self, x):
        return x


class MoE(nn.Module):
    def __init__(self, shape, is_transposed=False):
        super().__init__()
        self.experts = Experts(shape, is_transposed)

    def forward(self, x):
        return x


def run_peft_param(shape, dtype, *, is_transposed=False, r=2, alpha=5, rslora=False, seed=0):
    torch.manual_seed(seed)
    model = MoE(shape, is_transposed).to(dtype)
    pm = get_peft_model(
        model,
        LoraConfig(
            target_modules=[],
            target_parameters=["experts.gate_up_proj"],
            r=r,
            lora_alpha=alpha,
            use_rslora=rslora,
            init_lora_weights=False,
        ),
    )
    lay = pm.base_model.model.experts
    P = lay.get_param().detach().clone()
    A, B = _factors(lay)
    assert lay.scaling["default"] == scaling(r, alpha, rslora)
    P_peft = pm.merge_and_unload().experts.gate_up_proj.detach().clone()
    assert not torch.equal(P_peft, P)
    return P, A, B, P_peft


def _expert_reference(P, A, B, s, layout):
    """Per expert from the doc: A_e = A.reshape(E,r,in)[e], B_e = B.reshape(out,r,E)[:,:,e]."""
    E = P.shape[0]
    r = A.shape[0] // E
    A3, B3 = A.reshape(E, r, -1), B.reshape(B.shape[0], r, E)
    out = []
    for e in range(E):
        d = (B3[:, :, e] @ A3[e]) * s
        out.append(d if layout == "out_in" else d.T)
    return P + torch.stack(out).to(P.dtype)


@pytest.mark.parametrize(
    ("shape", "is_transposed", "layout", "dtype"),
    [
        ((3, 10, 6), False, "out_in", torch.bfloat16),  # transformers v5 Mixtral/Qwen-MoE style
        ((3, 6, 10), True, "in_out", torch.bfloat16),  # GPT-OSS style
        ((4, 8, 5), False, "out_in", torch.float16),
        ((2, 7, 9), False, "out_in", torch.float32),
    ],
)
def test_expert_param_matches_peft(shape, is_transposed, layout, dtype):
    P, A, B, P_peft = run_peft_param(shape, dtype, is_transposed=is_transposed)
    s = scaling(2, 5, False)
    E, r, found = mm.expert_layout(P.shape, A.shape, B.shape)
    assert (E, r, found) == (shape[0], 2, layout)
    ours = mm.merge_expert_param(P, A, B, s)
    assert torch.equal(ours, P_peft)
    reference = _expert_reference(P, A, B, s, layout)
    if dtype == torch.float32:
        # fp32 keeps the delta's own rounding, which depends on the matmul kernel's summation
        # order (bmm vs per-expert mm): compare to the reference relative to the delta's scale.
        torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6 * float(P.abs().max()))
    else:
        assert_close_ulp(ours, reference)
    if dtype != torch.float32:
        # one rounding would be different: PEFT adds round(Δ)
        delta = mm.expert_delta(A, B, s, param_shape=P.shape)
        assert not torch.equal((P.float() + delta).to(dtype), P_peft)


@pytest.mark.parametrize("is_transposed", [False, True])
def test_expert_param_square_needs_layout(is_transposed):
    P, A, B, P_peft = run_peft_param((3, 6, 6), torch.bfloat16, is_transposed=is_transposed, r=3)
    s = scaling(3, 5, False)
    with pytest.raises(MergeError):
        mm.merge_expert_param(P, A, B, s)
    right = "in_out" if is_transposed else "out_in"
    wrong = "out_in" if is_transposed else "in_out"
    assert torch.equal(mm.merge_expert_param(P, A, B, s, layout=right), P_peft)
    assert not torch.equal(mm.merge_expert_param(P, A, B, s, layout=wrong), P_peft)


def test_expert_param_2d_rslora():
    P, A, B, P_peft = run_peft_param((10, 6), torch.bfloat16, r=4, alpha=6, rslora=True)
    s = scaling(4, 6, True)
    assert mm.expert_layout(P.shape, A.shape, B.shape) == (1, 4, "out_in")
    assert torch.equal(mm.merge_expert_param(P, A, B, s), P_peft)


def test_expert_param_single_expert_in_out():
    """(1, in, out): PEFT 0.21.2 takes its 2-D path for E=1 and fails to add (out,in) to it."""
    torch.manual_seed(0)
    P = torch.randn(1, 6, 10).to(torch.bfloat16)
    A, B = torch.randn(2, 6), torch.randn(10, 2)
    ours = mm.merge_expert_param(P, A, B, 2.5)
    assert mm.expert_layout(P.shape, A.shape, B.shape)[2] == "in_out"
    assert torch.equal(ours, P + ((B @ A) * 2.5).T.unsqueeze(0).to(P.dtype))
    with pytest.raises(RuntimeError):
        run_peft_param((1, 6, 10), torch.bfloat16, is_transposed=True)


def test_expert_slices_equal_the_fused_merge():
    """transformers v5 keeps per-expert w1 (gate) / w3 (up) on disk; merging each slice
    must give the same bits as PEFT's merge into the fused gate_up tensor."""
    E, intermediate, hidden = 3, 4, 6
    P, A, B, P_peft = run_peft_param((E, 2 * intermediate, hidden), torch.bfloat16)
    s = scaling(2, 5, False)
    for e in range(E):
        for half in (0, 1):
            rows = (half * intermediate, (half + 1) * intermediate)
            w = P[e, rows[0] : rows[1]].clone()
            got = mm.merge_expert_slice(w, A, B, s, experts=E, expert=e, rows=rows)
            assert torch.equal(got, P_peft[e, rows[0] : rows[1]])
            assert not torch.equal(got, w)
    with pytest.raises(MergeError):
        mm.merge_expert_slice(P[0], A, B, s, experts=5, expert=0)


def test_expert_refusals():
    P = torch.zeros(3, 10, 6)
    with pytest.raises(MergeError):  # A rows not a multiple of E
        mm.merge_expert_param(P, torch.zeros(7, 6), torch.zeros(10, 7), 1.0)
    with pytest.raises(MergeError):  # factors fit neither orientation
        mm.merge_expert_param(P, torch.zeros(6, 5), torch.zeros(10, 6), 1.0)
    with pytest.raises(MergeError):  # layout contradicts the shapes
        mm.merge_expert_param(P, torch.zeros(6, 6), torch.zeros(10, 6), 1.0, layout="in_out")
    with pytest.raises(MergeError):
        mm.merge_expert_param(P, torch.zeros(6, 6), torch.zeros(10, 6), 1.0, layout="oi")
    with pytest.raises(MergeError):
        mm.merge_expert_param(torch.zeros(2, 3, 10, 6), torch.zeros(6, 6), torch.zeros(10, 6), 1.0)
    with pytest.raises(MergeError):
        mm.add_rounded(torch.zeros(3, 4), torch.zeros(4, 3))


# --------------------------------------------------------------------------- refusals and misc


def test_scaling():
    assert scaling(8, 16, False) == 2.0
    assert scaling(8, 16, True) == 16 / math.sqrt(8)
    with pytest.raises(MergeError):
        scaling(0, 16, False)


@pytest.mark.parametrize(
    ("kind", "w", "a", "b", "fifo"),
    [
        ("linear", (48, 64), (4, 64), (47, 4), False),  # out mismatch
        ("linear", (48, 64), (4, 64), (48, 3), False),  # rank mismatch
        ("linear", (48, 64), (4, 64), (48, 4), True),  # transposed when it should not be
        ("linear", (64, 48), (4, 64), (48, 4), False),  # Conv1D weight without fan_in_fan_out
        ("linear", (48, 64, 1), (4, 64), (48, 4), False),
        ("embedding", (40, 24), (4, 24), (40, 4), False),  # A/B roles swapped
        ("embedding", (40, 24), (4, 40), (24, 4), True),
        ("conv", (10, 2, 3, 3), (4, 6, 3, 3), (10, 4, 1, 1), False),  # groups=3 (depthwise-ish)
        ("conv", (10, 6, 3, 3), (4, 6, 3, 3), (10, 4, 3, 3), False),  # B kernel not 1x1
        ("conv", (10, 6, 3, 3), (4, 6, 1, 1), (10, 4, 1, 1), False),  # kernel mismatch
        ("conv", (10, 6, 3, 3), (4, 6, 3), (10, 4, 1), False),
        ("conv", (10, 6), (4, 6), (10, 4), False),
        ("attention", (10, 6), (4, 6), (10, 4), False),
    ],
)
def test_shape_mismatch_raises(kind, w, a, b, fifo):
    with pytest.raises(MergeError):
        mm.check_shapes(kind, w, a, b, fan_in_fan_out=fifo)
    with pytest.raises(MergeError):
        mm.merge_weight(
            torch.zeros(w), torch.zeros(a), torch.zeros(b), 2.0, kind=kind, fan_in_fan_out=fifo
        )


def test_check_shapes_returns_rank():
    assert mm.check_shapes("linear", (48, 64), (4, 64), (48, 4)) == 4
    assert mm.check_shapes("linear", (64, 48), (4, 64), (48, 4), fan_in_fan_out=True) == 4
    assert mm.check_shapes("embedding", (40, 24), (2, 40), (24, 2)) == 2
    assert mm.check_shapes("conv", (10, 6, 1, 1, 3), (4, 6, 1, 1, 3), (10, 4, 1, 1, 1)) == 4


def test_other_refusals():
    W, A, B = torch.zeros(4, 6, dtype=torch.bfloat16), torch.ones(2, 6), torch.ones(4, 2)
    with pytest.raises(MergeError):  # magnitude of the wrong size
        mm.merge_weight(W, A, B, 2.0, kind="linear", magnitude=torch.ones(6))
    with pytest.raises(MergeError):  # quantized base
        mm.merge_weight(W.to(torch.int8), A, B, 2.0, kind="linear")


def test_device_agnostic_on_meta():
    """Nothing is pinned to the CPU: every path runs on whatever device the inputs are on."""
    meta = torch.device("meta")
    W = torch.empty(48, 64, dtype=torch.bfloat16, device=meta)
    A, B = torch.empty(4, 64, device=meta), torch.empty(48, 4, device=meta)
    out = mm.merge_weight(W, A, B, 2.0, kind="linear", magnitude=torch.empty(48, device=meta))
    assert out.device == meta and out.dtype == torch.bfloat16 and out.shape == W.shape
    Wc = torch.empty(10, 6, 3, 3, dtype=torch.float16, device=meta)
    out = mm.merge_weight(
        Wc,
        torch.empty(4, 6, 3, 3, device=meta),
        torch.empty(10, 4, 1, 1, device=meta),
        2.0,
        kind="conv",
        magnitude=torch.empty(1, 10, 1, 1, device=meta),
    )
    assert out.device == meta and out.dtype == torch.float16
    P = torch.empty(3, 10, 6, dtype=torch.bfloat16, device=meta)
    out = mm.merge_expert_param(
        P, torch.empty(6, 6, device=meta), torch.empty(10, 6, device=meta), 2.0
    )
    assert out.device == meta and out.shape == P.shape
    E = torch.empty(40, 24, dtype=torch.bfloat16, device=meta)
    out = mm.replace_rows(E, [3, 1], torch.empty(2, 24, device=meta))
    assert out.device == meta and out.dtype == torch.bfloat16
    out = mm.merge_bias(
        torch.empty(10, dtype=torch.bfloat16, device=meta), torch.empty(10, device=meta), 2.0
    )
    assert out.device == meta and out.dtype == torch.bfloat16


@pytest.mark.parametrize("tail", [1, 2, 3])
def test_a_short_row_tail_gives_the_full_height_products_bits(tail):
    """PEFT computes ``B @ A`` as one full-height product; the merge computes it in row blocks.
    A block of one to three rows takes another GEMM kernel on some CPUs (measured: AMD EPYC,
    torch 2.13, one thread), an ulp off in fp32 — visible after rounding where W and Δ
    nearly cancel. Blocks are laid so that no tail is that short."""
    from lora_cli.merge.math import _BLOCK_ELEMENTS, MIN_GEMM_ROWS, merge_weight

    torch.manual_seed(tail)
    cols = _BLOCK_ELEMENTS // MIN_GEMM_ROWS  # blocks of MIN_GEMM_ROWS rows
    rows = 3 * MIN_GEMM_ROWS + tail
    B, A = torch.randn(rows, 16), torch.randn(16, cols)
    delta = (B @ A) * 2.0  # PEFT's order: one product, then the scale, in fp32
    W = (-delta).bfloat16()  # near-cancellation: a delta's last fp32 bit survives rounding
    want = (W.float() + delta).bfloat16()
    assert torch.equal(merge_weight(W, A, B, 2.0, kind="linear"), want)


def test_row_spans_fold_a_short_tail_into_the_block_before():
    from lora_cli.merge.math import MIN_GEMM_ROWS, row_spans

    for total in range(1, 200):
        for step in (MIN_GEMM_ROWS, 23, 64, 128):
            spans = row_spans(total, step)
            assert spans[0][0] == 0 and spans[-1][1] == total
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
            assert all(start % step == 0 for start, _ in spans)
            if len(spans) > 1:
                assert spans[-1][1] - spans[-1][0] >= MIN_GEMM_ROWS


@pytest.mark.parametrize(("shape", "is_transposed"), [((3, 40, 24), False), ((2, 56, 36), True)])
def test_expert_param_in_row_blocks_matches_peft(monkeypatch, shape, is_transposed):
    """An expert merges a block of its rows at a time (a gpt-oss expert's fp32 delta is
    66 MB): the blocks' einsums give PEFT's whole-tensor bits, a short tail folded in."""
    P, A, B, P_peft = run_peft_param(shape, torch.bfloat16, is_transposed=is_transposed, r=4)
    s = scaling(4, 5, False)
    monkeypatch.setattr(mm, "_BLOCK_ELEMENTS", 17 * shape[2])  # 17-row blocks, short tails
    blocks = []
    real = torch.einsum
    monkeypatch.setattr(torch, "einsum", lambda eq, *ops: blocks.append(eq) or real(eq, *ops))
    mine = P.clone()
    out = mm.merge_expert_param(mine, A, B, s, inplace=True)
    assert out is mine and torch.equal(out, P_peft)
    assert len(blocks) == shape[0] * (shape[1] // 17)  # several blocks an expert
    monkeypatch.setattr(torch, "einsum", real)
    assert torch.equal(
        mm.merge_expert_param(P[1:], A, B, s, expert_rows=(1, shape[0]), param_shape=shape),
        P_peft[1:],
    )
