"""Structure-aware fuzzing of the GGUF LoRA reader: a real file from llama.cpp's own
converter is parsed into records (``gguf_records``), one or more KV records or tensor
infos are rewritten (counts, value types, strings, shapes, ggml types, offsets) or the file
is cut, and the result is re-serialized and loaded the way every subcommand loads it.
Whatever the mutation, the reader either gives an adapter whose tensors read back, or
raises a ``LoraError`` (one line, exit 2) — never another exception."""

from __future__ import annotations

import contextlib
import signal
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import peft_adapter
from eco_helpers import llama_base, llama_cpp_convert_lora, llama_cpp_scripts  # noqa: F401
from gguf_records import Kv, Tensor, parse, serialize
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_cli.errors import LoraError

pytest.importorskip("gguf")
EXAMPLES = 200  # ~0.01 s each on a loaded machine: the examples take a few seconds
# Each example runs in this process: one that loops (gguf's reader on a 2⁶³-entry array
# did) must fail the test, not hang the suite. Generous for a loaded machine.
EXAMPLE_SECONDS = 20.0


class _Overran(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: float):
    def overran(signum, frame):
        raise _Overran(f"one example ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, overran)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


U64 = st.one_of(st.integers(0, 8), st.sampled_from([2**31, 2**32 - 1, 2**40, 2**63, 2**64 - 1]))


@pytest.fixture(scope="module")
def gguf_bytes(llama_base, llama_cpp_scripts, tmp_path_factory) -> bytes:  # noqa: F811
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("fuzz-gguf")
    model = AutoModelForCausalLM.from_pretrained(llama_base, dtype=torch.bfloat16)
    peft_adapter(model, root / "peft", target_modules=["q_proj", "v_proj", "embed_tokens"])
    out = llama_cpp_convert_lora(llama_cpp_scripts, root / "peft", llama_base, root / "a.gguf")
    return out.read_bytes()


VALUES = {
    0: st.integers(0, 255),
    4: st.integers(0, 2**32 - 1),
    5: st.integers(-(2**31), 2**31 - 1),
    6: st.floats(width=32, allow_nan=True, allow_infinity=True),
    7: st.booleans(),
    8: st.text(max_size=8),
    10: U64,
}


@st.composite
def kv_mutation(draw, kvs: list[Kv]) -> list[Kv]:
    kvs = list(kvs)
    i = draw(st.integers(0, len(kvs) - 1))
    vtype = draw(st.sampled_from(sorted(VALUES)))
    action = draw(st.sampled_from(["retype", "drop", "array"]))
    if action == "drop":
        del kvs[i]
    elif action == "array":
        kvs[i] = Kv(kvs[i].key, 9, (draw(st.sampled_from([4, 8, 9, 13])), draw(U64)))
    else:
        kvs[i] = Kv(kvs[i].key, vtype, draw(VALUES[vtype]))
    return kvs


@st.composite
def tensor_mutation(draw, tensors: list[Tensor]) -> list[Tensor]:
    tensors = list(tensors)
    i = draw(st.integers(0, len(tensors) - 1))
    t = tensors[i]
    action = draw(st.sampled_from(["dims", "type", "offset", "name", "drop", "dup"]))
    if action == "dims":
        t = Tensor(t.name, draw(st.lists(U64, min_size=0, max_size=6)), t.type, t.offset)
    elif action == "type":
        t = Tensor(t.name, t.dims, draw(st.sampled_from([0, 1, 2, 8, 30, 39, 99])), t.offset)
    elif action == "offset":
        t = Tensor(t.name, t.dims, t.type, draw(U64))
    elif action == "name":
        name = draw(
            st.sampled_from(["blk.x.attn_q.weight.lora_a", "blk.99999999.attn_q.weight.lora_b",
                             "blk..lora_a", "token_embd.weight.lora_b", "", "blk.0.attn_q"])
        )  # fmt: skip
        t = Tensor(name, t.dims, t.type, t.offset)
    elif action == "drop":
        del tensors[i]
        return tensors
    else:
        tensors.append(t)
        return tensors
    tensors[i] = t
    return tensors


def _load_everything(path: Path) -> None:
    from lora_cli.adapters.formats import load_adapter

    adapter = load_adapter(path)
    try:
        for key in adapter.source.names():
            adapter.source.read(key)
    finally:
        adapter.close()


@settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_mutated_gguf_never_crashes(gguf_bytes, data) -> None:
    records = parse(gguf_bytes)
    for _ in range(data.draw(st.integers(1, 3))):
        what = data.draw(st.sampled_from(["kv", "tensor", "counts", "version"]))
        if what == "kv":
            records.kvs = data.draw(kv_mutation(records.kvs))
        elif what == "tensor":
            records.tensors = data.draw(tensor_mutation(records.tensors))
        elif what == "counts":
            records.tensor_count = data.draw(U64)
            records.kv_count = data.draw(U64)
        else:
            records.version = data.draw(st.integers(0, 4))
    blob = serialize(records)
    if data.draw(st.booleans()):
        blob = blob[: data.draw(st.integers(0, len(blob)))]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.gguf"
        path.write_bytes(blob)
        try:
            with _time_limit(EXAMPLE_SECONDS):
                _load_everything(path)
        except LoraError as exc:
            assert "\n" not in str(exc)
