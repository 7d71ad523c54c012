"""``lora --help`` stays fast: torch, transformers and huggingface_hub load only in commands."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "huggingface_hub", "safetensors")
PROBE = """
import sys
from lora_cli.cli import main
sys.argv = ["lora", *sys.argv[1:]]
try:
    main()
except SystemExit:
    pass
heavy = [m for m in {heavy!r} if m in sys.modules]
print("HEAVY=" + ",".join(heavy), file=sys.stderr)
"""


@pytest.mark.parametrize(
    "args", [["--help"], ["merge", "--help"], ["validate", "--help"], ["extract", "--help"]]
)
def test_help_imports_no_heavy_library(args):
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Usage" in done.stdout, done.stderr
    assert "HEAVY=\n" in done.stderr or done.stderr.rstrip().endswith("HEAVY="), done.stderr
