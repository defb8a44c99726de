#!/usr/bin/env bash
# `rigplan calibrate` on the GPU machine (device tool), timed, then `rigplan check` using what it wrote.
#   bash bench/record_calibrate.sh [JOB...]   extra probe jobs (calibration/probe.py form) run afterwards,
#                                             rows in $OUT/runs_extra.jsonl
set -uo pipefail
source bench/gpu_setup.sh
export RIGPLAN_HOME="$OUT/home"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/nvidia-smi.txt"
start=$SECONDS
python3 -m rigplan calibrate >"$OUT/calibrate.txt" 2>"$OUT/calibrate.err"
echo "calibrate exit $? after $((SECONDS - start)) s" | tee -a "$OUT/calibrate.txt"
tail -c 3000 "$OUT/calibrate.txt"; tail -c 1500 "$OUT/calibrate.err"
python3 -m rigplan check llama-3.1-8b >"$OUT/check.txt" 2>&1; cat "$OUT/check.txt"
# Extra jobs (full-depth validation runs the calibration never saw), each in its own process, so that its
# memory is that of a clean start: a job measured after another in one process (validate-d.jsonl) came out
# 0.3-1.0 GiB below the same QLoRA shape started clean, more than the leftover the fit subtracts. They run
# until 575 s into the call (the device tool stops a call at 600 s; EXTRA_TIMEOUT_S overrides).
# $OUT brings back 8 files at most: calibrate.txt/.err, check.txt, nvidia-smi.txt, calibration.json,
# runs_extra.jsonl, log_extra.txt (pip's log stays in /tmp).
cp "$OUT/home/h100-sxm.json" "$OUT/calibration.json" && rm -rf "$OUT/home"
if [ $# -gt 0 ]; then
  echo "== extra jobs from ${SECONDS}s"
  deadline=$((SECONDS + ${EXTRA_TIMEOUT_S:-$((575 - SECONDS))}))
  for j in "$@"; do
    left=$((deadline - SECONDS)); [ $left -le 20 ] && { echo "   no time left for $j"; break; }
    timeout $left python3 -m rigplan.calibration.probe --job "$j" --out "$OUT/runs_extra.jsonl" >>"$OUT/log_extra.txt" 2>&1
    echo "   $j exit $? at ${SECONDS}s"
  done
  grep -c . "$OUT/runs_extra.jsonl"
fi
