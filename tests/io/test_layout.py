"""Shard sizes, shard plans, the index, side files and the checksum manifest."""

from __future__ import annotations

import json
import subprocess

import pytest

from lora_cli.errors import FormatError, UsageError
from lora_cli.io.layout import (
    MANIFEST_NAME,
    ShardPlan,
    copy_side_files,
    parse_size,
    plan_shards,
    read_json,
    read_manifest,
    side_files,
    write_index,
    write_manifest,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("500MB", 500 * 10**6),
        ("5GB", 5 * 10**9),
        ("2GiB", 2 * 2**30),
        ("10KiB", 10 * 2**10),
        ("10KB", 10**4),
        ("3MiB", 3 * 2**20),
        ("1TB", 10**12),
        ("1.5GB", 1_500_000_000),
        ("5gb", 5 * 10**9 // 8),  # transformers: a lowercase b is bits
        ("5Gb", 5 * 10**9 // 8),
        ("2gib", 2 * 2**30),
        (" 20 MB ", 20 * 10**6),
        ("1234", 1234),
        ("1234B", 1234),
        ("5G", 5 * 10**9),
        (1000, 1000),
    ],
)
def test_parse_size_like_transformers(text, expected):
    assert parse_size(text) == expected


def test_parse_size_agrees_with_transformers():
    from transformers.utils.hub import convert_file_size_to_int

    for text in ("500MB", "5GB", "2GiB", "10KiB", "10KB", "3MiB", 4096):
        assert parse_size(text) == convert_file_size_to_int(text), text


@pytest.mark.parametrize(
    "junk", ["", "GB", "five GB", "5XB", "5 GIGA", "-5GB", "0", "0GB", "0.1B", "5GBB", 0, -3, None]
)
def test_parse_size_refuses_junk(junk):
    with pytest.raises(UsageError):
        parse_size(junk)


def _spec(name: str, nbytes: int) -> tuple[str, str, tuple[int, ...]]:
    return (name, "U8", (nbytes,))


def test_one_shard_has_no_index_and_a_plain_name():
    shards = plan_shards([_spec("a", 10), _spec("b", 10)], 100)
    assert [s.filename for s in shards] == ["model.safetensors"]
    assert [n for n, _, _ in shards[0].specs] == ["a", "b"]


def test_empty_input_gives_one_empty_shard():
    shards = plan_shards([], 100)
    assert [s.filename for s in shards] == ["model.safetensors"] and shards[0].specs == []


def test_greedy_split_in_given_order_with_an_oversized_tensor():
    specs = [_spec("a", 40), _spec("b", 50), _spec("c", 20), _spec("huge", 500), _spec("d", 10)]
    shards = plan_shards(specs, 100)
    assert [[n for n, _, _ in s.specs] for s in shards] == [["a", "b"], ["c"], ["huge"], ["d"]]
    assert [s.filename for s in shards] == [
        f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)
    ]
    assert [s.nbytes for s in shards] == [90, 20, 500, 10]
    assert all(s.metadata == {"format": "pt"} for s in shards)


def test_a_tensor_exactly_at_the_limit_fits():
    shards = plan_shards([_spec("a", 60), _spec("b", 40), _spec("c", 1)], 100)
    assert [[n for n, _, _ in s.specs] for s in shards] == [["a", "b"], ["c"]]


def test_shard_stem():
    shards = plan_shards([_spec("a", 60), _spec("b", 60)], 100, stem="adapter_model")
    assert shards[0].filename == "adapter_model-00001-of-00002.safetensors"


def test_shard_bytes_use_dtype_sizes():
    shards = plan_shards([("a", "BF16", (10, 3)), ("b", "F32", (4,)), ("c", "F4", (4,))], 10**6)
    assert shards[0].nbytes == 60 + 16 + 2


def test_index_total_size_is_bytes_not_a_tensor_count(tmp_path):
    shards = plan_shards([("a", "F32", (10, 10)), ("b", "BF16", (100,)), ("c", "I64", (3,))], 300)
    assert len(shards) == 2
    path = write_index(tmp_path, shards)
    doc = json.loads(path.read_text())
    assert path.name == "model.safetensors.index.json"
    assert doc["metadata"]["total_size"] == 400 + 200 + 24
    assert doc["weight_map"] == {
        "a": "model-00001-of-00002.safetensors",
        "b": "model-00002-of-00002.safetensors",
        "c": "model-00002-of-00002.safetensors",
    }


def test_no_index_for_a_single_shard(tmp_path):
    assert write_index(tmp_path, [ShardPlan("model.safetensors", [_spec("a", 1)])]) is None
    assert list(tmp_path.iterdir()) == []


def _model_folder(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    keep = [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "tokenizer.model",
        "chat_template.jinja",
        "README.md",
    ]
    junk = [
        "model.safetensors",
        "model-00001-of-00002.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
        "training_args.bin",
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pth",
        "trainer_state.json",
        "tf_model.h5",
        "flax_model.msgpack",
        "model.gguf",
        ".gitattributes",
        MANIFEST_NAME,
    ]
    for name in keep + junk:
        (folder / name).write_text(name)
    (folder / "checkpoint-500").mkdir()
    (folder / "checkpoint-500" / "config.json").write_text("{}")
    return folder, keep


def test_side_files_skip_weights_and_trainer_junk(tmp_path):
    folder, keep = _model_folder(tmp_path)
    assert sorted(p.name for p in side_files(folder)) == sorted(keep)


def test_copy_side_files_copies_content_and_honours_skip(tmp_path):
    folder, keep = _model_folder(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    copied = copy_side_files(folder, out, skip={"config.json"})
    assert sorted(copied) == sorted(set(keep) - {"config.json"})
    assert sorted(p.name for p in out.iterdir()) == sorted(copied)
    assert (out / "tokenizer.json").read_text() == "tokenizer.json"


def test_side_files_follow_links_inside_the_folder_or_the_hf_cache_only(tmp_path):
    # Hugging Face cache layout: snapshots/<rev>/<file> -> ../../blobs/<hash>
    repo = tmp_path / "models--org--name"
    blobs, snap = repo / "blobs", repo / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    (blobs / "h1").write_text("{}")
    (blobs / "h2").write_text("tok")
    (snap / "config.json").symlink_to("../../blobs/h1")
    (snap / "tokenizer.json").symlink_to("../../blobs/h2")
    (snap / "local.txt").write_text("x")
    (snap / "alias.txt").symlink_to("local.txt")
    secret = tmp_path / "secret"
    secret.write_text("id_rsa")
    (snap / "stolen.txt").symlink_to(secret)
    (snap / "dangling.txt").symlink_to(tmp_path / "nothing")
    names = sorted(p.name for p in side_files(snap))
    assert names == ["alias.txt", "config.json", "local.txt", "tokenizer.json"]


def test_side_files_of_a_missing_folder():
    from pathlib import Path

    assert side_files(Path("/nonexistent/folder")) == []


def test_manifest_round_trip_and_sha256sum_format(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "b.bin").write_bytes(b"\x00" * 100)
    path = write_manifest(tmp_path)
    entries = read_manifest(tmp_path)
    assert set(entries) == {"a.txt", "b.bin"}
    import hashlib

    assert entries["a.txt"] == hashlib.sha256(b"hello").hexdigest()
    check = subprocess.run(
        ["sha256sum", "-c", path.name], cwd=tmp_path, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_read_manifest_missing_and_malformed(tmp_path):
    assert read_manifest(tmp_path) is None
    (tmp_path / MANIFEST_NAME).write_text("nothex  a.txt\n")
    with pytest.raises(FormatError, match="malformed"):
        read_manifest(tmp_path)


def test_read_json_errors_name_the_file(tmp_path):
    path = tmp_path / "config.json"
    with pytest.raises(FormatError, match="config.json: cannot read"):
        read_json(path, "model config")
    path.write_text("{")
    with pytest.raises(FormatError, match="config.json: model config is not valid JSON"):
        read_json(path, "model config")
    path.write_text("[]")
    with pytest.raises(FormatError, match="must be a JSON object"):
        read_json(path, "model config")
