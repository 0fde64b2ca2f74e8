#!/usr/bin/env bash
# Copy a finished `lopt compare` folder into docs without its checkpoints: the report, results, plots, the base's
# record and every run's record (compare_run.json, a few KB). `lopt compare --report_only` under the command in
# results.json (setup.command) rebuilds the report from them (tests/test_readme.py checks it), and a later
# compare with more runs can go on from them after the run folders are gone.
#   bash scripts/keep_evidence.sh runs/real-study-cpu/totals docs/evidence-real/cpu-totals
set -euo pipefail
SRC="${1:?usage: keep_evidence.sh COMPARE_OUTPUT_DIR EVIDENCE_DIR}"
DST="${2:?usage: keep_evidence.sh COMPARE_OUTPUT_DIR EVIDENCE_DIR}"
[ -f "$SRC/results.json" ] || { echo "keep_evidence: no results.json in $SRC: run lopt compare (or --report_only) there first" >&2; exit 2; }
grep -q '"--report_only"' "$SRC/results.json" || { echo "keep_evidence: $SRC/results.json was not made by --report_only: rerun its compare with --report_only so the records alone rebuild it" >&2; exit 2; }
records=("$SRC"/runs/*/compare_run.json)
[ -f "${records[0]}" ] || { echo "keep_evidence: no finished run (runs/*/compare_run.json) in $SRC" >&2; exit 2; }
mkdir -p "$DST"
cp "$SRC"/compare_base.json "$SRC"/results.json "$SRC"/report.md "$SRC"/*.png "$DST"/
for record in "${records[@]}"; do
  run="$(basename "$(dirname "$record")")"
  mkdir -p "$DST/runs/$run"
  cp "$record" "$DST/runs/$run/"
done
echo "kept $(ls "$DST"/runs | wc -l) run records in $DST"
