#!/usr/bin/env bash
# Create .venv with everything ec-lora-t needs (CPU). Safe to run again.
# torch goes first, pinned: a bare `torch` requirement with nothing installed pulls a
# multi-GB CUDA build; set TORCH_SPEC to choose another build (e.g. on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "$TORCH_SPEC"
# The test extra includes the app extra (Gradio; no torchvision, no other torch) and Selenium: the tests
# drive the slider page through gradio_client and a system Chromium (apt-get install chromium chromium-driver).
# Every other package at the version in scripts/constraints.txt (dvc.lock's hashes depend on them).
CONSTRAINTS="${CONSTRAINTS-scripts/constraints.txt}"
.venv/bin/python -m pip install -q -e ".[test]" ${CONSTRAINTS:+-c "$CONSTRAINTS"}
# `dvc exp run` commits experiments to git refs and needs an identity.
git config user.name >/dev/null || git config user.name "ec-lora-t user"
git config user.email >/dev/null || git config user.email "ec-lora-t@localhost"
echo "ec-lora-t environment ready in .venv"
