"""The LoRA configurations of PEFT's own test suite, on tiny models of our own.

Each case names the PEFT test file it comes from (tests/test_custom_models.py
``TEST_CASES``, test_lora_variants.py, test_initialization.py, test_trainable_tokens.py,
test_target_parameters.py, test_decoder_models.py), a model of the same shape as the one
PEFT's test uses, the ``LoraConfig`` arguments, and what ``lora merge`` must do with it:
merge to PEFT's result, or refuse for a reason the message names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

# --------------------------------------------------------------------------- models


class MLP(nn.Module):
    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.lin1 = nn.Linear(20, 2, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


class EmbConv1D(nn.Module):
    """An embedding and a GPT-2 ``Conv1D`` (weight stored (in, out))."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 5)
        self.conv1d = Conv1D(1, 5)
        self.lin0 = nn.Linear(10, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lin0(self.conv1d(self.emb(ids)).flatten(1))


class Convs(nn.Module):
    """One convolution ``conv`` (named as in PEFT's models) followed by a Linear ``lin0``."""

    def __init__(self, name: str, conv: nn.Module, lin_in: int) -> None:
        super().__init__()
        self.conv_name = name
        self.add_module(name, conv)
        self.lin0 = nn.Linear(lin_in, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin0(getattr(self, self.conv_name)(x).flatten(1))


class MHA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(10, 2)
        self.lin0 = nn.Linear(10, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin0(self.mha(x, x, x)[0])


class ParamLinear(nn.Module):
    """A linear layer holding a bare ``nn.Parameter`` (a ``target_parameters`` target)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in**0.5)
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MlpUsingParameters(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = ParamLinear(10, 20)
        self.lin1 = ParamLinear(20, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


class Experts(nn.Module):
    """transformers-v5 style fused MoE experts: gate_up (E, 2I, H), down (E, H, I)."""

    def __init__(self, experts: int = 4, hidden: int = 8, inter: int = 6) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(experts, 2 * inter, hidden) / 3)
        self.down_proj = nn.Parameter(torch.randn(experts, hidden, inter) / 3)


class TransposedExperts(nn.Module):
    """GPT-OSS style experts, stored (E, in, out) and flagged ``is_transposed`` as in
    transformers v5: gate_up (E, H, 2I), down (E, I, H)."""

    is_transposed = True

    def __init__(self, experts: int = 4, hidden: int = 8, inter: int = 6) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(experts, hidden, 2 * inter) / 3)
        self.down_proj = nn.Parameter(torch.randn(experts, inter, hidden) / 3)


class MoE(nn.Module):
    def __init__(self, experts: type[nn.Module] = Experts) -> None:
        super().__init__()
        self.experts = experts()
        self.lin0 = nn.Linear(8, 8)


class EmbModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(100, 5)
        self.lin0 = nn.Linear(5, 2)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "MLP": MLP,
    "MLPNoBias": lambda: MLP(bias=False),
    "EmbConv1D": EmbConv1D,
    "Conv1d": lambda: Convs("conv1d", nn.Conv1d(1, 1, 2), 9),
    "Conv1dBigger": lambda: Convs("conv1d", nn.Conv1d(64, 16, 2), 144),
    "Conv1dKernel1": lambda: Convs("conv1d", nn.Conv1d(3, 10, 1), 100),
    "Conv1dGroups": lambda: Convs("conv1d", nn.Conv1d(8, 8, 3, groups=2), 64),
    "Conv2d": lambda: Convs("conv2d", nn.Conv2d(5, 10, 3), 10),
    "Conv2d1x1": lambda: Convs("conv2d", nn.Conv2d(1, 10, 1), 90),
    "Conv2dGroups": lambda: Convs("conv2d", nn.Conv2d(16, 16, 3, groups=8), 16),
    "Conv2dGroups2": lambda: Convs("conv2d", nn.Conv2d(16, 32, 3, padding=1, groups=2), 32),
    "Conv3d": lambda: Convs("conv3d", nn.Conv3d(5, 10, 3), 10),
    "Conv3d1x1x3": lambda: Convs("conv3d", nn.Conv3d(2, 4, (1, 1, 3)), 12),
    "MHA": MHA,
    "MlpUsingParameters": MlpUsingParameters,
    "MoE": MoE,
    "MoETransposed": lambda: MoE(TransposedExperts),
    "EmbModel": EmbModel,
}

# Inputs for the cases whose oracle is the unmerged PeftModel's forward pass.
INPUTS: dict[str, Callable[[], torch.Tensor]] = {
    "MHA": lambda: torch.randn(3, 1, 10),
    "Conv3d1x1x3": lambda: torch.randn(2, 2, 1, 1, 5),
}


# --------------------------------------------------------------------------- cases

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Case:
    name: str
    source: str  # the PEFT test file the configuration comes from
    model: str  # key of MODELS, or "llama" (tests/conftest.py tiny_model)
    lora: dict[str, Any]
    refuse: str | None = None  # a word the refusal must contain; None: must merge
    peft_refuses: bool = False  # PEFT's own merge raises (groups > 1, aLoRA, 1×1×k conv3d)
    forward_oracle: bool = False  # also compare with the unmerged PeftModel's outputs
    dtypes: tuple[torch.dtype, ...] = DTYPES
    # PiSSA/OLoRA: save the trained adapter converted to plain LoRA on the original base
    # (``save_pretrained(path_initial_model_for_weight_conversion=...)``)
    convert_init: bool = False
    model_args: dict[str, Any] = field(default_factory=dict)  # tiny_model overrides


def _variant(name: str, **kwargs: Any) -> Any:
    from peft.tuners.lora import config

    return getattr(config, name)(**kwargs)


CUSTOM = "test_custom_models.py"
VARIANTS = "test_lora_variants.py"
INIT = "test_initialization.py"
TOKENS = "test_trainable_tokens.py"
PARAMS = "test_target_parameters.py"
DECODER = "test_decoder_models.py"


def cases() -> list[Case]:
    velora = lambda t: {"velora_config": _variant("VeloraConfig", num_groups=2, init_type=t)}  # noqa: E731
    bd = lambda **kw: {"use_bdlora": _variant("BdLoraConfig", **kw)}  # noqa: E731
    return [
        # ---- test_custom_models.py TEST_CASES (LoRA rows)
        Case("MLP 1 regex", CUSTOM, "MLP", {"target_modules": "lin0"}),
        Case("MLP 2", CUSTOM, "MLP", {"target_modules": ["lin0"]}),
        Case("MLP 3", CUSTOM, "MLP", {"target_modules": ["lin1"]}),
        Case("MLP 4", CUSTOM, "MLP", {"target_modules": ["lin0", "lin1"]}),
        Case(
            "MLP 5 modules_to_save",
            CUSTOM,
            "MLP",
            {"target_modules": ["lin0"], "modules_to_save": ["lin1"]},
        ),
        Case(
            "MLP 6 alpha+dropout",
            CUSTOM,
            "MLP",
            {"target_modules": ["lin0"], "lora_alpha": 4, "lora_dropout": 0.1},
        ),
        Case("MLP 7 DoRA", CUSTOM, "MLP", {"target_modules": ["lin0"], "use_dora": True}),
        Case("MLP 8 DoRA", CUSTOM, "MLP", {"target_modules": ["lin0", "lin1"], "use_dora": True}),
        Case(
            "MLP 9 DoRA regex",
            CUSTOM,
            "MLP",
            {"target_modules": "lin1", "use_dora": True, "lora_alpha": 32},
        ),
        Case(
            "MLP KaSA",
            CUSTOM,
            "MLP",
            {"target_modules": ["lin0"], "kasa_config": _variant("KasaConfig"), "r": 4},
            refuse="KaSA",
        ),
        Case(
            "MLP MiCA",
            CUSTOM,
            "MLP",
            {"target_modules": ["lin0"], "init_lora_weights": "mica", "r": 4},
        ),
        Case(
            "MLP 10 VeLoRA random", CUSTOM, "MLP", {"target_modules": ["lin0"], **velora("random")}
        ),
        Case(
            "MLP 11 VeLoRA batch_average",
            CUSTOM,
            "MLP",
            {"target_modules": ["lin0", "lin1"], **velora("batch_average")},
        ),
        Case(
            "MLP 12 VeLoRA batch_average_once",
            CUSTOM,
            "MLP",
            {"target_modules": ["lin0"], **velora("batch_average_once")},
        ),
        Case("EmbConv1D 1", CUSTOM, "EmbConv1D", {"target_modules": ["conv1d"]}),
        Case("EmbConv1D 2", CUSTOM, "EmbConv1D", {"target_modules": ["emb"]}),
        Case("EmbConv1D 3", CUSTOM, "EmbConv1D", {"target_modules": ["emb", "conv1d"]}),
        Case(
            "EmbConv1D 1 DoRA",
            CUSTOM,
            "EmbConv1D",
            {"target_modules": ["conv1d"], "use_dora": True},
        ),
        Case(
            "EmbConv1D 2 DoRA", CUSTOM, "EmbConv1D", {"target_modules": ["emb"], "use_dora": True}
        ),
        Case(
            "EmbConv1D 3 DoRA",
            CUSTOM,
            "EmbConv1D",
            {"target_modules": ["emb", "conv1d"], "use_dora": True},
        ),
        Case(
            "EmbConv1D trainable_tokens",
            CUSTOM,
            "EmbConv1D",
            {"target_modules": ["conv1d"], "trainable_token_indices": {"emb": [0, 10]}},
        ),
        Case("Conv1d", CUSTOM, "Conv1d", {"target_modules": ["conv1d"]}),
        Case("Conv1d DoRA", CUSTOM, "Conv1d", {"target_modules": ["conv1d"], "use_dora": True}),
        Case("Conv1d bigger", CUSTOM, "Conv1dBigger", {"target_modules": ["conv1d"], "r": 2}),
        Case("Conv1d kernel 1", CUSTOM, "Conv1dKernel1", {"target_modules": ["conv1d"]}),
        Case("Conv2d 1", CUSTOM, "Conv2d", {"target_modules": ["conv2d"]}),
        Case("Conv2d 2", CUSTOM, "Conv2d", {"target_modules": ["conv2d", "lin0"]}),
        Case("Conv2d 1 DoRA", CUSTOM, "Conv2d", {"target_modules": ["conv2d"], "use_dora": True}),
        Case(
            "Conv2d 2 DoRA",
            CUSTOM,
            "Conv2d",
            {"target_modules": ["conv2d", "lin0"], "use_dora": True},
        ),
        Case("Conv2d 1x1", CUSTOM, "Conv2d1x1", {"target_modules": ["conv2d"]}),
        Case(
            "Conv2d 1x1 DoRA", CUSTOM, "Conv2d1x1", {"target_modules": ["conv2d"], "use_dora": True}
        ),
        Case(
            "Conv2d groups",
            CUSTOM,
            "Conv2dGroups",
            {"target_modules": ["conv2d"]},
            refuse="groups",
            peft_refuses=True,
        ),
        Case(
            "Conv2d groups2",
            CUSTOM,
            "Conv2dGroups2",
            {"target_modules": ["conv2d"]},
            refuse="groups",
            peft_refuses=True,
        ),
        Case(
            "Conv2d groups DoRA",
            CUSTOM,
            "Conv2dGroups",
            {"target_modules": ["conv2d"], "use_dora": True},
            refuse="groups",
            peft_refuses=True,
        ),
        Case(
            "Conv2d groups2 DoRA",
            CUSTOM,
            "Conv2dGroups2",
            {"target_modules": ["conv2d"], "use_dora": True},
            refuse="groups",
            peft_refuses=True,
        ),
        Case(
            "Conv1d groups",
            CUSTOM,
            "Conv1dGroups",
            {"target_modules": ["conv1d"]},
            refuse="groups",
            peft_refuses=True,
        ),
        Case("Conv3d 1", CUSTOM, "Conv3d", {"target_modules": ["conv3d"]}),
        Case("Conv3d 2", CUSTOM, "Conv3d", {"target_modules": ["conv3d", "lin0"]}),
        Case("Conv3d 1 DoRA", CUSTOM, "Conv3d", {"target_modules": ["conv3d"], "use_dora": True}),
        Case(
            "Conv3d 2 DoRA",
            CUSTOM,
            "Conv3d",
            {"target_modules": ["conv3d", "lin0"], "use_dora": True},
        ),
        Case(
            "Conv3d 1x1x3 (PEFT #3768)",
            CUSTOM,
            "Conv3d1x1x3",
            {"target_modules": ["conv3d"]},
            peft_refuses=True,
            forward_oracle=True,
            dtypes=(torch.float32,),
        ),
        Case(
            "MLP lora_bias",
            CUSTOM,
            "MLP",
            {"target_modules": ["lin0", "lin1"], "lora_bias": True, "lora_alpha": 32},
        ),
        Case(
            "Conv2d lora_bias",
            CUSTOM,
            "Conv2d",
            {"target_modules": ["conv2d"], "lora_bias": True, "lora_alpha": 32},
        ),
        Case(
            "Conv3d lora_bias",
            CUSTOM,
            "Conv3d",
            {"target_modules": ["conv3d"], "lora_bias": True, "lora_alpha": 32},
        ),
        Case("MHA 1", CUSTOM, "MHA", {"target_modules": ["mha"]}, forward_oracle=True),
        Case("MHA 2", CUSTOM, "MHA", {"target_modules": ["mha", "lin0"]}, forward_oracle=True),
        Case(
            "MHA rank_pattern naming out_proj",  # PEFT gives out_proj the MHA's own r/alpha
            CUSTOM,
            "MHA",
            {
                "target_modules": ["mha"],
                "rank_pattern": {"out_proj": 2},
                "alpha_pattern": {"out_proj": 3},
            },
            forward_oracle=True,
        ),
        Case(
            "MLP nn.Parameter 1",
            CUSTOM,
            "MlpUsingParameters",
            {"target_parameters": ["lin0.weight"]},
        ),
        Case(
            "MLP nn.Parameter 2",
            CUSTOM,
            "MLP",
            {"target_modules": ["lin0"], "target_parameters": ["lin1.weight"]},
        ),
        Case(
            "MLP MonteCLoRA",
            CUSTOM,
            "MLP",
            {
                "target_modules": ["lin0"],
                "monteclora_config": _variant("MontecloraConfig", num_samples=2),
            },
        ),
        Case(
            "BD-LoRA A only",
            CUSTOM,
            "MLP",
            {
                "target_modules": ["lin0", "lin1"],
                **bd(target_modules_bd_a=["lin0"], match_strict=False),
            },
        ),
        Case(
            "BD-LoRA B only",
            CUSTOM,
            "MLP",
            {
                "target_modules": ["lin0", "lin1"],
                **bd(target_modules_bd_b=["lin1"], nblocks=2, match_strict=False),
            },
        ),
        Case(
            "BD-LoRA A and B",
            CUSTOM,
            "MLP",
            {
                "target_modules": ["lin0", "lin1"],
                **bd(target_modules_bd_a=["lin0"], target_modules_bd_b=["lin1"], nblocks=2),
            },
        ),
        Case("MLP bias=all", CUSTOM, "MLP", {"target_modules": ["lin0"], "bias": "all"}),
        Case(
            "MLP bias=lora_only", CUSTOM, "MLP", {"target_modules": ["lin0"], "bias": "lora_only"}
        ),
        Case(
            "MLP bias=all + modules_to_save",
            CUSTOM,
            "MLP",
            {"target_modules": ["lin0"], "bias": "all", "modules_to_save": ["lin1"]},
        ),
        Case("MLP no bias", CUSTOM, "MLPNoBias", {"target_modules": ["lin0", "lin1"]}),
        # ---- test_lora_variants.py
        Case(
            "KaSA two layers",
            VARIANTS,
            "MLP",
            {"target_modules": ["lin0", "lin1"], "kasa_config": _variant("KasaConfig"), "r": 1},
            refuse="KaSA",
        ),
        Case(
            "BD-LoRA A nblocks 2",
            VARIANTS,
            "MLP",
            {
                "target_modules": ["lin0"],
                **bd(target_modules_bd_a=["lin0"], nblocks=2, match_strict=True),
            },
        ),
        Case(
            "BD-LoRA B nblocks 2",
            VARIANTS,
            "MLP",
            {
                "target_modules": ["lin0"],
                **bd(target_modules_bd_b=["lin0"], nblocks=2, match_strict=True),
            },
        ),
        Case(
            "DoRA Conv1D fan_in_fan_out",
            VARIANTS,
            "EmbConv1D",
            {"target_modules": ["conv1d"], "use_dora": True, "fan_in_fan_out": True},
        ),
        Case(
            "aLoRA",
            VARIANTS,
            "MLP",
            {"target_modules": ["lin0"], "alora_invocation_tokens": [2]},
            refuse="aLoRA",
            peft_refuses=True,
        ),
        # ---- test_initialization.py
        Case(
            "init gaussian",
            INIT,
            "MLP",
            {"target_modules": ["lin0", "lin1"], "init_lora_weights": "gaussian"},
        ),
        Case(
            "init orthogonal",
            INIT,
            "MLP",
            {"target_modules": ["lin0"], "init_lora_weights": "orthogonal", "r": 4},
        ),
        Case(
            "init pissa",
            INIT,
            "MLP",
            {"target_modules": ["lin0"], "init_lora_weights": "pissa"},
            refuse="mutates the base",
        ),
        Case(
            "init olora",
            INIT,
            "MLP",
            {"target_modules": ["lin0"], "init_lora_weights": "olora"},
            refuse="mutates the base",
            dtypes=(torch.float32,),
        ),
        Case(
            "rslora + patterns",
            INIT,
            "MLP",
            {
                "target_modules": ["lin0", "lin1"],
                "use_rslora": True,
                "rank_pattern": {"lin0": 3},
                "alpha_pattern": {"lin1": 5},
            },
        ),
        Case(
            "exclude_modules", INIT, "MLP", {"target_modules": "lin.*", "exclude_modules": ["lin1"]}
        ),
        Case(
            "init pissa converted",
            INIT,
            "MLP",
            {"target_modules": ["lin0"], "init_lora_weights": "pissa"},
            convert_init=True,
        ),
        Case(
            "init olora converted",
            INIT,
            "MLP",
            {"target_modules": ["lin0"], "init_lora_weights": "olora"},
            convert_init=True,
            dtypes=(torch.float32,),  # PEFT's OLoRA init needs an fp32 QR
        ),
        Case(
            "init MiCA embedding",
            INIT,
            "EmbConv1D",
            {"target_modules": ["emb"], "init_lora_weights": "mica", "r": 4},
        ),
        # ---- test_trainable_tokens.py
        Case(
            "trainable tokens list",
            TOKENS,
            "EmbModel",
            {"target_modules": ["lin0"], "trainable_token_indices": [0, 1, 3]},
        ),
        Case(
            "trainable tokens dict",
            TOKENS,
            "EmbModel",
            {"target_modules": ["lin0"], "trainable_token_indices": {"embed_tokens": [5, 7]}},
        ),
        # ---- test_target_parameters.py
        Case(
            "MoE gate_up_proj",
            PARAMS,
            "MoE",
            {"target_modules": [], "target_parameters": ["experts.gate_up_proj"]},
        ),
        Case(
            "MoE down_proj",
            PARAMS,
            "MoE",
            {"target_modules": [], "target_parameters": ["experts.down_proj"]},
        ),
        Case(
            "MoE both + lin0",
            PARAMS,
            "MoE",
            {
                "target_modules": ["lin0"],
                "target_parameters": ["experts.gate_up_proj", "experts.down_proj"],
            },
        ),
        Case(
            "MoE rank_pattern",
            PARAMS,
            "MoE",
            {
                "target_modules": [],
                "target_parameters": ["experts.gate_up_proj"],
                "rank_pattern": {"experts.gate_up_proj": 2},
            },
        ),
        Case(
            "MoE transposed (GPT-OSS layout)",
            PARAMS,
            "MoETransposed",
            {"target_modules": [], "target_parameters": ["experts.gate_up_proj", "down_proj"]},
        ),
        # ---- test_decoder_models.py (a tiny Llama, a tiny GPT-2)
        Case("decoder default targets", DECODER, "llama", {"task_type": "CAUSAL_LM"}),
        Case(
            "decoder all-linear",
            DECODER,
            "llama",
            {"task_type": "CAUSAL_LM", "target_modules": "all-linear"},
        ),
        Case("decoder DoRA", DECODER, "llama", {"task_type": "CAUSAL_LM", "use_dora": True}),
        Case(
            "decoder embed_tokens", DECODER, "llama", {"target_modules": ["embed_tokens", "q_proj"]}
        ),
        Case(
            "decoder patterns + layers_to_transform",
            DECODER,
            "llama",
            {
                "target_modules": ["q_proj", "v_proj", "o_proj"],
                "layers_to_transform": [1],
                "layers_pattern": "layers",
                "rank_pattern": {"v_proj": 2},
                "alpha_pattern": {"layers.1.self_attn.o_proj": 3},
            },
            model_args={"num_hidden_layers": 2},
        ),
        Case("decoder rsLoRA", DECODER, "llama", {"task_type": "CAUSAL_LM", "use_rslora": True}),
        Case(
            "decoder lm_head modules_to_save",
            DECODER,
            "llama",
            {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},
        ),
        Case("decoder gpt2 Conv1D", DECODER, "gpt2", {"task_type": "CAUSAL_LM"}),
        Case(
            "decoder gpt2 all-linear DoRA",
            DECODER,
            "gpt2",
            {"task_type": "CAUSAL_LM", "target_modules": "all-linear", "use_dora": True},
        ),
        Case(
            "decoder aLoRA",
            DECODER,
            "llama",
            {"task_type": "CAUSAL_LM", "alora_invocation_tokens": [1]},
            refuse="aLoRA",
            peft_refuses=True,
        ),
    ]
