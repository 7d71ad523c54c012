"""Hub ids (``org/name[@revision]``) wherever a command names a model or an adapter:
``inspect PATH``, ``validate PATH --base --adapter``, ``convert INPUT --base``. They resolve
through ``sources/hub.py`` as ``merge``'s do, here from a real cache layout built offline
(``hub_helpers``); no test touches the network."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import load_owned, peft_adapter, save_model, tiny_model
from hub_helpers import COMMIT, COMMIT_V2, add_to_cache, go_offline
from safetensors.torch import save_file

MISSING = "org/missing"


@pytest.fixture(scope="module")
def hub_world(tmp_path_factory):
    """Local folders and the same under Hub ids: org/base (a tiny Llama), org/adapter (main,
    and tag v2 with lora_B negated), org/adapter2 (other modules), org/merged (base +
    adapter, merged by lora from the local folders); merged2 is base + adapter + adapter2."""
    from lora_cli.stages.merge import merge

    root = tmp_path_factory.mktemp("hubids")
    model = tiny_model("llama")
    base = save_model(model, root / "base")
    adapter, adapter2, v2 = root / "adapter", root / "adapter2", root / "adapter-v2"
    peft_adapter(model, adapter, target_modules=["q_proj", "v_proj"])
    peft_adapter(model, adapter2, target_modules=["k_proj", "o_proj"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "org/base"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    shutil.copytree(adapter, v2)
    tensors = load_owned(v2 / "adapter_model.safetensors")
    save_file(
        {k: -t if "lora_B" in k else t for k, t in tensors.items()},
        v2 / "adapter_model.safetensors",
    )
    merge(base, adapter, root / "merged")
    merge(base, [adapter, adapter2], root / "merged2")
    cache = root / "cache"
    snapshots = {
        "org/base": add_to_cache(cache, "org/base", base, COMMIT),
        "org/adapter": add_to_cache(cache, "org/adapter", adapter, COMMIT),
        "org/adapter@v2": add_to_cache(cache, "org/adapter", v2, COMMIT_V2, ref="v2"),
        "org/adapter2": add_to_cache(cache, "org/adapter2", adapter2, COMMIT),
        "org/merged": add_to_cache(cache, "org/merged", root / "merged", COMMIT),
    }
    return root, cache, snapshots


@pytest.fixture
def hub(hub_world, monkeypatch):
    root, cache, snapshots = hub_world
    go_offline(monkeypatch, cache)
    return root, snapshots


def _cache_listing(cache: Path) -> list[str]:
    return sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*"))


def _json(run_cli, *args) -> tuple[int, dict, str]:
    code, out, err = run_cli(*args, "--json")
    return code, (json.loads(out) if out.strip() else {}), err


# --- inspect ------------------------------------------------------------------------------


def test_inspect_adapter_by_id(hub, run_cli):
    root, snapshots = hub
    code, by_id, err = _json(run_cli, "inspect", "org/adapter")
    assert code == 0, err
    assert by_id["kind"] == "adapter" and by_id["path"] == str(snapshots["org/adapter"])
    assert by_id["adapter"]["base_model_name_or_path"] == "org/base"
    code, local, err = _json(run_cli, "inspect", root / "adapter")
    assert code == 0, err
    assert {**by_id, "path": None} == {**local, "path": None}
    code, tagged, err = _json(run_cli, "inspect", "org/adapter@v2")
    assert code == 0, err
    assert tagged["path"] == str(snapshots["org/adapter@v2"])
    code, out, err = run_cli("inspect", "org/adapter")  # human output says where it came from
    assert code == 0, err
    assert f"path org/adapter: Hugging Face Hub snapshot {snapshots['org/adapter']}" in err
    assert str(snapshots["org/adapter"]) in out


def test_inspect_model_by_id(hub, run_cli):
    root, snapshots = hub
    code, by_id, err = _json(run_cli, "inspect", "org/base")
    assert code == 0, err
    assert by_id["kind"] == "checkpoint" and by_id["path"] == str(snapshots["org/base"])
    assert by_id["checkpoint"]["model_type"] == "llama"
    code, local, err = _json(run_cli, "inspect", root / "base")
    assert code == 0, err
    assert {**by_id, "path": None} == {**local, "path": None}


# --- validate -----------------------------------------------------------------------------


def test_validate_base_and_adapter_by_id(hub, run_cli):
    root, snapshots = hub
    merged = root / "merged"
    code, doc, err = _json(
        run_cli, "validate", merged, "--base", "org/base", "--adapter", "org/adapter"
    )
    assert code == 0, err
    assert doc["valid"] and doc["base"] == str(snapshots["org/base"])
    assert doc["adapter"] == str(snapshots["org/adapter"])
    # the other revision is really read: its negated lora_B does not match the merge
    code, doc, err = _json(
        run_cli, "validate", merged, "--base", "org/base", "--adapter", "org/adapter@v2"
    )
    assert code == 1 and not doc["valid"], err
    # the merged model itself by id
    code, doc, err = _json(
        run_cli, "validate", "org/merged", "--base", "org/base", "--adapter", "org/adapter"
    )
    assert code == 0, err
    assert doc["path"] == str(snapshots["org/merged"]) and doc["valid"]


def test_validate_two_adapters_by_id(hub, run_cli):
    root, snapshots = hub
    args = ("validate", root / "merged2", "--base", "org/base")
    code, doc, err = _json(run_cli, *args, "--adapter", "org/adapter", "--adapter", "org/adapter2")
    assert code == 0, err
    assert doc["adapters"] == [str(snapshots["org/adapter"]), str(snapshots["org/adapter2"])]
    code, doc, err = _json(
        run_cli, *args, "--adapter", "org/adapter@v2", "--adapter", "org/adapter2"
    )
    assert code == 1 and not doc["valid"], err


def test_validate_adapter_by_id_against_base_by_id(hub, run_cli):
    _, snapshots = hub
    code, doc, err = _json(run_cli, "validate", "org/adapter", "--base", "org/base")
    assert code == 0, err
    assert doc["kind"] == "adapter" and doc["path"] == str(snapshots["org/adapter"])
    assert doc["base"] == str(snapshots["org/base"])


# --- convert ------------------------------------------------------------------------------


def test_convert_to_gguf_by_id(hub, tmp_path, run_cli):
    root, _ = hub
    code, _, err = run_cli(
        "convert", "org/adapter", "--to", "gguf", "--base", "org/base", "-o", tmp_path / "id.gguf"
    )
    assert code == 0, err
    assert "input org/adapter: Hugging Face Hub snapshot" in err
    assert "base org/base: Hugging Face Hub snapshot" in err
    code, _, err = run_cli(
        "convert", root / "adapter", "--to", "gguf", "--base", root / "base",
        "-o", tmp_path / "local.gguf",
    )  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "id.gguf").read_bytes() == (tmp_path / "local.gguf").read_bytes()


def test_convert_by_id_with_output(hub, tmp_path, run_cli):
    root, _ = hub
    code, doc, err = _json(run_cli, "convert", "org/adapter", "-o", tmp_path / "out", "-q")
    assert code == 0, err
    written = load_owned(tmp_path / "out" / "adapter_model.safetensors")
    expected = load_owned(root / "adapter" / "adapter_model.safetensors")
    assert written.keys() == expected.keys()
    assert all(written[k].equal(t) for k, t in expected.items())


def test_convert_never_writes_into_the_cache(hub_world, hub, tmp_path, run_cli):
    _, cache, snapshots = hub_world
    before = _cache_listing(cache)
    for args in (
        ("org/adapter",),  # an adapter converts beside itself without -o
        ("org/base",),  # a checkpoint goes to a sibling folder without -o
        (snapshots["org/base"],),  # the cache named by its path
        (snapshots["org/adapter"],),
    ):
        code, _, err = run_cli("convert", *args)
        assert code == 2, err
        assert "Hugging Face cache" in err and "-o OUTPUT" in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1, err
    inside = cache / "models--org--base" / "snapshots" / "converted"
    code, _, err = run_cli("convert", "org/base", "-o", inside)
    assert code == 2 and "inside the Hugging Face cache" in err, err
    code, _, err = run_cli("merge", "org/base", "org/adapter", "-o", cache / "merged")
    assert code == 2 and "inside the Hugging Face cache" in err, err
    assert _cache_listing(cache) == before


# --- errors and precedence ----------------------------------------------------------------


@pytest.mark.parametrize(
    "args, what",
    [
        (("inspect", MISSING), "path"),
        (("validate", MISSING), "path"),
        (("validate", "{merged}", "--base", MISSING, "--adapter", "org/adapter"), "base"),
        (("validate", "{merged}", "--base", "org/base", "--adapter", MISSING), "adapter"),
        (("convert", MISSING, "-o", "{out}"), "input"),
        (("convert", "org/adapter", "--to", "gguf", "--base", MISSING, "-o", "{out}"), "base"),
    ],
)
def test_offline_and_not_cached_is_merges_one_line_error(hub, tmp_path, run_cli, args, what):
    root, _ = hub
    out = tmp_path / "out"
    code, _, err = run_cli(*(a.format(merged=root / "merged", out=out) for a in args))
    assert code == 2
    assert f"{what} {MISSING}: not a local path" in err and "HF_HUB_OFFLINE" in err
    assert "Hugging Face cache holds no snapshot of it (offline)" in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and MISSING in errors[0] and "Traceback" not in err
    assert not out.exists()


def test_a_local_path_wins_over_a_hub_id(hub, tmp_path, monkeypatch, run_cli):
    root, _ = hub
    monkeypatch.chdir(tmp_path)
    shutil.copytree(root / "adapter-v2", tmp_path / "org" / "adapter")  # ./org/adapter
    code, doc, err = _json(run_cli, "inspect", "org/adapter")
    assert code == 0, err
    assert doc["path"] == "org/adapter" and "snapshot" not in err
    # from the cache org/adapter matches the merge (tested above); the local v2 does not
    code, doc, err = _json(
        run_cli, "validate", root / "merged", "--base", "org/base", "--adapter", "org/adapter"
    )
    assert code == 1 and doc["adapter"] == "org/adapter", err
    code, _, err = run_cli(
        "convert", "org/adapter", "--to", "gguf", "--base", "org/base", "-o", tmp_path / "a.gguf"
    )
    assert code == 0 and "input org/adapter" not in err and "base org/base" in err, err


@pytest.mark.parametrize(
    "args, progress",
    [
        (("inspect", "org/adapter"), True),
        (("inspect", "org/adapter", "--json"), False),
        (("validate", "org/adapter", "--base", "org/base"), True),
        (("validate", "org/adapter", "--base", "org/base", "--json"), False),
        (("convert", "org/adapter", "-o", "{out}"), True),
        (("convert", "org/adapter", "-o", "{out}", "-q"), False),
        (("convert", "org/adapter", "-o", "{out}", "--json"), False),
    ],
)
def test_hub_progress_bars_follow_json_and_quiet(
    hub, tmp_path, monkeypatch, run_cli, args, progress
):
    from lora_cli.sources import hub as hub_module

    seen: list[bool] = []
    real = hub_module._snapshot

    def recording(ref, what, enabled):
        seen.append(enabled)
        return real(ref, what, enabled)

    monkeypatch.setattr(hub_module, "_snapshot", recording)
    code, _, err = run_cli(*(a.format(out=tmp_path / "out") for a in args))
    assert code == 0, err
    assert seen and set(seen) == {progress}


def test_online_inspect_downloads_what_merge_would(hub_world, monkeypatch):
    """Online, with huggingface_hub's network calls replaced by a recorder: inspect asks for
    the same files as merge (``select_files``), never training state."""
    import huggingface_hub
    from huggingface_hub import constants

    from lora_cli.stages.inspect import inspect_path

    _, cache, snapshots = hub_world
    listing = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin",
               "optimizer.pt", "README.md", "checkpoint-100/adapter_model.safetensors"]  # fmt: skip
    asked = {}

    def fake_snapshot_download(repo_id, *, revision=None, allow_patterns=None, **kw):
        asked.update(repo_id=repo_id, revision=revision, allow_patterns=allow_patterns)
        return str(snapshots["org/adapter"])

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(
        huggingface_hub.HfApi, "list_repo_files", lambda self, repo_id, revision=None: listing
    )
    monkeypatch.setattr("lora_cli.sources.hub._reach_hub", lambda: None)  # the Hub answers
    report = inspect_path("org/adapter@main", hub_progress=False)
    assert report.kind == "adapter" and report.path == snapshots["org/adapter"]
    assert asked["repo_id"] == "org/adapter" and asked["revision"] == "main"
    assert sorted(asked["allow_patterns"]) == ["adapter_config.json", "adapter_model.safetensors"]
