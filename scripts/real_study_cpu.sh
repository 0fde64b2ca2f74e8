#!/usr/bin/env bash
# Issue 32's real-model study on a CPU (no GPU lent): SmolLM2-135M-Instruct (`smollm2-135m`) on `extract` (40 steps,
# the real base's default budget) and `totals` (150 steps: there e2e lands inside 50-95%), fp32 (a CPU without
# bf16 units runs bf16 matmuls ~38x slower), one `lopt compare` per task: e2e, LoRA, freeze and LoPT's real-base
# default (task+anchor, early group 0.3x, clipped per block) at 3e-5 / 1e-4 / 3e-4 (LoRA 3e-4 / 1e-3 / 3e-3), 3
# seeds, edge-chosen grids extended by compare. Seed 0 of every point runs first, then the extensions, then seeds
# 1-2 where the report reads. One model job at a time (threads oversubscribe otherwise): ~25 min a 40-step run
# with its scoring on 2 cores, ~50 min a 150-step one; a whole task takes several sessions. TIME_LIMIT (seconds,
# per task) stops new runs; rerun the same command to go on (finished runs are reused).
#   TIME_LIMIT=3600 bash scripts/real_study_cpu.sh [OUTPUT_DIR]     (default runs/real-study-cpu)
#   TASKS=totals bash scripts/real_study_cpu.sh                      (one task; default "extract totals")
#   bash scripts/real_study_cpu.sh runs/real-study-cpu --report_only  (flags after the folder go to lopt compare)
set -euo pipefail
cd "$(dirname "$0")/.."
LOPT="${LOPT:-.venv/bin/lopt}"
[ -x "${LOPT%% *}" ] || LOPT="python -m lopt"
OUT="${1:-runs/real-study-cpu}"
shift || true
time_limit=()
[ -n "${TIME_LIMIT:-}" ] && time_limit=(--time_limit "$TIME_LIMIT")
SFT="--bf16 false --per_device_train_batch_size 8 --max_length 128 --logging_steps 10"

for task in ${TASKS:-extract totals}; do
  steps=40
  [ "$task" = totals ] && steps=150
  $LOPT compare --model_name_or_path smollm2-135m --task "$task" --max_steps "$steps" --seeds 3 \
    --methods e2e,lopt_task_anchor@0.3,lora,freeze --learning_rates 3e-5,1e-4,3e-4 \
    --method_learning_rates lora=3e-4,1e-3,3e-3 --lm_eval_tasks none --no_progress "${time_limit[@]}" \
    --sft_args "$SFT" --output_dir "$OUT/$task" "$@" | tail -40
done
