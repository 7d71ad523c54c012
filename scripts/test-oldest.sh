#!/usr/bin/env bash
# Run the suite against the OLDEST versions pyproject.toml declares for the runtime dependencies
# (torch, transformers, safetensors, typer, rich, tqdm, huggingface_hub), in .venv-oldest, so that
# the lower bounds users get from `pip install .` are true. Not part of CI (a multi-GB torch
# download). The test oracles (peft, deepspeed, mlx-lm…) resolve to whatever pip finds compatible.
# torch's old releases on PyPI are CUDA builds: the first run downloads about 3 GB.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export LORA_VENV="${LORA_VENV:-$ROOT/.venv-oldest}"
mkdir -p "$LORA_VENV"
floors="$LORA_VENV/lower-bounds.txt"
# every `name>=X` of [project].dependencies becomes `name==X`
python3 - "$ROOT/pyproject.toml" >"$floors" <<'EOF'
import re, sys, tomllib
deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
for dep in deps:
    m = re.fullmatch(r"\s*([A-Za-z0-9_.\-\[\]]+)\s*>=\s*([^,;\s]+)\s*", dep)
    if not m:
        sys.exit(f"test-oldest: cannot read a lower bound from {dep!r}")
    name = re.sub(r"\[.*\]", "", m[1])
    print(f"{name}=={m[2]}")
EOF
export LORA_LOCK="$floors"
export TORCH_SPEC="$(grep '^torch==' "$floors")"
source "$ROOT/scripts/_env.sh"
python -m pip list --format=freeze 2>/dev/null \
  | grep -iE '^(torch|transformers|peft|safetensors|huggingface.hub|typer|rich|tqdm)=' || true
exec python -m pytest "$@"
