#!/usr/bin/env bash
# `rigplan calibrate` on the GPU machine (device tool), timed, then `rigplan check` using what it wrote.
#   bash bench/record_calibrate.sh [JOB...]   extra probe jobs (calibration/probe.py form) run afterwards,
#                                             rows in $OUT/runs_extra.jsonl
# Needs .gpu/site_bundle.tgz carried (bash ../shared/gpu/make-bundle.sh builds it).
set -uo pipefail
mkdir -p /tmp/site && tar xzf .gpu/site_bundle.tgz -C /tmp/site
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 RIGPLAN_HOME="$OUT/home"
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/pip.log" 2>&1 || { cat "$OUT/pip.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/nvidia-smi.txt"
start=$SECONDS
python3 -m rigplan calibrate >"$OUT/calibrate.txt" 2>"$OUT/calibrate.err"
echo "calibrate exit $? after $((SECONDS - start)) s" | tee -a "$OUT/calibrate.txt"
tail -c 3000 "$OUT/calibrate.txt"; tail -c 1500 "$OUT/calibrate.err"
python3 -m rigplan check llama-3.1-8b >"$OUT/check.txt" 2>&1; cat "$OUT/check.txt"
# Extra jobs (full-depth validation runs the calibration never saw) in one process: the probe records what
# each job starts with, and the fit and bench/accuracy.py subtract it.
if [ $# -gt 0 ]; then
  args=(); for j in "$@"; do args+=(--job "$j"); done
  echo "== extra jobs from ${SECONDS}s"
  timeout "${EXTRA_TIMEOUT_S:-540}" python3 -m rigplan.calibration.probe "${args[@]}" --out "$OUT/runs_extra.jsonl" >"$OUT/log_extra.txt" 2>&1
  echo "   exit $? at ${SECONDS}s"; grep -c . "$OUT/runs_extra.jsonl"
fi
