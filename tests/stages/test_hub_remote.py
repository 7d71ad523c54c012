"""A Hub base planned from its headers, fetched shard by shard, evicted and published, against
the fake Hub of ``tests/fake_hub.py`` (the real huggingface_hub client, no real Hub)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import peft_adapter, save_model, tiny_model
from fake_hub import serve

SHARDS = 4


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny Llama in several shards, an adapter, and the local merge (the reference)."""
    from lora_cli.stages.merge import merge

    root = tmp_path_factory.mktemp("hubremote")
    model = tiny_model("llama")
    base = save_model(model, root / "base", max_shard_size="10KB")
    adapter = root / "adapter"
    peft_adapter(model, adapter, target_modules=["q_proj", "v_proj"])
    merge(base, adapter, root / "local")
    return root, base, adapter


@pytest.fixture
def hub(world, tmp_path, monkeypatch):
    root, base, adapter = world
    # a first range shorter than the headers: each header takes its second request
    monkeypatch.setattr("lora_cli.io.hub_remote.FIRST_RANGE", 255)
    with serve(tmp_path, monkeypatch) as fake:
        fake.add_folder("org/base", base)
        yield fake


def _shards(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.safetensors"))


def _tree(folder: Path) -> dict[str, bytes]:
    """The model's files; the card (README.md) names the base as it was given (a Hub id or a
    folder), so it and its checksum line are left out."""
    files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
    files.pop("README.md")
    sums = files.pop("lora-checksums.sha256").decode().splitlines()
    files["sums"] = "\n".join(line for line in sums if not line.endswith("README.md")).encode()
    return files


def _as_tree(files: dict[str, bytes], where: Path) -> dict[str, bytes]:
    where.mkdir()
    for name, data in files.items():
        (where / name).write_bytes(data)
    return _tree(where)


def test_world_has_shards(world):
    _, base, _ = world
    assert len(_shards(base)) >= SHARDS


def test_dry_run_reads_only_headers(world, hub, run_cli):
    root, base, adapter = world
    code, out, err = run_cli("merge", "org/base", adapter, "--dry-run", "--json")
    assert code == 0, err
    plan = json.loads(out)
    assert plan["shards"] == _shards(base)
    shard_gets = hub.requests("GET", r"^/org/base/resolve/.*\.safetensors$")
    assert len(shard_gets) >= len(_shards(base))
    assert all(r.range and r.range.startswith("bytes=") for r in shard_gets)
    served = hub.downloaded("org/base")
    for name in _shards(base):
        header = int.from_bytes((base / name).read_bytes()[:8], "little")
        assert served[name] == max(256, 8 + header) < (base / name).stat().st_size
    # every request pinned to the commit the repo info named
    commit = hub.repos["org/base"].branches["main"]
    resolves = hub.requests(None, r"^/org/base/resolve/")
    assert resolves and all(f"/resolve/{commit}/" in r.path for r in resolves)


def test_merge_downloads_shards_and_matches_local(world, hub, run_cli, tmp_path):
    root, base, adapter = world
    out = tmp_path / "merged"
    code, text, err = run_cli("merge", "org/base", adapter, "-o", out, "--json")
    assert code == 0, err
    assert _tree(out) == _tree(root / "local")
    served = hub.downloaded("org/base")
    for name in _shards(base):
        assert served[name] >= (base / name).stat().st_size


def _base_shards_of(part_folder: Path, base: Path) -> set[str]:
    """The base shards holding the tensors a part wrote (from the base's own index)."""
    from safetensors import safe_open

    where = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    names = set()
    for shard in part_folder.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            names |= set(f.keys())
    return {where[n] for n in names}


def _full_gets(requests) -> set[str]:
    return {
        r.path.rsplit("/", 1)[1]
        for r in requests
        if r.method == "GET" and r.range is None and r.path.endswith(".safetensors")
    }


def test_part_fetches_only_its_shards(world, hub, run_cli, tmp_path):
    root, base, adapter = world
    out = tmp_path / "merged"
    fetched = set()
    for i in (1, 2):
        before = len(hub.log)
        code, text, err = run_cli("merge", "org/base", adapter, "-o", out, "--part", f"{i}/2")
        assert code == 0, err
        mine = _base_shards_of(tmp_path / "merged.lora-parts" / f"part-{i}-of-2", base)
        assert mine and _full_gets(hub.log[before:]) == mine
        fetched |= mine
    assert fetched == set(_shards(base))
    code, text, err = run_cli("merge", "org/base", adapter, "-o", out, "--join")
    assert code == 0, err
    assert _tree(out) == _tree(root / "local")


def test_push_to_hub_one_commit_equals_local(world, hub, run_cli, tmp_path):
    root, base, adapter = world
    out = tmp_path / "merged"
    code, text, err = run_cli(
        "merge", "org/base", adapter, "-o", out, "--evict", "--push-to-hub", "me/merged", "--json"
    )
    assert code == 0, err
    doc = json.loads(text)
    assert doc["pushed"]["repo"] == "me/merged" and doc["pushed"]["commit_url"]
    assert sorted(doc["fetched"]["evicted"]) == _shards(base)
    repo = hub.repos["me/merged"]
    assert len(repo.commits) == 2  # the empty repo, then one commit with everything
    pushed = _as_tree(hub.files("me/merged"), tmp_path / "pushed")
    assert pushed == _tree(root / "local")
    assert not list(out.glob("*.safetensors"))  # evicted once uploaded
    message = hub.requests("POST", "/commit/")
    assert message
