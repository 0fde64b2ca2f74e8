#!/usr/bin/env bash
# Set up .venv on first use, then run the lopt CLI. The main job: `bash scripts/lopt.sh sft --model_name_or_path smollm2-135m`
# (LoPT SFT of the real base); `bash scripts/lopt.sh sft` trains the built-in toy.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bash "$root/scripts/setup.sh"
exec "$root/.venv/bin/lopt" "$@"
