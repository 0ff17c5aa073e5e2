#!/usr/bin/env bash
# The project's test command (README and .ci/run both call it).
set -euo pipefail
cd "$(dirname "$0")/.."
export NO_TORCH_COMPILE=1
exec .venv/bin/python -m pytest "$@"
