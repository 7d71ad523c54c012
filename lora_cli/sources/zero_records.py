"""The fields of DeepSpeed's pickled state files, checked by type and range before use.

A ZeRO checkpoint's ``*_optim_states.pt`` and ``*_model_states.pt`` are strangers'
pickles (parsed into inert records): a count, shape, name list or enum there can hold
anything. Each accessor here returns the field in the one shape ``zero.py`` relies on,
or raises a one-line ``FormatError`` naming the file and the field. Counts are bounded
by what the folder and the tensors really hold where ``zero.py`` uses them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lora_cli.errors import FormatError
from lora_cli.io.dtypes import FLOAT_DTYPES
from lora_cli.io.safe_pickle import Inert, PickledTensor, brief

_HINT = "the rank file is corrupt or was not written by DeepSpeed"
ZERO_STAGES = (1, 2, 3)


def _is_int(value: Any) -> bool:
    return type(value) is int


def dims(value: Any) -> tuple[int, ...] | None:
    """A shape (``torch.Size`` arrives as a tuple) of non-negative ints, else None."""
    if isinstance(value, (tuple, list)) and all(_is_int(v) and v >= 0 for v in value):
        return tuple(value)
    return None


class Fields:
    """One rank file's top-level dict (``tree``), read field by field."""

    def __init__(self, path: Path, tree: Any, where: str = "") -> None:
        if not isinstance(tree, dict):
            raise FormatError(f"{path}: {where or 'top level'} is a {type(tree).__name__}, "
                              "not a dict", _HINT)  # fmt: skip
        self.path, self.tree, self.where = path, tree, where

    def bad(self, field: str, what: str, hint: str = _HINT) -> FormatError:
        name = f"{self.where}.{field}" if self.where else field
        return FormatError(f"{self.path}: {name}: {what}", hint)

    def has(self, field: str) -> bool:
        return field in self.tree

    def get(self, field: str) -> Any:
        return self.tree.get(field)

    def sub(self, field: str) -> Fields:
        """A nested dict (``optimizer_state_dict``), required."""
        value = self.tree.get(field)
        if not isinstance(value, dict):
            raise self.bad(field, f"{brief(value)} is missing or not a dict",
                           "not a DeepSpeed ZeRO checkpoint")  # fmt: skip
        return Fields(self.path, value, field)

    def optional_int(self, field: str) -> int | None:
        value = self.tree.get(field)
        if value is not None and not (_is_int(value) and value >= 1):
            raise self.bad(field, f"{brief(value)} is not a positive integer")
        return value

    def zero_stage(self) -> int | None:
        """``ZeroStageEnum(n)`` (an inert record of the enum call) or a plain int; None
        when absent (DeepSpeed's BF16_Optimizer)."""
        value = self.tree.get("zero_stage")
        if value is None:
            return None
        if isinstance(value, Inert) and value.qualname.endswith(".ZeroStageEnum"):
            value = value.args[0] if len(value.args) == 1 else None
        if not _is_int(value) or value not in ZERO_STAGES:
            raise self.bad("zero_stage", f"{brief(value)} is not a ZeRO stage (1, 2 or 3)")
        return value

    def partition_count(self) -> int:
        """The data-parallel world size: an int or one int per param group."""
        value = self.tree.get("partition_count")
        counts = value if isinstance(value, list) else [value]
        if not counts or not all(_is_int(c) and c >= 1 for c in counts):
            raise self.bad("partition_count", f"{brief(value)} is not a positive integer "
                           "(or a list of them)", "not a DeepSpeed ZeRO checkpoint")  # fmt: skip
        return max(counts)

    def tensor_list(self, field: str, *, floats: bool = True) -> list[PickledTensor]:
        """A non-empty list of tensors (the fp32 flat partitions)."""
        value = self.tree.get(field)
        if not (isinstance(value, list) and value
                and all(isinstance(t, PickledTensor) for t in value)):  # fmt: skip
            raise self.bad(field, f"{brief(value)} is not a non-empty list of tensors")
        for i, t in enumerate(value):
            if floats and t.tag.dtype not in FLOAT_DTYPES:
                raise self.bad(f"{field}[{i}]", f"dtype {t.tag.torch_name} is not a "
                               "floating point type")  # fmt: skip
        return value

    def shape_groups(self, field: str) -> list[dict[str, tuple[int, ...]]]:
        """``param_shapes``: a list of {name: shape} per param group (absent: [])."""
        value = self.tree.get(field)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.bad(field, f"{brief(value)} is not a list of {{name: shape}} dicts")
        return [self._shapes(f"{field}[{i}]", g) for i, g in enumerate(value)]

    def shapes(self, field: str) -> dict[str, tuple[int, ...]] | None:
        """``frozen_param_shapes``: {name: shape}, or None when absent."""
        value = self.tree.get(field)
        return None if value is None else self._shapes(field, value)

    def _shapes(self, field: str, value: Any) -> dict[str, tuple[int, ...]]:
        if not isinstance(value, dict):
            raise self.bad(field, f"{brief(value)} is not a {{name: shape}} dict")
        out = {}
        for name, shape in value.items():
            if not isinstance(name, str) or dims(shape) is None:
                raise self.bad(field, f"entry {brief(name)}: {brief(shape)} is not a "
                               "parameter name with a shape")  # fmt: skip
            out[name] = dims(shape)
        return out

    def int_lists(self, field: str) -> list[list[int]] | None:
        """``param_alignment_paddings``: per group, per parameter, non-negative ints."""
        value = self.tree.get(field)
        if value is None:
            return None
        ok = isinstance(value, list) and all(isinstance(g, list) for g in value)
        if not (ok and all(_is_int(p) and p >= 0 for g in value for p in g)):
            raise self.bad(field, f"{brief(value)} is not a list of lists of non-negative "
                           "integers")  # fmt: skip
        return value

    def names(self, field: str) -> list[str]:
        """``buffer_names``: a list of strings (absent: [])."""
        value = self.tree.get(field)
        if value is None:
            return []
        if not (isinstance(value, list) and all(isinstance(n, str) for n in value)):
            raise self.bad(field, f"{brief(value)} is not a list of tensor names")
        return value

    def name_map(self, field: str) -> dict[str, str]:
        """``shared_params``: {alias: source name} (absent: {})."""
        value = self.tree.get(field)
        if value is None:
            return {}
        pairs = value.items() if isinstance(value, dict) else [(None, None)]
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in pairs):
            raise self.bad(field, f"{brief(value)} is not a {{alias: name}} dict of strings")
        return value

    def tensors(self, field: str, *, required: bool = False) -> dict[str, PickledTensor]:
        """``module`` / ``frozen_param_fragments``: {name: tensor}; entries that are not
        tensors (``module`` keeps ``_metadata``-like extras) are left out."""
        value = self.tree.get(field)
        if value is None and not required:
            return {}
        if not isinstance(value, dict):
            raise self.bad(field, f"{brief(value)} is not a state dict",
                           "not a DeepSpeed ZeRO checkpoint")  # fmt: skip
        out = {}
        for name, t in value.items():
            if isinstance(name, str) and isinstance(t, PickledTensor):
                if t.tag.dtype is None:
                    raise self.bad(f"{field}[{name!r}]", f"dtype {t.tag.torch_name} cannot be "
                                   "stored in safetensors")  # fmt: skip
                out[name] = t
        return out
