#!/usr/bin/env bash
# Build a tiny model and adapter locally, then run inspect → convert → merge → validate on them.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
exec python scripts/demo.py "$@"
