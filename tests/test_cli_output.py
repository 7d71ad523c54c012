"""What the CLI prints, whatever the files hold: one line per message (names read from files
cannot forge an ``error:`` or ``FINDING`` line), ``--json`` failures as a document, a bug
told apart from a verdict (exit 70, never validate's 1), streams that cannot encode, logs
that are not terminals, and the help a user reads first."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import peft_adapter, save_model, tiny_model
from hostile_harness import assert_refused
from hostile_harness import run_cli as run_child
from safetensors.torch import load_file, save_file

FORGED = "w\n error: forged \x1b[31mred\x1b[0m\u2028x"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-output")
    model = tiny_model("llama", torch.float32)
    base = save_model(model, root / "base")
    adapter = root / "adapter"
    peft_adapter(model, adapter, target_modules=["q_proj", "v_proj"])
    return base, adapter


def _forging_lines(text: str) -> list[str]:
    return [ln for ln in text.split("\n") if ln.lstrip().startswith("error: forged")]


def _adapter_with_extra_tensor(adapter: Path, dest: Path, name: str, value) -> Path:
    import shutil

    shutil.copytree(adapter, dest)
    tensors = load_file(adapter / "adapter_model.safetensors")
    tensors[name] = value
    save_file(tensors, dest / "adapter_model.safetensors")
    return dest


# --- one line per message -----------------------------------------------------------------


def test_a_forged_tensor_name_in_validate_findings_stays_one_finding(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    bad = torch.zeros(4)
    bad[1] = float("nan")
    save_file({FORGED: bad, "ok": torch.ones(4)}, ckpt / "model.safetensors")
    got = run_child(["validate", ckpt])
    assert got.code == 1 and "Traceback" not in got.stderr, got.stderr
    everything = got.stdout + got.stderr
    assert not _forging_lines(everything)
    assert "\x1b" not in everything and "\u2028" not in everything
    findings = [ln for ln in got.stdout.splitlines() if ln.startswith("FINDING")]
    assert len(findings) == 1 and "w\\n error: forged \\x1b[31mred" in findings[0]
    assert len(got.stdout.splitlines()) == 2  # the finding and the summary line
    doc = json.loads(run_child(["validate", ckpt, "--json"]).stdout)
    assert doc["findings"][0]["tensor"] == FORGED  # JSON keeps the exact name


def test_a_forged_file_name_stays_one_line(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    weights = ckpt / "m\nerror: forged.safetensors"
    save_file({"x": torch.full((2,), float("inf"))}, weights)
    got = run_child(["validate", weights])
    assert got.code == 1, got.stderr
    assert not _forging_lines(got.stdout + got.stderr)
    assert len([ln for ln in got.stdout.splitlines() if ln.startswith("FINDING")]) == 1


def test_a_forged_name_in_a_warning_forges_no_error_with_exit_0(pair, tmp_path):
    _, adapter = pair
    odd = _adapter_with_extra_tensor(adapter, tmp_path / "odd", FORGED, torch.ones(2))
    got = run_child(["inspect", odd])
    assert got.code == 0, got.stderr
    assert got.error_lines == [] and not _forging_lines(got.stdout + got.stderr)
    assert "\x1b" not in got.stdout + got.stderr
    assert "warning:" in got.stderr and "w\\n error: forged" in got.stderr


def test_a_forged_name_in_a_refusal_is_exactly_one_error_line(pair, tmp_path):
    base, adapter = pair
    key = f"base_model.model.model.layers.0.{FORGED}.lora_A.weight"
    odd = _adapter_with_extra_tensor(adapter, tmp_path / "odd", key, torch.ones(4, 32))
    odd_b = key.replace("lora_A", "lora_B")
    tensors = load_file(odd / "adapter_model.safetensors")
    tensors[odd_b] = torch.ones(32, 4)
    save_file(tensors, odd / "adapter_model.safetensors")
    out = tmp_path / "merged"
    got = assert_refused(["merge", base, odd, "-o", out], [base, odd], dest=out)
    assert not _forging_lines(got.stderr) and "\x1b" not in got.stderr


# --- --json failures, bugs -----------------------------------------------------------------


def test_json_failure_is_one_document_with_file_and_tensor(pair, tmp_path):
    base, adapter = pair
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors = load_file(adapter / "adapter_model.safetensors")
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = float("nan")
    bad = _adapter_with_extra_tensor(adapter, tmp_path / "nan", "unused.weight", torch.ones(1))
    save_file(tensors, bad / "adapter_model.safetensors")
    out = tmp_path / "merged"
    got = run_child(["merge", base, bad, "-o", out, "--json"])
    assert got.code == 2 and len(got.error_lines) == 1, got.stderr
    doc = json.loads(got.stdout)
    assert set(doc) == {"schema", "error", "file", "tensor", "fix", "exit_code"}
    assert doc["schema"] == "lora-error/1" and doc["exit_code"] == 2
    assert doc["file"] == str(bad / "adapter_model.safetensors") and doc["tensor"] == key
    assert doc["error"] in got.error_lines[0] and doc["fix"] in got.error_lines[0]


def test_a_usage_error_with_json_has_no_file(tmp_path):
    got = run_child(["validate", tmp_path, "--sample", "-1", "--json"])
    assert got.code == 2
    doc = json.loads(got.stdout)
    assert doc["file"] is None and doc["tensor"] is None and "--sample" in doc["error"]
    got = run_child(["merge", tmp_path, "-o", tmp_path / "o", "--bogus", "--json"])  # click's
    assert got.code == 2 and "--bogus" in json.loads(got.stdout)["error"]


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["bogus", "--json"], "No such command 'bogus'"),
        (["--bogus", "--json"], "--bogus"),
        (["inspect", "--bogus", "--json"], "--bogus"),
    ],
)
def test_a_command_line_click_cannot_parse_fails_like_any_json_failure(argv, needle):
    got = run_child(argv)
    assert got.code == 2 and len(got.error_lines) == 1, got.stderr
    assert got.stderr.splitlines() == got.error_lines, got.stderr  # no usage box beside it
    doc = json.loads(got.stdout)
    assert doc["schema"] == "lora-error/1" and doc["exit_code"] == 2
    assert needle in doc["error"] and doc["error"] in got.error_lines[0]
    assert doc["fix"] in got.error_lines[0] and doc["file"] is None


def test_a_bug_exits_70_with_its_traceback_never_1(pair, monkeypatch):
    import lora_cli.stages.inspect as stage

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug\nerror: forged")

    monkeypatch.setattr(stage, "inspect_path", broken)
    _, adapter = pair
    for extra in ([], ["--json"]):
        got = run_child(["inspect", adapter, *extra])
        assert got.code == 70, (got.code, got.stderr)
        assert "Traceback" in got.stderr
        assert "ZeroDivisionError: a bug\\nerror: forged" in got.stderr
        (line,) = got.error_lines  # the forged line in the message stays in its line
        assert "this is a bug" in line and "please report" in line
    assert json.loads(got.stdout)["exit_code"] == 70


# --- streams, pipes, logs ------------------------------------------------------------------


def test_ascii_stream_and_forced_colour_into_a_log(pair, tmp_path):
    """PYTHONIOENCODING=ascii used to crash the summary after the merge had succeeded;
    FORCE_COLOR=1 into a log used to write progress frames there."""
    base, adapter = pair
    out = tmp_path / "merged"
    env = {**os.environ, "PYTHONIOENCODING": "ascii", "FORCE_COLOR": "1", "COLUMNS": "80"}
    with open(tmp_path / "log", "w+b") as log:
        code = subprocess.run(
            [sys.executable, "-m", "lora_cli", "merge", base, adapter, "-o", out],
            stdout=log, stderr=log, env=env, timeout=300,
        ).returncode  # fmt: skip
        log.seek(0)
        text = log.read().decode("ascii")  # every byte is ASCII
    assert code == 0 and "Traceback" not in text, text
    assert "merged 4 tensors" in text and "\\u2192" in text  # → escaped, not a crash
    assert "\r" not in text and "merging" not in text  # no progress frames
    assert (out / "model.safetensors").is_file()


def test_long_names_are_not_cut_at_80_columns_in_a_pipe(pair, tmp_path, run_cli):
    _, adapter = pair
    module = "base_model.model.model.layers.0.self_attn." + "q" * 90
    odd = _adapter_with_extra_tensor(adapter, tmp_path / "odd", f"{module}.lora_A.weight",
                                     torch.ones(4, 32))  # fmt: skip
    tensors = load_file(odd / "adapter_model.safetensors")
    tensors[f"{module}.lora_B.weight"] = torch.ones(32, 4)
    save_file(tensors, odd / "adapter_model.safetensors")
    code, stdout, err = run_cli("inspect", odd)
    assert code == 0, err
    assert "q" * 90 in stdout  # the LoRA modules table, whole


def test_validate_reports_progress_per_tensor(pair):
    from lora_cli.stages.validate import validate

    base, _ = pair
    calls: list[tuple[int, str]] = []
    totals: list[int] = []

    def factory(total: int):
        totals.append(total)
        return lambda nbytes, name: calls.append((nbytes, name))

    validate(base, progress_factory=factory)
    names = set(load_file(base / "model.safetensors"))
    assert totals == [sum(n for n, _ in calls)] and {n for _, n in calls} == names


# --- help, version, completion, words ------------------------------------------------------


def test_help_has_examples_groups_and_clean_metavars(run_cli):
    for command in ("merge", "validate", "convert", "inspect", "extract"):
        code, stdout, _ = run_cli(command, "--help")
        assert code == 0 and "Examples" in stdout and f"$ lora {command} " in stdout
        for noise in ("<bool>", "<list[Path]>", "<path>", "{", "}"):
            assert noise not in stdout, (command, noise)
    code, stdout, _ = run_cli("merge", "--help")
    assert "Usage: lora merge [OPTIONS] BASE [ADAPTER...]" in stdout
    for panel in ("Output", "Training checkpoint (CKPT)", "Several adapters", "Split across jobs"):
        assert panel in stdout
    assert "org/name[@revision]" in stdout


def test_version_and_completion(run_cli):
    from lora_cli import __version__

    code, stdout, _ = run_cli("--version")
    assert code == 0 and stdout.strip() == f"lora {__version__}"
    code, stdout, _ = run_cli("--help")
    assert "--install-completion" in stdout and "--show-completion" in stdout
    done = subprocess.run(
        [sys.executable, "-m", "lora_cli", "--show-completion", "bash"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"},
    )  # fmt: skip
    assert done.returncode == 0 and "complete" in done.stdout, done.stderr


def test_counts_agree_with_their_nouns(tmp_path, run_cli):
    ckpt = tmp_path / "one"
    ckpt.mkdir()
    save_file({"x": torch.ones(2)}, ckpt / "model.safetensors")
    code, stdout, _ = run_cli("validate", ckpt)
    assert code == 0 and stdout.splitlines()[-1].startswith("VALID: ")
    assert "1 tensor read" in stdout
    code, _, err = run_cli("merge", ckpt, ckpt, ckpt, "-o", tmp_path / "o", "--weights", "1")
    assert code == 2 and "gives 1 number for 2 adapters" in err


# --- fail fast: argument mistakes before torch, an unreachable Hub -------------------------

PROBE = """
import sys
from lora_cli.cli import main
sys.argv = ["lora", *sys.argv[1:]]
try:
    main()
except SystemExit as exc:
    print("CODE=" + str(exc.code), file=sys.stderr)
print("TORCH=" + str("torch" in sys.modules), file=sys.stderr)
"""


@pytest.mark.parametrize(
    "args, needle",
    [
        (["merge", "./no-such-base", "./no-such-adapter", "-o", "x"], "no-such-base"),
        (["merge", ".", ".", ".", "-o", "x", "--weights", "1,2,3"], "3 numbers for 2"),
        (["merge", ".", ".", "-o", "x", "--device", "gpu"], "unknown device"),
        (["validate", ".", "--device", "tpu"], "unknown device"),
        (["convert", "./missing", "-o", "x"], "missing"),
    ],
)
def test_argument_errors_come_before_torch(args, needle, tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert "CODE=2" in done.stderr and needle in done.stderr, done.stderr
    assert "TORCH=False" in done.stderr, done.stderr


def test_an_unreachable_hub_fails_at_once_with_one_line(tmp_path, monkeypatch, run_cli):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens
    start = time.monotonic()
    code, _, err = run_cli("inspect", "org/not-cached")
    assert code == 2 and time.monotonic() - start < 10  # not 24 s of retries
    assert [ln for ln in err.splitlines() if ln.strip()] == [err.strip()], err
    assert err.startswith("error: path org/not-cached: not a local path")
