#!/usr/bin/env bash
# One prepared check for a CUDA machine (about 8 minutes, one report): the whole training step at the Qwen2.5-0.5B
# shape (bf16, seq 2048, micro-batch 8; e2e, LoPT k=2 and k=4, each with and without the optimizer step in the
# backward and activation checkpointing) beside `lopt plan`'s floor, lopt sft / grpo / dpo in bf16 on the built-in
# model (and sft with --optimizer_in_backward), the activation bench at batch 1, and with 2+ GPUs DDP, --fsdp and
# --block_parallel over nccl. Every step has a time limit, and the whole run a budget (--budget-s, 480 s).
#   bash scripts/gpu_check.sh [--out DIR]   # report and logs in DIR (default: $OUT if set, else runs/gpu-check)
#   bash scripts/gpu_check.sh --dry-run     # the same steps at a tiny size on CPU: checks the script only
# See scripts/gpu_check.py for what each row measures.
set -euo pipefail
cd "$(dirname "$0")/.."
# The interpreter: $PYTHON, else the repository's .venv, else python3 (a GPU image's PyTorch), else python.
PY=${PYTHON:-.venv/bin/python}
if [ ! -x "$PY" ]; then
    PY=$(command -v python3 || command -v python || true)
fi
if [ -z "$PY" ]; then
    echo "gpu_check: no Python found (set PYTHON=/path/to/python)." >&2
    exit 2
fi
# lopt from this checkout when it is not installed in that interpreter (e.g. a GPU image's own Python).
if ! "$PY" -c "import lopt" >/dev/null 2>&1; then
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
# What lopt needs to run at all: fail now, in one line, rather than in every step.
missing=$("$PY" - <<'EOF'
import importlib.util
need = ["torch", "transformers", "trl", "datasets", "accelerate", "lopt"]
print(" ".join(name for name in need if importlib.util.find_spec(name) is None))
EOF
)
if [ -n "$missing" ]; then
    echo "gpu_check: $PY lacks: $missing (install them: requirements/lock.txt pins them; or set PYTHON to an interpreter that has them)." >&2
    exit 2
fi
export PYTHONUNBUFFERED=1
exec "$PY" scripts/gpu_check.py "$@"
