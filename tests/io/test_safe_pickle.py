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
