"""Hostile destinations and hostile parts: every path a run writes, renames or deletes is
checked against every input before any work, and ``merge --join`` publishes only bytes its
parts hashed, from records checked field by field.

Each case runs the real command line through ``hostile_harness.assert_refused``: exit 2, one
``error:`` line naming the file, no traceback, inputs (the base above all) unchanged by hash,
nothing at the destination.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hostile_harness import assert_refused, digest
from rel_helpers import build_inputs

from lora_cli.io.destination import PARTS_SUFFIX

SHARDS = ("--max-shard-size", "6KB")  # three parts of a few shards each


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    import lora_cli.cli
    import lora_cli.stages.convert
    import lora_cli.stages.merge  # noqa: F401  (imported once here, inherited by every fork)

    return build_inputs(tmp_path_factory.mktemp("valid"))


@pytest.fixture
def inputs(valid, tmp_path) -> tuple[Path, Path]:
    """A fresh copy in ``tmp_path/in``: cases rename and link it freely."""
    base = Path(shutil.copytree(valid[0], tmp_path / "in" / "base"))
    adapter = Path(shutil.copytree(valid[1], tmp_path / "in" / "adapter"))
    return base, adapter


def _no_temporaries(dest: Path) -> None:
    assert not [p for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}.lora-tmp-")]


# -- A: destinations ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["--part", "--join"])
@pytest.mark.parametrize("where", ["is", "inside"])
def test_a_base_in_the_parts_folder_is_refused(inputs, tmp_path, mode: str, where: str) -> None:
    """The reported loss: a base named OUT.lora-parts got part-1-of-1/ written into it, and
    --join then deleted the whole folder."""
    base, adapter = inputs
    parts = tmp_path / f"merged{PARTS_SUFFIX}"
    if where == "is":
        base = Path(shutil.move(base, parts))
    else:
        parts.mkdir()
        base = Path(shutil.move(base, parts / "base"))
    argv = ["merge", base, adapter, "-o", tmp_path / "merged", "-q", *SHARDS]
    argv += ["--part", "1/1"] if mode == "--part" else ["--join"]
    assert_refused(argv, [parts, adapter], names=["parts folder", str(parts)])
    assert not (tmp_path / "merged").exists()
    assert not list(parts.rglob("part-1-of-1"))


@pytest.mark.parametrize("mode", ["--part", "--join"])
def test_a_parts_folder_linked_into_an_input_is_refused(inputs, tmp_path, mode: str) -> None:
    base, adapter = inputs
    parts = tmp_path / f"merged{PARTS_SUFFIX}"
    parts.symlink_to(base)
    argv = ["merge", base, adapter, "-o", tmp_path / "merged", "-q", *SHARDS]
    argv += ["--part", "1/1"] if mode == "--part" else ["--join"]
    assert_refused(argv, [base, adapter], names=["parts folder", "links to"])
    assert parts.is_symlink() and not (tmp_path / "merged").exists()


def test_a_base_named_like_a_stale_temporary_is_not_deleted(inputs, tmp_path) -> None:
    """``.OUT.lora-tmp-PID`` of a dead process is what the next run deletes as a leftover."""
    base, adapter = inputs
    stale = Path(shutil.move(base, tmp_path / ".merged.lora-tmp-4000000"))
    dest = tmp_path / "merged"
    assert_refused(["merge", stale, adapter, "-o", dest], [stale, adapter],
                   names=["temporary", str(stale)])  # fmt: skip
    assert stale.is_dir() and not dest.exists()


def test_a_symlinked_shard_into_the_output_is_refused(inputs, tmp_path) -> None:
    """--overwrite of OUT would delete a file the base reads through a symlink."""
    base, adapter = inputs
    old = tmp_path / "merged"
    old.mkdir()
    shard = base / "model-00002-of-00002.safetensors"
    shutil.move(shard, old / shard.name)
    shard.symlink_to(old / shard.name)
    argv = ["merge", base, adapter, "-o", old, "--overwrite"]
    outcome = assert_refused(argv, [base, adapter, old], names=["contains the input"])
    assert str(old) in outcome.error_lines[0]
    _no_temporaries(old)


def test_an_output_reached_through_a_symlinked_parent_is_refused(inputs, tmp_path) -> None:
    base, adapter = inputs
    (tmp_path / "alias").symlink_to(base.parent)
    argv = ["merge", base, adapter, "-o", tmp_path / "alias" / "base", "--overwrite"]
    assert_refused(argv, [base, adapter], names=["contains the input"])


@pytest.mark.parametrize(
    ("cmd", "target"),
    [("merge", "nowhere"), ("merge", "input-folder"), ("merge", "input-file"),
     ("merge", "elsewhere"), ("convert", "nowhere")],
)  # fmt: skip
def test_output_naming_a_symlink_is_refused_up_front(inputs, tmp_path, cmd, target) -> None:
    """A dangling link used to run the whole merge, then fail with a traceback at the rename."""
    base, adapter = inputs
    (tmp_path / "elsewhere").mkdir()
    link = tmp_path / "out"
    targets = {"nowhere": tmp_path / "missing", "input-folder": base,
               "input-file": base / "config.json", "elsewhere": tmp_path / "elsewhere"}  # fmt: skip
    link.symlink_to(targets[target])
    argv = ["merge", base, adapter] if cmd == "merge" else ["convert", base]
    assert_refused([*argv, "-o", link, "--overwrite"], [base, adapter, tmp_path / "elsewhere"],
                   names=[str(link), "symbolic link"], seconds=30)  # fmt: skip
    assert link.is_symlink()
    _no_temporaries(link)


@pytest.mark.parametrize("overwrite", [False, True])
def test_output_naming_an_existing_file_is_refused(inputs, tmp_path, overwrite: bool) -> None:
    base, adapter = inputs
    plain = tmp_path / "notes.txt"
    plain.write_text("not a model\n")
    argv = ["merge", base, adapter, "-o", plain] + (["--overwrite"] if overwrite else [])
    names = ["is a file"] if overwrite else ["already exists"]
    assert_refused(argv, [base, adapter, plain], names=[str(plain), *names])
    _no_temporaries(plain)


def test_convert_output_inside_the_input_through_a_symlink(inputs, tmp_path) -> None:
    base, _ = inputs
    (tmp_path / "link").symlink_to(base)
    assert_refused(["convert", base, "-o", tmp_path / "link" / "sub"], [base],
                   names=["inside the input"])  # fmt: skip
    assert not (base / "sub").exists()


# -- B: --join trusts nothing it reads ------------------------------------------------------------
@pytest.fixture(scope="module")
def parted(valid, tmp_path_factory) -> Path:
    """Three pristine parts written by real --part runs (in-process)."""
    from lora_cli.stages.merge import merge

    out = tmp_path_factory.mktemp("parted") / "merged"
    for i in (1, 2, 3):
        merge(*valid, out, max_shard_size=SHARDS[1], device="cpu", part=f"{i}/3")
    return out.parent / f"merged{PARTS_SUFFIX}"


@pytest.fixture
def joinable(valid, parted, tmp_path) -> tuple[list[object], Path, Path]:
    parts = Path(shutil.copytree(parted, tmp_path / f"merged{PARTS_SUFFIX}"))
    out = tmp_path / "merged"
    return ["merge", *valid, "-o", out, "-q", *SHARDS, "--join"], out, parts


def _refused_join(valid, joinable, names: list[str]) -> None:
    argv, out, parts = joinable
    assert_refused(argv, [*valid, parts], names=names)
    assert not out.exists()
    _no_temporaries(out)


def test_join_refuses_a_flipped_data_byte(valid, joinable) -> None:
    """Same size, header intact: only a re-hash sees it (the manifest would then fail
    ``sha256sum -c`` in the user's hands)."""
    _, _, parts = joinable
    shard = sorted((parts / "part-3-of-3").glob("*.safetensors"))[-1]
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0x01
    shard.write_bytes(bytes(raw))
    _refused_join(valid, joinable, [str(shard), "part 3/3", "sha256"])


def test_join_refuses_a_shard_replaced_by_a_symlink(valid, joinable, tmp_path) -> None:
    _, _, parts = joinable
    shard = sorted((parts / "part-2-of-3").glob("*.safetensors"))[0]
    shutil.move(shard, tmp_path / "moved.safetensors")
    shard.symlink_to(tmp_path / "moved.safetensors")
    _refused_join(valid, joinable, [str(shard)])


def test_join_refuses_a_part_folder_that_is_a_symlink(valid, joinable, tmp_path) -> None:
    _, _, parts = joinable
    moved = Path(shutil.move(parts / "part-2-of-3", tmp_path / "elsewhere"))
    (parts / "part-2-of-3").symlink_to(moved)
    _refused_join(valid, joinable, [str(parts / "part-2-of-3"), "symbolic link"])


def _edit_record(parts: Path, index: int, edit) -> Path:
    path = parts / f"part-{index}-of-3" / "part.json"
    doc = json.loads(path.read_text())
    text = edit(doc)
    path.write_text(text if isinstance(text, str) else json.dumps(doc))
    return path


def _first_shard(doc: dict) -> dict:
    return next(iter(doc["shards"].values()))


RECORD_CASES = {
    "sha256-zeros": (lambda d: _first_shard(d).update(sha256="0" * 64), "all zeros"),
    "sha256-newline": (
        lambda d: _first_shard(d).update(sha256=_first_shard(d)["sha256"][:63] + "\n"),
        "64 lowercase hex",
    ),
    "sha256-injects-a-line": (
        lambda d: _first_shard(d).update(sha256=_first_shard(d)["sha256"] + "\n" + "a" * 64),
        "64 lowercase hex",
    ),
    "bytes-a-string": (lambda d: _first_shard(d).update(bytes="12"), "not an integer"),
    "bytes-a-boolean": (lambda d: _first_shard(d).update(bytes=True), "not an integer"),
    "shards-a-list": (lambda d: d.update(shards=[]), "shards is a list"),
    "name-with-slash": (
        lambda d: d.update(shards={"../../base/x.safetensors": _first_shard(d)}),
        "not a plain file name",
    ),
    "name-with-newline": (
        lambda d: d.update(shards={"x\nerror: forged": _first_shard(d)}),
        "not a plain file name",
    ),
    "fingerprint-not-hex": (lambda d: d["fingerprint"].update(base="zz"), "fingerprint.base"),
    "version-with-escape": (
        lambda d: d["fingerprint"].update(lora_version="1\x1b[31m"),
        "lora_version",
    ),
    "deep-nesting": (lambda d: '{"schema": ' + "[" * 100_000 + "]" * 100_000 + "}", "deeply"),
    "duplicate-key": (lambda d: json.dumps(d)[:-1] + ', "part": 1}', "duplicate key"),
    "nan": (lambda d: json.dumps(d).replace('"part": 1', '"part": NaN'), "not valid JSON"),
    "not-utf8": (None, "not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(RECORD_CASES))
def test_join_refuses_a_malformed_record(valid, joinable, case: str) -> None:
    edit, what = RECORD_CASES[case]
    _, _, parts = joinable
    path = parts / "part-1-of-3" / "part.json"
    if case == "not-utf8":
        path.write_bytes(b'{"schema": "\xff"}')
    else:
        _edit_record(parts, 1, edit)
    _refused_join(valid, joinable, [str(path), what])


def test_join_refuses_an_oversized_record(valid, joinable) -> None:
    _, _, parts = joinable
    path = parts / "part-1-of-3" / "part.json"
    path.write_bytes(b" " * (4 << 20) + b"{}")
    _refused_join(valid, joinable, [str(path), "larger than"])


def test_a_refused_join_keeps_every_part(valid, joinable) -> None:
    """Parts are only removed after the output is published."""
    _, _, parts = joinable
    before = digest([parts])
    _edit_record(parts, 3, lambda d: _first_shard(d).update(sha256="0" * 64))
    _refused_join(valid, joinable, ["part-3-of-3"])
    after = digest([parts])
    assert sorted(after) == sorted(before)
