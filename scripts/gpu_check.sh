#!/usr/bin/env bash
# One prepared check for a CUDA machine (< 10 minutes, one table): memory bench at a Qwen2.5-0.5B shape (bf16, seq
# 2048, fused LM head), lopt sft 30 steps and lopt grpo 5 steps in bf16, and with 2+ GPUs DDP, --fsdp and
# --block_parallel over nccl. --dry-run runs the same steps at a tiny size on CPU (checks the script only).
# See scripts/gpu_check.py for what each column measures.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}   # PYTHON=/path/to/python to choose the interpreter
[ -x "$PY" ] || PY=python
exec "$PY" scripts/gpu_check.py "$@"
