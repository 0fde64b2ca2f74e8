#!/usr/bin/env bash
# Set up .venv on first use, then run the lopt CLI: `bash scripts/lopt.sh sft` trains on the built-in default.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bash "$root/scripts/setup.sh"
exec "$root/.venv/bin/lopt" "$@"
