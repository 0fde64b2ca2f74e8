#!/usr/bin/env bash
# Tokens/s: block-parallel LoPT k=2 (2 processes x 1 thread) vs one-process LoPT k=2 and E2E (2 threads each).
# Extra arguments go to scripts/bench_parallel.py (--layers --hidden --seq_len --batch_size --steps --warmup ...).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || PY=python
exec "$PY" scripts/bench_parallel.py "$@"
