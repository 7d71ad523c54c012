"""The per-format allowlists: each format's inert records load only under its profile;
code-running globals and object construction stay refused under every profile."""

from __future__ import annotations

import pickle

import pytest
from rel_helpers import op_call, op_global, op_str

from lora_cli.errors import UnsafePickleError
from lora_cli.io.safe_pickle import Inert, safe_loads

PROTO2 = b"\x80\x02"


def test_deepspeed_records_are_inert_and_keep_their_state():
    zero_stage = op_call(op_global("deepspeed.runtime.zero.config", "ZeroStageEnum"), b"K\x03")
    # fragment_address: NEWOBJ(cls, ()) then BUILD {numel, start}
    state = b"}(" + op_str("numel") + b"K\x05" + op_str("start") + b"K\x07" + b"u"
    fragment = op_global("deepspeed.utils.tensor_fragment", "fragment_address") + b")\x81"
    fragment += state + b"b"
    data = PROTO2 + b"}(" + op_str("stage") + zero_stage + op_str("frag") + fragment + b"u."
    tree = safe_loads(data, "optim", "deepspeed")
    assert isinstance(tree["stage"], Inert) and tree["stage"].args == (3,)
    assert tree["frag"].get("numel") == 5 and tree["frag"].get("start") == 7


def test_format_records_are_refused_outside_their_profile():
    data = PROTO2 + op_call(op_global("deepspeed.runtime.zero.config", "ZeroStageEnum"), b"K\x03")
    with pytest.raises(UnsafePickleError, match="ZeroStageEnum"):
        safe_loads(data + b".", "x.bin", "state_dict")
    with pytest.raises(UnsafePickleError, match="ZeroStageEnum"):
        safe_loads(data + b".", ".metadata", "dcp")


@pytest.mark.parametrize("profile", ["state_dict", "deepspeed", "dcp"])
@pytest.mark.parametrize(
    "payload",
    [
        op_call(op_global("os", "system"), op_str("true")),
        op_call(op_global("__builtin__", "getattr"), op_str("x"), op_str("y")),
        op_global("builtins", "dict") + b")\x81",  # NEWOBJ on a real class
    ],
    ids=["os.system", "__builtin__.getattr", "newobj"],
)
def test_code_and_construction_stay_refused(profile, payload):
    with pytest.raises(UnsafePickleError):
        safe_loads(PROTO2 + payload + b".", "f", profile)


def test_protocol2_builtins_are_mapped_before_the_check():
    """`__builtin__.getattr` must not slip through under its protocol-2 spelling."""
    data = pickle.dumps(getattr, protocol=2)
    assert b"__builtin__" in data
    with pytest.raises(UnsafePickleError, match="__builtin__.getattr"):
        safe_loads(data, "f", "deepspeed")


# -- the allowlists, pinned: adding a global (say ``shutil.rmtree``) must fail a test ---------
STATE_DICT_GLOBALS = {
    ("collections", "OrderedDict"),
    ("torch", "Size"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
}
PINNED_PROFILES = {
    "state_dict": STATE_DICT_GLOBALS,
    "deepspeed": STATE_DICT_GLOBALS | {
        ("torch._tensor", "_rebuild_from_type_v2"),
        ("torch", "Tensor"),
        ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
        ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
        ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
        ("deepspeed.utils.tensor_fragment", "fragment_address"),
    },
    "dcp": STATE_DICT_GLOBALS | {
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
    },
}  # fmt: skip
# Storage classes and dtypes: inert tags under every profile (never callables).
PINNED_STORAGES = {
    "FloatStorage", "HalfStorage", "BFloat16Storage", "DoubleStorage", "LongStorage",
    "IntStorage", "ShortStorage", "CharStorage", "ByteStorage", "BoolStorage",
    "ComplexFloatStorage", "ComplexDoubleStorage", "UntypedStorage",
}  # fmt: skip
PINNED_DTYPES = {
    "bfloat16", "bool", "complex64", "float16", "float32", "float64", "float8_e4m3fn",
    "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu", "int16", "int32",
    "int64", "int8", "uint16", "uint32", "uint64", "uint8",
    "complex128", "complex32", "float4_e2m1fn_x2", "quint8", "qint8", "qint32",
}  # fmt: skip


@pytest.mark.parametrize("profile", sorted(PINNED_PROFILES))
def test_each_profile_allows_exactly_its_globals(profile):
    from lora_cli.io.safe_pickle import PROFILES, SafeUnpickler, Tag

    assert set(PROFILES) == set(PINNED_PROFILES)
    assert set(PROFILES[profile]) == PINNED_PROFILES[profile]
    # the tags find_class makes up beyond the table, probed by name
    unpickler = SafeUnpickler(b"", "probe", profile)
    unpickler.proto = 2
    modules = ("torch", "torch.storage", "torch.cuda", "torch._utils", "builtins", "shutil")
    names = PINNED_STORAGES | PINNED_DTYPES | {"rmtree", "eval", "load", "Tensor", "device",
                                               "FloatTensor", "float128", "Storage"}  # fmt: skip
    allowed_tags = set()
    for module in modules:
        for name in names:
            try:
                found = unpickler.find_class(module, name)
            except UnsafePickleError:
                continue
            if isinstance(found, Tag):
                allowed_tags.add((module, name))
            else:
                assert (module, name) in PINNED_PROFILES[profile]
    storages = {(m, n) for m in ("torch", "torch.storage", "torch.cuda") for n in PINNED_STORAGES}
    assert allowed_tags == storages | {("torch", n) for n in PINNED_DTYPES}
