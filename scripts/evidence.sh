#!/usr/bin/env bash
# The fair-evidence run (issue 11): both built-in tasks on the `evidence` preset, every method at every point of
# its learning-rate grid and at two step budgets, choices on validation, numbers on test, retention beside them.
# Writes runs/evidence-<task>/ (report.md, results.json, fronts.png, one folder per run) and runs/evidence-<task>.log.
#
#   bash scripts/evidence.sh                        # everything, one run at a time (hours on a laptop CPU)
#   JOBS=6 TIME_LIMIT=1800 bash scripts/evidence.sh # 6 runs at once per task; no new run after 30 min
#
# Rerunning resumes: finished runs are reused. METHODS, SEEDS, STEPS, LM_EVAL (lm-eval tasks; default the
# built-in knowledge probe), PRESET and PYTHON override the defaults below.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
export LOPT_BUILTIN_PRESET=${PRESET:-evidence} TOKENIZERS_PARALLELISM=false
METHODS=${METHODS:-e2e,freeze,lora,lopt,lopt@0.3,lopt_task,lopt_task@0.3}
SEEDS=${SEEDS:-3}
STEPS=${STEPS:-300,900}
JOBS=${JOBS:-1}

# Build the base model once, before the two compares would race for its lock.
"$PY" -c "from lopt.builtin.base import builtin_model_path; print(builtin_model_path(progress=False))"
LORA_GRID=()
[[ ",$METHODS," == *,lora,* ]] && LORA_GRID=(--method_learning_rates lora=1e-3,3e-3,1e-2)  # ~10x, as LoRA needs
mkdir -p runs
pids=()
for task in successor modules; do
    "$PY" -m lopt compare --task "$task" --methods "$METHODS" \
        --learning_rates 1e-4,3e-4,1e-3 "${LORA_GRID[@]}" \
        --max_steps "$STEPS" --seeds "$SEEDS" --eval_samples 200 --jobs "$JOBS" \
        ${TIME_LIMIT:+--time_limit "$TIME_LIMIT"} ${LM_EVAL:+--lm_eval_tasks "$LM_EVAL"} \
        --output_dir "runs/evidence-$task" --no_progress >"runs/evidence-$task.log" 2>&1 &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
for task in successor modules; do
    echo "== $task: runs/evidence-$task/report.md"
    tail -n 3 "runs/evidence-$task.log"
done
exit $status
