#!/usr/bin/env bash
# On the GPU machine (device tool, carry .gpu): the Unsloth probes issue 17 names, checked against the predictions
# written before them (bench/results/predictions/issue17-h200.json: `python bench/predictions.py predict ...`):
# reduced-depth, full-width Qwen3-30B-A3B and Mixtral-8x7B, full-depth Phi-3.5-mini, Gemma-3-12B at 8 layers,
# LoRA and QLoRA at 1 x 2048, 4 x 2048 and 1 x 8192. One probe process per job (a method's shapes, one model load).
# gptoss: gpt-oss-20b at 4 layers, its own predictions (bench/results/predictions/issue17-gpt-oss-h200.json): does
# Unsloth 2026.10.9 train it at all, and how far is the unmeasured estimate.
#   bash bench/record_issue17.sh [FAMILY ...]   (qwen3moe mixtral phi gemma3 gptoss qwen2moe phi4; default the first four,
#   about 9 minutes)
# DEADLINE=S: start no job later than S - 150 seconds after this script starts (a device call is cut at 600 s); the
# jobs left go to $OUT/skipped.txt, and ONLY="$(cat skipped.txt)" runs just them in the next call.
set -uo pipefail
source bench/gpu_setup.sh
PRED_GIVEN=${PRED:-}
PRED=${PRED:-bench/results/predictions/issue17-h200.json}  # PRED=.../issue17-heldout-h200.json: the shapes no term was written from
jobs_for() {
  python3 -c "import json,sys; print(' '.join(j for j in json.load(open('$PRED'))['jobs'] if j.startswith(sys.argv[1])))" "$1"
}
families=("$@"); [ $# -gt 0 ] || families=(qwen3moe mixtral phi gemma3)
for family in "${families[@]}"; do
  case "$family" in
    qwen3moe) prefix=qwen3-30b-a3b ;; mixtral) prefix=mixtral-8x7b ;; phi) prefix=phi-3.5-mini ;; gemma3) prefix=gemma-3-12b ;;
    qwen2moe) prefix=qwen1.5-moe-a2.7b ;; phi4) prefix=phi-4 ;;
    gptoss) prefix=gpt-oss-20b; PRED=${PRED_GIVEN:-bench/results/predictions/issue17-gpt-oss-h200.json} ;;
    *) echo "unknown family $family"; continue ;;
  esac
  t0=$SECONDS
  # One process per job (a method's shapes): a job run after another in the same process starts with that job's
  # leftovers allocated (start_alloc_gib 0.13-0.31 GiB in the QLoRA rows run after LoRA), which a user's run has
  # not: the same shapes in processes of their own reserved up to 1.15 GiB less (h200-issue17-fresh-process/), and
  # bench/issue17_rows.py checks the estimate on those only.
  # The probe's log stays in /tmp (the device tool brings back 8 files at most); a failed job's tail goes to
  # $OUT/failed.txt.
  for job in $(jobs_for $prefix); do
    if [ -n "${ONLY:-}" ] && [[ " $(echo $ONLY) " != *" $job "* ]]; then continue; fi  # echo: newlines to spaces
    if [ -n "${DEADLINE:-}" ] && [ $((SECONDS + 150)) -gt "$DEADLINE" ]; then
      echo "$job" >>$OUT/skipped.txt; echo "== $job skipped: under 150 s of the call left"; continue
    fi
    python3 -m rigplan.calibration.probe --job "$job" --out $OUT/probe-$family.jsonl >/tmp/probe-$family.log 2>&1
    rc=$?
    echo "== $job exit $rc after $((SECONDS - t0)) s"
    [ $rc -eq 0 ] || { echo "== $job exit $rc"; tail -40 /tmp/probe-$family.log; } >>$OUT/failed.txt
  done
  [ -f $OUT/probe-$family.jsonl ] || continue  # every job skipped or failed: nothing to compare
  python3 bench/predictions.py compare $PRED $OUT/probe-$family.jsonl | grep "\"$prefix" | tee -a $OUT/compare.txt
done
