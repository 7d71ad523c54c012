"""Hub ids for BASE and ADAPTER, resolved through huggingface_hub from a real cache layout
built here (``models--org--name/{blobs,snapshots,refs}``), offline: no test touches the network.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import load_owned, peft_adapter, peft_merged_state, save_model, tiny_model, ulp_diff
from hub_helpers import COMMIT, COMMIT_V2, add_to_cache, go_offline
from safetensors.torch import load_file

from lora_cli.io.hub_cache import cached_repo_id
from lora_cli.sources.hub import parse_repo_ref, select_files

# --- pure rules -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("meta-llama/Llama-3.1-8B", ("meta-llama/Llama-3.1-8B", None)),
        ("my-org/my-adapter@v1.0", ("my-org/my-adapter", "v1.0")),
        ("org/name@refs/pr/3", ("org/name", "refs/pr/3")),
        (f"org/name@{COMMIT}", ("org/name", COMMIT)),
        ("gpt2", None),  # un-namespaced: read as a (missing) local path
        ("./adapter", None),
        ("../x", None),
        ("/abs/path", None),
        ("a/b/c", None),
        ("org/name@", None),
        ("org/na--me", None),
        ("org/name.", None),
    ],
)
def test_parse_repo_ref(text, expected):
    ref = parse_repo_ref(text)
    assert (None if ref is None else (ref.repo_id, ref.revision)) == expected


LLAMA_REPO = [
    ".gitattributes",
    "README.md",
    "LICENSE",
    "USE_POLICY.md",
    "config.json",
    "generation_config.json",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "model.safetensors.index.json",
    "pytorch_model-00001-of-00002.bin",
    "pytorch_model-00002-of-00002.bin",
    "pytorch_model.bin.index.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "chat_template.jinja",
    "original/consolidated.00.pth",
    "original/params.json",
    "optimizer.pt",
    "scheduler.pt",
    "rng_state_0.pth",
    "training_args.bin",
    "trainer_state.json",
]


def test_select_files_prefers_safetensors_and_skips_training_state():
    assert select_files(LLAMA_REPO) == sorted(
        [
            "LICENSE",
            "USE_POLICY.md",
            "chat_template.jinja",
            "config.json",
            "generation_config.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json",
            "special_tokens_map.json",
            "tokenizer.json",
            "tokenizer.model",
            "tokenizer_config.json",
        ]
    )


def test_select_files_takes_bin_only_without_safetensors():
    repo = ["adapter_config.json", "adapter_model.bin", "optimizer.pt", "training_args.bin"]
    assert select_files(repo) == ["adapter_config.json", "adapter_model.bin"]


def test_cached_repo_id():
    snap = Path("/c/hub/models--org--name/snapshots") / COMMIT
    assert cached_repo_id(snap) == "org/name"
    assert cached_repo_id(snap / "model.safetensors") == "org/name"
    assert cached_repo_id(Path("/data/models/llama")) is None


# --- a real cache ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """org/base (a tiny Llama) and org/adapter (a PEFT LoRA naming org/base as its base)."""
    root = tmp_path_factory.mktemp("hub")
    model = tiny_model("llama")
    base = save_model(model, root / "local-base")
    adapter = root / "local-adapter"
    peft_adapter(model, adapter, target_modules=["q_proj", "v_proj"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "org/base"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    cache = root / "cache"
    add_to_cache(cache, "org/base", base, COMMIT)
    add_to_cache(cache, "org/adapter", adapter, COMMIT)
    # a second revision of the adapter, reachable by tag: the other sign of lora_B
    v2 = root / "adapter-v2"
    shutil.copytree(adapter, v2)
    tensors = load_owned(v2 / "adapter_model.safetensors")
    from safetensors.torch import save_file

    save_file(
        {k: -v if "lora_B" in k else v for k, v in tensors.items()},
        v2 / "adapter_model.safetensors",
    )
    add_to_cache(cache, "org/adapter", v2, COMMIT_V2, ref="v2")
    return root, cache


@pytest.fixture
def offline_cache(hub_cache, monkeypatch):
    root, cache = hub_cache
    go_offline(monkeypatch, cache)
    return root, cache


def test_the_cache_layout_is_the_real_one(hub_cache):
    from huggingface_hub import scan_cache_dir

    _, cache = hub_cache
    info = scan_cache_dir(cache)
    assert not info.warnings, info.warnings
    repos = {r.repo_id: r for r in info.repos}
    assert set(repos) == {"org/base", "org/adapter"}
    assert {rev.commit_hash for rev in repos["org/adapter"].revisions} == {COMMIT, COMMIT_V2}


def _merged(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _assert_peft_merge(out: Path, base: Path, adapter: Path) -> None:
    theirs = peft_merged_state(base, adapter)
    ours, before = _merged(out), _merged(base)
    assert any(not torch.equal(t, before[n]) for n, t in ours.items()), "nothing merged"
    for name, t in ours.items():
        assert ulp_diff(t, theirs[name]) <= 1, name


def test_merge_hub_ids_from_the_offline_cache(offline_cache, tmp_path, run_cli):
    root, _ = offline_cache
    code, _, err = run_cli("merge", "org/base", "org/adapter", "-o", tmp_path / "out")
    assert code == 0, err
    assert "org/adapter" in err and "snapshot" in err  # says where the inputs came from
    _assert_peft_merge(tmp_path / "out", root / "local-base", root / "local-adapter")
    assert not list((tmp_path / "out").glob("*.bin"))


def test_revision_selects_the_tagged_snapshot(offline_cache, tmp_path, run_cli):
    root, _ = offline_cache
    for name, ref in (("main", "org/adapter"), ("v2", "org/adapter@v2")):
        code, _, err = run_cli("merge", "org/base", ref, "-o", tmp_path / name, "-q")
        assert code == 0, err
    _assert_peft_merge(tmp_path / "v2", root / "local-base", root / "adapter-v2")
    main, v2 = _merged(tmp_path / "main"), _merged(tmp_path / "v2")
    assert any(not torch.equal(main[k], v2[k]) for k in main)
    code, _, err = run_cli("merge", "org/base", f"org/adapter@{COMMIT_V2}", "-o", tmp_path / "c")
    assert code == 0, err
    assert all(torch.equal(v2[k], t) for k, t in _merged(tmp_path / "c").items())


def test_adapter_alone_takes_its_base_from_adapter_config(offline_cache, tmp_path, run_cli):
    root, _ = offline_cache
    code, _, err = run_cli("merge", "org/adapter", "-o", tmp_path / "out")
    assert code == 0, err
    assert "base org/base: taken from adapter_config.json" in err
    _assert_peft_merge(tmp_path / "out", root / "local-base", root / "local-adapter")


def test_local_adapter_alone_with_hub_base(offline_cache, tmp_path, run_cli):
    root, _ = offline_cache
    code, _, err = run_cli("merge", root / "local-adapter", "-o", tmp_path / "out", "--dry-run")
    assert code == 0, err
    assert "taken from adapter_config.json" in err


def test_adapter_without_a_base_name_is_refused(offline_cache, tmp_path, run_cli):
    root, _ = offline_cache
    adapter = tmp_path / "adapter"
    shutil.copytree(root / "local-adapter", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    for value in (None, "/nowhere/on/this/machine"):
        config["base_model_name_or_path"] = value
        (adapter / "adapter_config.json").write_text(json.dumps(config))
        code, _, err = run_cli("merge", adapter, "-o", tmp_path / "out")
        assert code == 2, err
        assert "base_model_name_or_path" in err and "lora merge BASE ADAPTER" in err
        assert "Traceback" not in err
        assert not (tmp_path / "out").exists()


def test_offline_and_not_cached_is_one_clear_error(offline_cache, tmp_path, run_cli):
    code, _, err = run_cli("merge", "org/base", "org/missing", "-o", tmp_path / "out")
    assert code == 2
    assert "adapter org/missing: not a local path" in err and "HF_HUB_OFFLINE" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_missing_local_path_is_not_sent_to_the_hub(offline_cache, tmp_path, run_cli):
    code, _, err = run_cli("merge", tmp_path / "nope", "org/adapter", "-o", tmp_path / "out")
    assert code == 2
    assert "nope" in err and "not a local path" not in err


def test_online_downloads_only_what_a_merge_reads(hub_cache, monkeypatch, tmp_path):
    """Online path, with huggingface_hub's network calls replaced by a recorder."""
    import huggingface_hub
    from huggingface_hub import constants

    from lora_cli.sources.hub import resolve_input

    _, cache = hub_cache
    calls = {}
    snapshot = cache / "models--org--base" / "snapshots" / COMMIT

    def fake_snapshot_download(repo_id, *, revision=None, allow_patterns=None, **kw):
        calls.update(repo_id=repo_id, revision=revision, allow_patterns=allow_patterns, **kw)
        return str(snapshot)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(
        huggingface_hub.HfApi, "list_repo_files", lambda self, repo_id, revision=None: LLAMA_REPO
    )
    monkeypatch.setattr("lora_cli.sources.hub._reach_hub", lambda: None)  # the Hub answers
    folder = resolve_input("meta-llama/Llama-3.1-8B@main", "base", progress=False)
    assert folder == snapshot
    assert calls["repo_id"] == "meta-llama/Llama-3.1-8B" and calls["revision"] == "main"
    from fnmatch import fnmatch

    fetched = [n for n in LLAMA_REPO if any(fnmatch(n, p) for p in calls["allow_patterns"])]
    assert fetched == [n for n in LLAMA_REPO if n in select_files(LLAMA_REPO)]
    assert "token" not in calls  # auth is huggingface_hub's own (HF_TOKEN, hf auth login)


def test_hub_errors_become_one_line(monkeypatch, tmp_path, run_cli):
    import huggingface_hub
    from huggingface_hub import constants

    class GatedRepoError(Exception):
        pass

    def refuse(self, repo_id, revision=None):
        raise GatedRepoError("401 gated")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", refuse)
    monkeypatch.setattr("lora_cli.sources.hub._reach_hub", lambda: None)  # the Hub answers
    code, _, err = run_cli("merge", "org/gated", "org/adapter", "-o", tmp_path / "out")
    assert code == 2
    assert "gated" in err and "HF_TOKEN" in err and "Traceback" not in err
