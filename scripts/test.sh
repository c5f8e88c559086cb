#!/usr/bin/env bash
# The README's test command: set everything up, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --test
exec "${PYTHON:-python3}" -m pytest -q -p no:cacheprovider --durations=15 "$@"
