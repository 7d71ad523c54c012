#!/usr/bin/env bash
# Run the suite against the newest release of every dependency (not the lock), in .venv-latest,
# so that drift shows here before users meet it. Not part of CI: someone else's release must not
# make our CI red. When it passes, `scripts/lock.sh` records that set as the new lock.
export LORA_VENV="${LORA_VENV:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv-latest}"
export LORA_LOCK=""
rm -f "$LORA_VENV/.lora-installed"
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
python -m pip install -q --disable-pip-version-check --upgrade --upgrade-strategy eager -e ".[test]" \
  2>&1 | grep -v "is ignored: it is neither" || true
python -m pip list --format=freeze 2>/dev/null | grep -iE '^(torch|transformers|peft|safetensors|huggingface.hub|typer|rich|tqdm)=' || true
exec python -m pytest "$@"
