# Sourced by demo.sh and the test scripts: create or refresh a venv and install lora with its test extras.
#   LORA_VENV  the venv folder (default .venv)
#   LORA_LOCK  the constraints file every install obeys (default requirements/test.lock, the pinned
#              test environment); set it empty to take the newest releases (scripts/test-latest.sh)
#   TORCH_SPEC the torch requirement, installed first so that the open `torch>=…` in pyproject.toml
#              does not pull a multi-GB CUDA build (default torch==2.13.0, the CPU wheel on disk)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LORA_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
LOCK="${LORA_LOCK-$ROOT/requirements/test.lock}"
# DeepSpeed (a test oracle) ships as an sdist: build none of its CUDA/C++ ops.
export DS_BUILD_OPS=0 DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"

constraints=()
if [ -n "$LOCK" ]; then constraints=(-c "$LOCK"); fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
stamp="$VENV/.lora-installed"
want="$(cat "$ROOT/pyproject.toml" ${LOCK:+"$LOCK"} | sha256sum | cut -c1-64) $TORCH_SPEC"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  pip_install() {
    python -m pip install -q --disable-pip-version-check "${constraints[@]}" "$@" 2>&1 \
      | grep -v "is ignored: it is neither" || true
  }
  pip_install "$TORCH_SPEC"
  pip_install -e "$ROOT[test]"
  python -c "import torch, lora_cli, peft" >/dev/null
  echo "$want" >"$stamp"
fi
cd "$ROOT"
