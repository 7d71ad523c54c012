"""A Hub base planned from its headers, fetched shard by shard, evicted and published, against
the fake Hub of ``tests/fake_hub.py`` (the real huggingface_hub client, no real Hub)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import threading
from pathlib import Path

import pytest
from conftest import peft_adapter, save_model, tiny_model
from fake_hub import serve
from hostile_harness import assert_refused
from hostile_harness import run_cli as run_forked
from hub_helpers import go_offline

SHARDS = 12


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny Llama in several shards, an adapter, and the local merge (the reference)."""
    from lora_cli.stages.merge import merge

    root = tmp_path_factory.mktemp("hubremote")
    model = tiny_model("llama", num_hidden_layers=6)
    base = save_model(model, root / "base", max_shard_size="8KB")
    adapter = root / "adapter"
    peft_adapter(model, adapter, target_modules=["q_proj", "v_proj"])
    merge(base, adapter, root / "local")
    return root, base, adapter


@pytest.fixture
def hub(world, tmp_path, monkeypatch):
    root, base, adapter = world
    # a first range shorter than the headers: each header takes its second request
    monkeypatch.setattr("lora_cli.sources.hub_remote.FIRST_RANGE", 255)
    monkeypatch.setattr("lora_cli.sources.hub_remote.RETRY_BASE_S", 0.01)
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


def test_a_server_ignoring_range_still_plans(world, hub, run_cli):
    root, base, adapter = world
    hub.ignore_range = True
    code, out, err = run_cli("merge", "org/base", adapter, "--dry-run", "--json")
    assert code == 0, err
    assert json.loads(out)["shards"] == _shards(base)


def test_validate_adapter_against_hub_base_reads_only_headers(world, hub, run_cli, tmp_path):
    root, base, adapter = world
    code, out, err = run_cli("validate", adapter, "--base", "org/base", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["valid"] and "adapter-base" in json.dumps(doc)
    assert hub.requests("GET", r"\.safetensors$") and not _full_gets(hub.log)
    other = tmp_path / "other"  # a base the adapter does not fit: found from headers alone
    other.mkdir()
    save_model(tiny_model("llama", hidden_size=48, num_hidden_layers=1), other)
    hub.add_folder("org/other", other)
    code, out, err = run_cli("validate", adapter, "--base", "org/other", "--json")
    assert code == 1 and not json.loads(out)["valid"], err
    assert not _full_gets(hub.log)


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


class DiskWatcher:
    """Bytes on disk under ``root`` (the Hugging Face cache and the outputs; the fake Hub's
    own storage left out), sampled on a thread for as long as the block runs."""

    def __init__(self, root: Path, skip: Path) -> None:
        self.root, self.skip = root, skip
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _size(self) -> int:
        total = 0
        for folder, dirs, files in os.walk(self.root):
            if Path(folder) == self.skip:
                dirs.clear()
                continue
            for name in files:
                with contextlib.suppress(FileNotFoundError):
                    total += os.lstat(os.path.join(folder, name)).st_blocks * 512
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._size())

    def __enter__(self) -> DiskWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self.peak = max(self.peak, self._size())


def _disk(folder: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in folder.rglob("*") if p.is_file())


def test_parts_evict_push_stay_under_a_quota(world, hub, run_cli, tmp_path):
    """Base + output exceed the quota; parts with --evict --push-to-hub hold about one input
    and one output shard at a time; the join commits once; the repo equals a local merge."""
    root, base, adapter = world
    out = tmp_path / "merged"
    quota = (_disk(base) + _disk(root / "local")) // 3
    push = ("--evict", "--push-to-hub", "me/merged", "--json")
    docs = []
    with DiskWatcher(tmp_path, hub.root) as disk:
        for i in (1, 2, 3):
            code, text, err = run_cli(
                "merge", "org/base", adapter, "-o", out, "--part", f"{i}/3", *push
            )
            assert code == 0, err
            docs.append(json.loads(text))
        assert len(hub.repos["me/merged"].commits) == 1  # only the empty repo: parts commit nothing
        before = len(hub.log)
        code, text, err = run_cli("merge", "org/base", adapter, "-o", out, "--join", *push)
        assert code == 0, err
    assert disk.peak < quota, (disk.peak, quota)
    assert not _full_gets(hub.log[before:])  # the join fetched no base shard
    pushed_by_parts = {n for d in docs for n in d["pushed"]["shards"]}
    assert pushed_by_parts == set(_shards(root / "local"))
    assert not [r for r in hub.log[before:] if r.method == "PUT"]  # nothing uploaded twice
    assert len(hub.repos["me/merged"].commits) == 2
    for d in docs:
        assert set(d["fetched"]["evicted"]) == set(d["fetched"]["files"]) - {
            n for n in d["fetched"]["files"] if not n.endswith(".safetensors")
        }
    assert _as_tree(hub.files("me/merged"), tmp_path / "pushed") == _tree(root / "local")
    commit = hub.requests("POST", "/api/models/me/merged/commit/")
    assert len(commit) == 1


def test_killed_mid_upload_leaves_no_commit_and_a_rerun_completes(world, hub, run_cli, tmp_path):
    root, base, adapter = world
    out = tmp_path / "merged"
    reached = hub.hold("PUT", "^/lfs-upload/")
    argv = ["merge", "org/base", adapter, "-o", out, "--evict", "--push-to-hub", "me/merged"]
    outcome = run_forked(argv, seconds=60, kill_when=reached)
    assert outcome.timed_out and reached.is_set(), outcome.stderr  # killed while uploading
    hub.release.set()
    assert len(hub.repos["me/merged"].commits) == 1  # the empty repo only
    code, text, err = run_cli(*argv)
    assert code == 0, err
    assert len(hub.repos["me/merged"].commits) == 2
    assert _as_tree(hub.files("me/merged"), tmp_path / "pushed") == _tree(root / "local")


@pytest.mark.parametrize("method, where", [("PUT", "^/lfs-upload/"), ("POST", "/commit/")])
def test_failed_push_is_one_line_commits_nothing_publishes_nothing(
    world, hub, run_cli, tmp_path, method, where
):
    root, base, adapter = world
    hub.fail(method, where, 400, times=100)  # not transient: no retry
    out = tmp_path / "merged"
    argv = ["merge", "org/base", adapter, "-o", out, "--evict", "--push-to-hub", "me/merged"]
    assert_refused(argv, [adapter], dest=out, names=["me/merged", "400"], seconds=30)
    assert len(hub.repos["me/merged"].commits) == 1
    if method == "PUT":  # a rerun after a stopped upload: test_killed_mid_upload_…
        return
    hub.failures.clear()
    code, _, err = run_cli(*argv)  # the rerun needs no --overwrite: nothing was published
    assert code == 0, err
    assert _as_tree(hub.files("me/merged"), tmp_path / "pushed") == _tree(root / "local")


def test_transient_errors_are_retried(world, hub, run_cli, tmp_path):
    root, base, adapter = world
    hub.fail("GET", "^/api/models/org/base", 503, times=2)
    hub.fail("GET", "^/org/base/resolve/.*00002", 429, times=2)
    hub.fail("POST", "^/api/models/me/merged/commit/", 502, times=1)
    argv = ["merge", "org/base", adapter, "-o", tmp_path / "m", "--push-to-hub", "me/merged"]
    code, _, err = run_cli(*argv)
    assert code == 0, err
    assert len(hub.repos["me/merged"].commits) == 2
    assert _as_tree(hub.files("me/merged"), tmp_path / "pushed") == _tree(root / "local")


def test_base_moved_between_parts_is_refused_at_join(world, hub, run_cli, tmp_path):
    root, base, adapter = world
    out = tmp_path / "merged"
    code, _, err = run_cli("merge", "org/base", adapter, "-o", out, "--part", "1/2")
    assert code == 0, err
    moved = tmp_path / "moved"
    shutil.copytree(base, moved)
    (moved / "NOTICE").write_text("a new commit on main\n")
    hub.add_folder("org/base", moved)
    code, _, err = run_cli("merge", "org/base", adapter, "-o", out, "--part", "2/2")
    assert code == 0, err
    code, _, err = run_cli("merge", "org/base", adapter, "-o", out, "--join")
    assert code == 2 and "another base checkpoint" in err, err
    assert not out.exists()


def test_offline_cache_path_still_works(world, hub, run_cli, tmp_path, monkeypatch):
    root, base, adapter = world
    code, _, err = run_cli("merge", "org/base", adapter, "-o", tmp_path / "online")
    assert code == 0, err
    go_offline(monkeypatch, tmp_path / "cache")
    before = len(hub.log)
    code, _, err = run_cli("merge", "org/base", adapter, "-o", tmp_path / "offline")
    assert code == 0, err
    assert len(hub.log) == before  # not one request
    assert _tree(tmp_path / "offline") == _tree(root / "local")


def test_token_is_sent_never_printed(world, hub, run_cli, tmp_path, monkeypatch):
    root, base, adapter = world
    hub.repos["org/base"].private = True
    hub.token = "hf_secret_token_value"
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_value")
    code, out, err = run_cli("merge", "org/base", adapter, "-o", tmp_path / "m", "--json")
    assert code == 0, err
    assert "hf_secret" not in out + err
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_token_value")
    code, out, err = run_cli("merge", "org/base", adapter, "-o", tmp_path / "n")
    assert code == 2 and "hf_wrong" not in out + err and "HF_TOKEN" in err, err


@pytest.mark.parametrize(
    "case, names",
    [
        ("unauthorized", ["org/base", "HF_TOKEN"]),
        ("forbidden", ["org/base", "403"]),
        ("missing repo", ["org/nothing"]),
        ("missing revision", ["org/base@nope"]),
        ("rate limited", ["org/base", "429"]),
        ("full disk", ["org/base", "disk is full"]),
    ],
)
def test_hub_failures_are_one_line(world, hub, tmp_path, monkeypatch, case, names):
    root, base, adapter = world
    ref = "org/base"
    if case == "unauthorized":
        hub.repos["org/base"].private = True
        hub.token = "hf_right"
    elif case == "forbidden":
        hub.fail("GET", "^/api/models/org/base", 403)
    elif case == "missing repo":
        ref = "org/nothing"
    elif case == "missing revision":
        ref = "org/base@nope"
    elif case == "rate limited":
        hub.fail("GET", "^/api/models/org/base", 429, times=1000)
    elif case == "full disk":

        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "cache"))

        monkeypatch.setattr("huggingface_hub.hf_hub_download", full)
    out = tmp_path / "merged"
    argv = ["merge", ref, adapter, "-o", out]
    assert_refused(argv, [adapter], dest=out, names=names, seconds=30)
