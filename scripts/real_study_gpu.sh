#!/usr/bin/env bash
# Issue 32's real-model study, prepared for one GPU session (about 12 minutes of device time on one H200, then
# resumable): SmolLM2-135M-Instruct (`smollm2-135m`) on `extract` (or `totals`), 150 steps of 8 rows, through `lopt compare`
# (validation chooses, test reports; grids chosen at an edge are extended by compare itself).
#   1. lopt's precision (fp32 master weights, bf16 autocast): e2e, LoRA, freeze, the paper's LoPT (untied, lr_k1 = lr),
#      LoPT tied, LoPT at a 10x lower early rate, three anchored objectives (task+anchor at the real base's default
#      early rate 0.3x) and k=4, at rates that include the authors' 2e-5 and e2e's earlier choice 3e-5.
#   2. the authors' precision (weights and AdamW in bf16, no fp32 master): e2e and the paper's LoPT. On a CPU without
#      bf16 matmul units a bf16 matmul costs 38x an fp32 one (131 s a step here), so this arm is for the GPU only.
# Seed 0 of every point runs first, then the edge extensions, then seeds 1-2 where the report reads; a --time_limit
# stops new runs and the report covers what finished; rerun the same command to go on (finished runs are reused).
#   bash scripts/real_study_gpu.sh [OUTPUT_DIR]      (JOBS=8 TIME_LIMIT=330 per arm by default)
#   TASK=totals bash scripts/real_study_gpu.sh        (the second task, lopt.builtin.totals_task; default extract)
# LOPT names the command (default .venv/bin/lopt, else `python -m lopt`).
set -euo pipefail
cd "$(dirname "$0")/.."
LOPT="${LOPT:-.venv/bin/lopt}"
[ -x "${LOPT%% *}" ] || LOPT="python -m lopt"
TASK="${TASK:-extract}"
OUT="${1:-${OUT:-runs}/real-study-$TASK}"
JOBS="${JOBS:-8}"
TIME_LIMIT="${TIME_LIMIT:-330}"
SFT="--per_device_train_batch_size 8 --max_length 128 --logging_steps 10"
common=(--model_name_or_path smollm2-135m --task "$TASK" --seeds 3 --max_steps 150 --eval_samples 300
  --lm_eval_tasks none --jobs "$JOBS" --time_limit "$TIME_LIMIT" --no_progress)

$LOPT compare "${common[@]}" \
  --methods e2e,lora,freeze,lopt,lopt_tied,lopt@0.1,lopt_recon_anchor,lopt_anchor,lopt_task_anchor@0.3,lopt_k4 \
  --learning_rates 2e-5,3e-5,1e-4 --method_learning_rates lora=3e-4,1e-3 \
  --sft_args "--bf16 $SFT" --output_dir "$OUT/fp32-master" | tail -40

$LOPT compare "${common[@]}" --methods e2e,lopt --learning_rates 2e-5,3e-5,1e-4 \
  --sft_args "--dtype bfloat16 --bf16 $SFT" --output_dir "$OUT/pure-bf16" | tail -20
