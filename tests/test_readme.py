"""The README's snippets name commands and options that exist in the pinned environment:
every ``lora …`` line against lora's own command tree, every ``hf …`` line against the
installed huggingface_hub CLI's ``--help``, every ``bash scripts/…`` script on disk."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
STOP = {"||", "&&", "|", ";", ">", ">>", "2>", "<"}


def snippet_commands() -> list[list[str]]:
    """Each shell command line of the README's code blocks, as words up to the first
    operator (``||``, ``|``, ``>``…), comments dropped."""
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", README.read_text(), re.S | re.M)
    commands = []
    for block in blocks:
        for line in block.splitlines():
            line = line.strip().removeprefix("$ ")
            try:
                words = shlex.split(line, comments=True)
            except ValueError:
                continue
            while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):  # VAR=value lora …
                words = words[1:]
            cut = next((i for i, w in enumerate(words) if w in STOP), len(words))
            if words[:cut]:
                commands.append(words[:cut])
    return commands


COMMANDS = snippet_commands()
LORA = [c for c in COMMANDS if c[0] == "lora"]
HF = [c for c in COMMANDS if c[0] == "hf"]
SCRIPTS = [c for c in COMMANDS if c[0] in ("bash", ".venv/bin/python") and len(c) > 1]


def test_the_readme_has_snippets_to_check():
    assert len(LORA) >= 10 and HF and SCRIPTS
    assert not [c for c in COMMANDS if c[0] == "huggingface-cli"], "huggingface_hub 2.x: use hf"


def _lora_options() -> dict[str, set[str]]:
    import typer.main

    from lora_cli.cli import app

    group = typer.main.get_command(app)
    return {
        name: {opt for p in cmd.params for opt in (*p.opts, *p.secondary_opts)}
        for name, cmd in group.commands.items()
    }


@pytest.mark.parametrize("words", LORA, ids=[" ".join(c)[:60] for c in LORA])
def test_lora_snippet_names_real_subcommand_and_options(words):
    commands = _lora_options()
    assert len(words) > 1 and words[1] in commands, f"no subcommand {words[1:2]}"
    known = commands[words[1]] | {"-h", "--help"}
    options = [w.split("=", 1)[0] for w in words[2:] if w.startswith("-") and w != "-"]
    assert not [o for o in options if o not in known], f"unknown options in {' '.join(words)}"


@pytest.mark.parametrize("words", HF, ids=[" ".join(c)[:60] for c in HF])
def test_hf_snippet_names_an_installed_command(words):
    hf = Path(sys.executable).parent / "hf"
    if not hf.exists():  # the hf CLI ships with huggingface_hub >= 0.34 (test-oldest has less)
        import huggingface_hub

        pytest.skip(f"huggingface_hub {huggingface_hub.__version__} has no hf CLI")
    sub = [w for w in words[1:] if not w.startswith("-")][:1]
    done = subprocess.run([str(hf), *sub, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for option in (w.split("=", 1)[0] for w in words[2:] if w.startswith("--")):
        assert option in done.stdout, f"hf {sub[0]} has no {option}"


@pytest.mark.parametrize("words", SCRIPTS, ids=[" ".join(c)[:60] for c in SCRIPTS])
def test_script_snippets_exist(words):
    assert (ROOT / words[1]).is_file(), words[1]
