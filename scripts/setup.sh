#!/usr/bin/env bash
# Create .venv (once) with exactly the versions the tests passed with (requirements/lock.txt) and lopt itself
# (editable). Re-runs only when pyproject.toml or the lock changes. `pip install lopt` elsewhere takes the ranges
# in pyproject.toml instead; scripts/check_latest.sh tests the newest versions those ranges allow.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV=.venv
STAMP="$VENV/.lopt-installed"
want="$(cat pyproject.toml requirements/lock.txt | sha256sum | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
echo "setup: creating $VENV and installing lopt from requirements/lock.txt (first run takes a few minutes)" >&2
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first and pinned: an unpinned torch could pull a multi-GB CUDA build.
"$VENV/bin/python" -m pip install -q "torch==$(sed -n 's/^torch==//p' requirements/lock.txt)"
# The lock lists every package, so nothing is resolved anew (--no-deps): what was tested is what is installed.
"$VENV/bin/python" -m pip install -q --no-deps -r requirements/lock.txt
"$VENV/bin/python" -m pip install -q --no-deps -e .
echo "$want" > "$STAMP"
