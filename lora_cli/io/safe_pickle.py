"""A pickle parser that builds inert records instead of running anything.

``torch.load`` runs the pickle, and even its weights-only mode has had remote-code and
memory-corruption bugs. Here every global, callable and ``BUILD`` target is one of our
own stand-ins, so the result is a tree of plain records: storages and tensor views to
be read later (never here), dicts, lists, numbers, and ``Inert`` objects that only
remember their class name and state.

A profile lists exactly the globals one format needs: plain state dicts get the torch
tensor machinery; DeepSpeed and torch.distributed.checkpoint files add their few
classes as inert records. Anything else is refused by name.
"""

from __future__ import annotations

import _compat_pickle
import io
import pickle
from dataclasses import dataclass
from typing import Any

from lora_cli.errors import UnsafePickleError
from lora_cli.io.dtypes import SAFETENSORS_DTYPES

# Torch attribute name -> safetensors name, for whole-byte dtypes only (F4 packs two
# values per torch element, so its shapes would not match).
DTYPE_NAMES = {a: n for n, (bits, a) in SAFETENSORS_DTYPES.items() if a and bits % 8 == 0}
# Dtypes torch can pickle that safetensors cannot store: allowed, then refused by name.
_OTHER_DTYPES = ("complex128", "complex32", "float4_e2m1fn_x2", "quint8", "qint8", "qint32")
_STORAGES = {
    "FloatStorage": "F32", "HalfStorage": "F16", "BFloat16Storage": "BF16",
    "DoubleStorage": "F64", "LongStorage": "I64", "IntStorage": "I32", "ShortStorage": "I16",
    "CharStorage": "I8", "ByteStorage": "U8", "BoolStorage": "BOOL",
    "ComplexFloatStorage": "C64", "ComplexDoubleStorage": None, "UntypedStorage": None,
}  # fmt: skip
MALICIOUS = "not part of a tensor state dict; this file may be malicious"


@dataclass(frozen=True)
class Tag:
    """A storage class or dtype global; ``dtype`` is None when it has no safetensors name."""

    torch_name: str
    dtype: str | None


@dataclass(frozen=True)
class Storage:
    key: str
    tag: Tag
    numel: int  # bytes for UntypedStorage


@dataclass(frozen=True)
class PickledTensor:
    """A tensor as the pickle describes it: a strided view on a storage not yet read."""

    storage: Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    tag: Tag

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class Inert:
    """A class instance from an allowlisted global: its name, arguments and state only."""

    qualname = "?"

    def __new__(cls, *args: Any) -> Inert:
        obj = super().__new__(cls)
        obj.args = args
        obj.state = None
        return obj

    def __init__(self, *args: Any) -> None:
        pass

    def get(self, key: str, default: Any = None) -> Any:
        """An attribute from the BUILD state (dict, or a (dict, slots) pair)."""
        state = self.state
        if isinstance(state, tuple) and len(state) == 2:
            merged = {**(state[0] or {}), **(state[1] or {})}
            return merged.get(key, default)
        return state.get(key, default) if isinstance(state, dict) else default

    def __repr__(self) -> str:
        return f"<{self.qualname}{self.args!r:.60}>"


def _ints(value: Any) -> bool:
    return isinstance(value, tuple) and all(type(v) is int for v in value)


def _tensor(storage: Any, offset: Any, shape: Any, stride: Any, tag: Any) -> PickledTensor:
    if not (isinstance(storage, Storage) and type(offset) is int and isinstance(tag, Tag)):
        raise ValueError("malformed tensor rebuild arguments")
    if not (_ints(shape) and _ints(stride) and len(shape) == len(stride)):
        raise ValueError("malformed tensor shape/stride")
    return PickledTensor(storage, offset, shape, stride, tag)


def _rebuild_v2(storage: Any, offset: Any, shape: Any, stride: Any, *_: Any) -> PickledTensor:
    tag = getattr(storage, "tag", None)
    if tag is None or tag.torch_name == "UntypedStorage":
        raise ValueError("_rebuild_tensor_v2 needs a typed storage")
    return _tensor(storage, offset, shape, stride, tag)


def _rebuild_v3(storage: Any, offset: Any, shape: Any, stride: Any, _g: Any, _h: Any,
                dtype: Any, *_: Any) -> PickledTensor:  # fmt: skip
    return _tensor(storage, offset, shape, stride, dtype)


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    return data


def _rebuild_from_type_v2(func: Any, _new_type: Any, args: Any, _state: Any) -> Any:
    """A tensor subclass or a tensor with Python attributes (DeepSpeed's ``ds_id``):
    rebuild the plain tensor, drop the type and the attributes."""
    if func is not _rebuild_v2 or not isinstance(args, tuple):
        raise ValueError("_rebuild_from_type_v2 of something other than _rebuild_tensor_v2")
    return _rebuild_v2(*args)


def _size(dims: Any = ()) -> tuple[int, ...]:
    return tuple(dims)


def _inert(module: str, name: str) -> type[Inert]:
    return type(name, (Inert,), {"qualname": f"{module}.{name}"})


_STATE_DICT: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): dict,
    ("torch", "Size"): _size,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}
_DEEPSPEED_CLASSES = (
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)
_DCP_CLASSES = (
    ("torch.distributed.checkpoint.metadata", "Metadata"),
    ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "TensorProperties"),
    ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
    ("torch.distributed.checkpoint.metadata", "StorageMeta"),
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
)
PROFILES: dict[str, dict[tuple[str, str], Any]] = {
    "state_dict": _STATE_DICT,
    "deepspeed": {
        **_STATE_DICT,
        ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
        ("torch", "Tensor"): _inert("torch", "Tensor"),
        **{key: _inert(*key) for key in _DEEPSPEED_CLASSES},
    },
    "dcp": {**_STATE_DICT, **{key: _inert(*key) for key in _DCP_CLASSES}},
}


class SafeUnpickler(pickle._Unpickler):  # the pure-Python one, so opcodes can be overridden
    def __init__(self, data: bytes, label: str, profile: str = "state_dict") -> None:
        super().__init__(io.BytesIO(data))
        self.label = label
        self.allowed = PROFILES[profile]
        self.calls = tuple(self.allowed.values())

    def _refuse(self, what: str) -> UnsafePickleError:
        return UnsafePickleError(f"{self.label}: refused {what}", MALICIOUS)

    def find_class(self, module: str, name: str) -> Any:
        spelled = f"{module}.{name}"
        if self.proto < 3:  # protocol 2 spells builtins as __builtin__: map, then check
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[module, name]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        if (module, name) in self.allowed:
            return self.allowed[module, name]
        if module in ("torch", "torch.storage", "torch.cuda") and name in _STORAGES:
            return Tag(name, _STORAGES[name])
        if module == "torch" and (name in DTYPE_NAMES or name in _OTHER_DTYPES):
            return Tag(name, DTYPE_NAMES.get(name))
        raise self._refuse(f"to load global '{spelled}'")

    def persistent_load(self, pid: Any) -> Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise ValueError(f"unexpected persistent id {pid!r:.80}")
        _, tag, key, _location, numel = pid
        if not (isinstance(tag, Tag) and tag.torch_name.endswith("Storage")):
            raise ValueError("persistent id without a storage type")
        if not (isinstance(key, str) and key and "/" not in key and type(numel) is int):
            raise ValueError(f"malformed storage id {pid!r:.80}")
        return Storage(key, tag, numel)

    def load_reduce(self) -> None:
        if not any(self.stack[-2] is f for f in self.calls):
            raise self._refuse(f"to call {self.stack[-2]!r:.80}")
        super().load_reduce()

    def load_newobj(self) -> None:
        """``cls.__new__(cls, *args)``: only for our inert classes (dataclass records)."""
        cls = self.stack[-2]
        if not (isinstance(cls, type) and issubclass(cls, Inert) and cls in self.calls):
            raise self._refuse("an object-construction opcode (INST/OBJ/NEWOBJ)")
        args = self.stack.pop()
        self.stack[-1] = cls.__new__(cls, *args)

    def load_build(self) -> None:
        """Keep the state of inert records; drop attribute state (``state_dict()._metadata``)
        rather than set it."""
        state = self.stack.pop()
        target = self.stack[-1]
        if isinstance(target, Inert):
            target.state = state
            return
        if not isinstance(target, (dict, PickledTensor)):
            raise self._refuse(f"BUILD on {type(target).__name__}")

    def _refuse_opcode(self) -> None:
        raise self._refuse("an object-construction opcode (INST/OBJ/NEWOBJ)")

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.BUILD[0]] = load_build
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    for _op in (pickle.INST, pickle.OBJ, pickle.NEWOBJ_EX):
        dispatch[_op[0]] = _refuse_opcode
    del _op


def safe_loads(data: bytes, label: str, profile: str = "state_dict") -> Any:
    """Parse a pickle into inert records; every failure is a malformed (or hostile) pickle."""
    from lora_cli.errors import FormatError

    try:
        return SafeUnpickler(data, label, profile).load()
    except FormatError:
        raise
    except Exception as exc:  # every callable is ours: any failure is a malformed pickle
        raise FormatError(f"{label}: bad pickle ({type(exc).__name__}: {exc})") from None
