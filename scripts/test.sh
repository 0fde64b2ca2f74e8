#!/usr/bin/env bash
# Set up .venv on first use, then lint and run the test suite (CPU only, no downloads).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests
.venv/bin/ruff format --check src tests
.venv/bin/lint-imports --no-cache  # the layers (docs/ARCHITECTURE.md)
exec .venv/bin/python -m pytest "$@"
