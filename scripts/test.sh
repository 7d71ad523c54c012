#!/usr/bin/env bash
# Run the whole test suite (sets up .venv on first use).
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
exec python -m pytest "$@"
