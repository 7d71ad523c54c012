"""The one table of tensor dtypes: safetensors names, sizes and torch dtypes.

safetensors names are the currency inside the package (headers, plans, JSON);
torch dtypes are looked up lazily so that importing this module stays cheap.
"""

from __future__ import annotations

from typing import Any

# name -> (bits per element, torch attribute). Order is the Rust ``Dtype`` enum
# order ("increasing alignment"), which the writer uses to sort tensors.
SAFETENSORS_DTYPES: dict[str, tuple[int, str | None]] = {
    "BOOL": (8, "bool"),
    "F4": (4, "float4_e2m1fn_x2"),
    "F6_E2M3": (6, None),
    "F6_E3M2": (6, None),
    "U8": (8, "uint8"),
    "I8": (8, "int8"),
    "F8_E5M2": (8, "float8_e5m2"),
    "F8_E4M3": (8, "float8_e4m3fn"),
    "F8_E8M0": (8, "float8_e8m0fnu"),
    "F8_E4M3FNUZ": (8, "float8_e4m3fnuz"),
    "F8_E5M2FNUZ": (8, "float8_e5m2fnuz"),
    "I16": (16, "int16"),
    "U16": (16, "uint16"),
    "F16": (16, "float16"),
    "BF16": (16, "bfloat16"),
    "I32": (32, "int32"),
    "U32": (32, "uint32"),
    "F32": (32, "float32"),
    "C64": (64, "complex64"),
    "F64": (64, "float64"),
    "I64": (64, "int64"),
    "U64": (64, "uint64"),
}

DTYPE_ORDER = {name: i for i, name in enumerate(SAFETENSORS_DTYPES)}

FLOAT_DTYPES = frozenset(
    {"F16", "BF16", "F32", "F64", "F8_E5M2", "F8_E4M3", "F8_E4M3FNUZ", "F8_E5M2FNUZ"}
)

# User-facing spellings for --dtype.
DTYPE_ALIASES = {
    "fp32": "F32",
    "float32": "F32",
    "fp16": "F16",
    "float16": "F16",
    "half": "F16",
    "bf16": "BF16",
    "bfloat16": "BF16",
}


def itemsize_bits(dtype: str) -> int:
    return SAFETENSORS_DTYPES[dtype][0]


def nbytes_of(dtype: str, shape: tuple[int, ...] | list[int]) -> int:
    """Bytes a tensor occupies; sub-byte dtypes must fill whole bytes."""
    n = 1
    for d in shape:
        n *= d
    bits = n * itemsize_bits(dtype)
    return bits // 8 if bits % 8 == 0 else -1


def to_torch(dtype: str) -> Any:
    """The torch dtype for a safetensors dtype name (imports torch)."""
    import torch

    attr = SAFETENSORS_DTYPES.get(dtype, (0, None))[1]
    if attr is None or not hasattr(torch, attr):
        from lora_cli.errors import FormatError

        raise FormatError(f"dtype {dtype} is not supported by this torch build")
    return getattr(torch, attr)


def from_torch(torch_dtype: Any) -> str:
    """The safetensors dtype name for a torch dtype."""
    attr = str(torch_dtype).removeprefix("torch.")
    for name, (_, a) in SAFETENSORS_DTYPES.items():
        if a == attr:
            return name
    from lora_cli.errors import FormatError

    raise FormatError(f"torch dtype {torch_dtype} has no safetensors equivalent")


def parse_dtype_option(value: str) -> str | None:
    """``keep`` → None; ``fp16``/``bf16``/``fp32`` (any case) → safetensors name."""
    v = value.strip().lower()
    if v in ("keep", "auto", ""):
        return None
    if v in DTYPE_ALIASES:
        return DTYPE_ALIASES[v]
    if value.upper() in SAFETENSORS_DTYPES:
        return value.upper()
    from lora_cli.errors import UsageError

    raise UsageError(f"unknown dtype {value!r}", "use keep, fp32, fp16 or bf16")
