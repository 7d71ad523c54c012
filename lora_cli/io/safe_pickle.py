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
import reprlib
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

MAX_KEY_NODES = 10_000
"""Nodes (counting shared ones each time they occur) of a tuple or frozenset used as a
dict key or set member. Hashing walks the whole expanded tree, so 200 nested tuples that
each hold the previous one twice take 2^200 steps from a 2 KB pickle; real keys are
strings, ints, records and short tuples of them."""

MAX_KEY_DEPTH = 100
"""Nesting depth of such a key: hashing and comparing recurse in C, where a deep enough
chain overflows the stack instead of raising."""


class _Brief(reprlib.Repr):
    """``repr`` with bounded work: few levels, few items, short strings and numbers (a
    hostile record's full ``repr`` can be exponential in its pickle's size)."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxtuple, self.maxlist, self.maxdict = 3, 4, 4, 4
        self.maxset = self.maxfrozenset = self.maxdeque = self.maxarray = 4
        self.maxstring, self.maxlong, self.maxother = 60, 40, 60

    def repr_int(self, x: int, level: int) -> str:
        return repr(x) if x.bit_length() <= 128 else f"<int of {x.bit_length()} bits>"

    def repr_instance(self, x: object, level: int) -> str:
        if isinstance(x, Inert):
            return f"<{x.qualname[-60:]}>"
        return f"<{type(x).__name__}>"


brief = _Brief().repr


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
            parts = [s for s in state if isinstance(s, dict)]
            for part in reversed(parts):  # slots (the second) win, as in ``copyreg``
                if key in part:
                    return part[key]
            return default
        return state.get(key, default) if isinstance(state, dict) else default

    def __repr__(self) -> str:
        return f"<{self.qualname}{brief(self.args)}>"


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
        self._costs: dict[int, tuple[Any, int, int]] = {}  # id -> (key node, nodes, depth)

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
            raise ValueError(f"unexpected persistent id {brief(pid)}")
        _, tag, key, _location, numel = pid
        if not (isinstance(tag, Tag) and tag.torch_name.endswith("Storage")):
            raise ValueError("persistent id without a storage type")
        if not (isinstance(key, str) and key and "/" not in key and type(numel) is int):
            raise ValueError(f"malformed storage id {brief(pid)}")
        return Storage(key, tag, numel)

    def load_reduce(self) -> None:
        func, args = self.stack[-2], self.stack[-1]
        if not any(func is f for f in self.calls):
            raise self._refuse(f"to call {brief(func)}")
        if func is dict and isinstance(args, tuple):  # OrderedDict(pairs) hashes the keys
            for pairs in args:
                for pair in pairs if isinstance(pairs, (list, tuple)) else ():
                    self._check_key(pair[0] if isinstance(pair, (tuple, list)) and pair else pair)
        super().load_reduce()

    def _check_key(self, key: Any) -> None:
        """Refuse a dict key or set member whose hash would take unbounded work."""
        if not isinstance(key, (tuple, frozenset)):
            return
        nodes, depth = self._key_cost(key)
        if nodes > MAX_KEY_NODES or depth > MAX_KEY_DEPTH:
            raise self._refuse(f"a dict key or set member too costly to hash (over "
                               f"{MAX_KEY_NODES} items or {MAX_KEY_DEPTH} levels)")  # fmt: skip

    def _key_cost(self, key: tuple | frozenset) -> tuple[int, int]:
        """(expanded node count, depth) of a key, each shared node computed once."""
        costs = self._costs
        todo = [(key, False)]
        while todo:
            node, ready = todo.pop()
            if id(node) in costs:
                continue
            kids = [k for k in node if isinstance(k, (tuple, frozenset))]
            if not ready:
                todo.append((node, True))
                todo += [(k, False) for k in kids if id(k) not in costs]
                continue
            n = 1 + len(node) - len(kids) + sum(costs[id(k)][1] for k in kids)
            d = 1 + max((costs[id(k)][2] for k in kids), default=0)
            costs[id(node)] = (node, min(n, 1 << 62), d)  # the node is kept: ids stay unique
        return costs[id(key)][1], costs[id(key)][2]

    # every opcode that hashes what the pickle built: check the keys first (after a MARK,
    # ``self.stack`` holds exactly the marked items)
    def load_setitem(self) -> None:
        self._check_key(self.stack[-2])
        super().load_setitem()

    def load_setitems(self) -> None:
        for key in self.stack[0::2]:
            self._check_key(key)
        super().load_setitems()

    def load_dict(self) -> None:
        for key in self.stack[0::2]:
            self._check_key(key)
        super().load_dict()

    def load_additems(self) -> None:
        for item in self.stack:
            self._check_key(item)
        super().load_additems()

    def load_frozenset(self) -> None:
        for item in self.stack:
            self._check_key(item)
        super().load_frozenset()

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
    dispatch[pickle.SETITEM[0]] = load_setitem
    dispatch[pickle.SETITEMS[0]] = load_setitems
    dispatch[pickle.DICT[0]] = load_dict
    dispatch[pickle.ADDITEMS[0]] = load_additems
    dispatch[pickle.FROZENSET[0]] = load_frozenset
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
        detail = str(exc)[:200]  # messages from pickle itself are short; ours use ``brief``
        raise FormatError(f"{label}: bad pickle ({type(exc).__name__}: {detail})") from None
