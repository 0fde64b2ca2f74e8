#!/usr/bin/env bash
# The real-model evidence (docs/evidence-real/): on SmolLM2-135M-Instruct (`smollm2-135m`) and its `extract` task,
# e2e, LoRA, freeze (first half), LoPT as in the paper (k=2, lambda=10, lr_k1 = lr) and the toy sweeps' best LoPT
# variant (the local task objective, early group at 0.3 x lr, boundary at layer 22 of 30: the toy's 12 of 16),
# each at 2 learning rates chosen on validation, 2 seeds, 150 steps of 8 rows (the real base's `lopt sft` recipe).
# Scored on the task's test split, world knowledge kept, and prose / code perplexity. Resumable: rerun to complete.
#   bash scripts/real_evidence.sh [OUTPUT_DIR] [extra lopt compare flags, e.g. --jobs 8 --time_limit 3600]
# LOPT names the command (default .venv/bin/lopt; `python3 -m lopt` elsewhere).
set -euo pipefail
cd "$(dirname "$0")/.."
LOPT="${LOPT:-.venv/bin/lopt}"
OUT="${1:-runs/real-evidence}"
shift || true
$LOPT compare --model_name_or_path smollm2-135m --task extract \
  --methods e2e,lora,freeze,lopt,lopt_task@0.3+b22 \
  --method_learning_rates e2e=3e-5,1e-4 \
  --method_learning_rates lora=3e-4,1e-3 \
  --method_learning_rates freeze=1e-4,3e-4 \
  --method_learning_rates lopt=1e-4,3e-4 \
  --method_learning_rates lopt_task@0.3+b22=1e-4,3e-4 \
  --seeds 2 --max_steps 150 --eval_samples 300 --lm_eval_tasks none \
  --sft_args "--bf16 --per_device_train_batch_size 8 --max_length 128 --logging_steps 10" \
  --output_dir "$OUT" "$@"
