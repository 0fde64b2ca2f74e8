#!/usr/bin/env bash
# The GRPO study on a CPU (no GPU lent): SmolLM2-135M-Instruct (`smollm2-135m`) on `totals`, every method's `lopt grpo`
# run from one common SFT start, through `lopt compare --trainer grpo` (validation chooses, test reports; a grid chosen
# at an edge is extended by compare, 3x past it, up to 2 rates).
#   - The start: `lopt sft --method e2e` on totals, made once in OUTPUT_DIR/start and reused by every rerun. Its
#     budget (START_STEPS, START_LR) is NOT CHECKED yet: it must leave the start's test accuracy between about 20% and
#     60% (the report's "The start:" line states it), so GRPO has answers to reinforce and room to gain. Check it
#     first with `lopt eval --model_name_or_path OUTPUT_DIR/start`; if it misses, change START_STEPS / START_LR and
#     use a new OUTPUT_DIR (compare refuses another start in a folder whose runs trained from this one).
#   - Methods: e2e; lopt (the paper's: the reconstruction objective, untied embeddings, early lr = lr); lopt_anchor@0.3
#     (the real base's `lopt grpo` LoPT default: recipes/smollm2-135m/grpo-lopt.yaml's anchor objective clipped per
#     block, the early group at 0.3x; tests/test_compare_rl.py pins that equality); freeze; lora at rank 4
#     (--lora_r 4 goes to every run; only LoRA reads it).
#   - Rates 1e-6, 1e-5, 1e-4 for every method, 3 seeds, GRPO_STEPS steps (the real base's grpo recipe: 50, groups of
#     4 completions, 2 prompts a step), fp32 (a CPU without bf16 units runs bf16 matmuls ~38x slower).
# Seed 0 of every point runs first, then the grid extensions, then seeds 1-2 where the report reads. TIME_LIMIT
# (seconds) stops new runs and the report covers what finished; rerun the same command to go on (finished runs and
# the start are reused).
#   TIME_LIMIT=3600 bash scripts/rl_study_cpu.sh [OUTPUT_DIR]      (default runs/rl-study-cpu)
#   bash scripts/rl_study_cpu.sh runs/rl-study-cpu --report_only   (flags after the folder go to lopt compare)
set -euo pipefail
cd "$(dirname "$0")/.."
LOPT="${LOPT:-.venv/bin/lopt}"
[ -x "${LOPT%% *}" ] || LOPT="python -m lopt"
OUT="${1:-runs/rl-study-cpu}"
shift || true
time_limit=()
[ -n "${TIME_LIMIT:-}" ] && time_limit=(--time_limit "$TIME_LIMIT")
START_STEPS="${START_STEPS:-40}"  # unchecked: see above (the start's test accuracy must land in about 20-60%)
START_LR="${START_LR:-1e-4}"      # unchecked, as START_STEPS
GRPO_STEPS="${GRPO_STEPS:-50}"
START="--bf16 false --per_device_train_batch_size 8 --max_length 128 --logging_steps 10"
START="$START --max_steps $START_STEPS --learning_rate $START_LR"
GRPO="--bf16 false --logging_steps 5 --lora_r 4"

$LOPT compare --trainer grpo --model_name_or_path smollm2-135m --task totals --max_steps "$GRPO_STEPS" --seeds 3 \
  --methods e2e,lopt,lopt_anchor@0.3,freeze,lora --learning_rates 1e-6,1e-5,1e-4 --lm_eval_tasks none \
  --no_progress "${time_limit[@]}" --sft_args "$START" --grpo_args "$GRPO" --output_dir "$OUT" "$@" | tail -40
