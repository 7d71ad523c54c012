"""Structure-aware fuzzing of ``merge --join``'s part records: records written by real
``--part`` runs, mutated field by field (types, values, nesting, shard names, duplicate keys,
broken bytes), then read and checked in-process the way the join does. Every mutant is
refused with a ``LoraError`` or is, in every field the join relies on, the record it came
from; never another exception. Bounded: a fixed number of derandomized examples.
"""

from __future__ import annotations

import json
import shutil
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rel_helpers import build_inputs

from lora_cli.errors import LoraError
from lora_cli.io.destination import PARTS_SUFFIX
from lora_cli.merge import parts as parts_mod
from lora_cli.merge.part_record import parse_record

FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
SHARDS = "6KB"


@pytest.fixture(scope="module")
def joined(tmp_path_factory) -> dict[str, Any]:
    """Two real parts, and the plan and fingerprint a real join computes for them."""
    import lora_cli.stages.merge as stage
    from lora_cli.stages.merge import merge

    root = tmp_path_factory.mktemp("fuzz-parts")
    base, adapter = build_inputs(root / "in")
    out = root / "merged"
    for i in (1, 2):
        merge(base, adapter, out, max_shard_size=SHARDS, device="cpu", part=f"{i}/2")
    seen: dict[str, Any] = {}
    real_join = stage.run_join

    def capture(plan, output, options, **kwargs):
        seen["plan"], seen["fp"] = plan, parts_mod.fingerprint(plan, options)
        return real_join(plan, output, options, **kwargs)

    stage.run_join = capture
    try:
        work = root / "work" / f"merged{PARTS_SUFFIX}"
        shutil.copytree(out.parent / f"merged{PARTS_SUFFIX}", work)
        merge(
            base, adapter, root / "work" / "merged", max_shard_size=SHARDS, device="cpu", join=True
        )  # fmt: skip  (proves the pristine parts join)
    finally:
        stage.run_join = real_join
    shutil.copytree(out.parent / f"merged{PARTS_SUFFIX}", work)
    record = work / "part-1-of-2" / "part.json"
    return {**seen, "folder": work, "record": record, "pristine": record.read_bytes()}


def _join_checks(env: dict[str, Any], data: bytes) -> None:
    """What --join does with part records before publishing, in-process."""
    env["record"].write_bytes(data)
    split, records = parts_mod.collect_parts(env["folder"], env["fp"])
    sources = parts_mod._check_shards(env["folder"], env["plan"], split.count, records)
    digests = {n: r.sha256 for rec in records.values() for n, r in rec.shards.items()}
    labels = dict.fromkeys(digests, "?")
    parts_mod.verify_digests(sources, sources, digests, labels)


# -- mutations of the decoded record ------------------------------------------------------------
json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=80)
    | st.sampled_from(["0" * 64, "a" * 64 + "\n", "A" * 64, "../x", "x/y", ".", "..", "\x1b[31m"])
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                   max_size=4),
    max_leaves=12,
)  # fmt: skip
names = st.text(max_size=40) | st.sampled_from(
    ["..", ".", "a/b", "x\nerror: forged", "\x00", "model.safetensors", " " * 300, "é" * 3]
)


def _paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    found = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            found += _paths(v, (*prefix, k))
    return found


def _get(doc: Any, path: tuple) -> Any:
    for key in path:
        doc = doc[key]
    return doc


@st.composite
def mutants(draw, pristine: dict) -> bytes:
    doc = json.loads(json.dumps(pristine))
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(doc)
        path = draw(st.sampled_from(paths))
        op = draw(st.sampled_from(["replace", "delete", "add", "rename", "nest", "number"]))
        if not path:
            if op == "nest":
                doc = [doc] if draw(st.booleans()) else {"wrapped": doc}
            continue
        parent, key = _get(doc, path[:-1]), path[-1]
        if not isinstance(parent, dict):
            continue
        if op == "replace":
            parent[key] = draw(json_value)
        elif op == "delete":
            del parent[key]
        elif op == "add":
            parent[draw(names)] = draw(json_value)
        elif op == "rename":
            parent[draw(names)] = parent.pop(key)
        elif op == "nest":
            parent[key] = [parent[key]] if draw(st.booleans()) else {"x": parent[key]}
        elif isinstance(parent[key], int):
            parent[key] = parent[key] + draw(st.sampled_from([-1, 1, 2**31, -(2**63), 2**64]))
    text = json.dumps(doc, allow_nan=True)
    how = draw(st.sampled_from(["plain", "plain", "duplicate", "nan", "deep", "bytes"]))
    if how == "duplicate" and text.endswith("}"):
        text = text[:-1] + ', "part": 1}'
    elif how == "nan":
        text = text.replace('"part": 1', '"part": NaN', 1)
    elif how == "deep":
        depth = draw(st.sampled_from([50, 5_000, 200_000]))
        text = text[:-1] + ', "deep": ' + "[" * depth + "]" * depth + "}"
    data = text.encode()
    if how == "bytes":
        cut = draw(st.integers(0, len(data)))
        data = data[:cut] + draw(st.binary(max_size=4)) + data[cut:]
    return data


@FUZZ
@given(data=st.data())
def test_mutated_part_records_are_refused_or_equal(joined, data) -> None:
    pristine = joined["pristine"]
    original = parse_record(pristine, joined["record"], "")
    mutant = data.draw(mutants(json.loads(pristine)))
    try:
        _join_checks(joined, mutant)
    except LoraError as exc:
        assert "\n" not in exc.message and "\x1b" not in exc.message, exc.message
    else:  # accepted: then it says what the pristine record says
        assert parse_record(mutant, joined["record"], "") == original
    finally:
        joined["record"].write_bytes(pristine)
