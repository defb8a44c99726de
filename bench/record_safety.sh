#!/usr/bin/env bash
# On the GPU machine (device tool, carry .gpu): `rigplan run`'s safety paths with Unsloth on a full-depth
# Llama-3.1-8B replica, for real rather than simulated (tests/test_run.py simulates them on CPU):
#   1. CUDA out-of-memory backoff: micro-batch 256 x 2048 tokens (estimate: 147 GiB on an 80 GB card, forced)
#      must halve until it fits (64: estimate 48 GiB) and finish its optimizer step.
#   2. SIGTERM mid-run: exit 143 with a checkpoint and a loadable adapter.
#   3. --resume from that checkpoint to a later step.
# Logs, metrics and summaries go to $OUT (8 files at most come back).
set -uo pipefail
mkdir -p /tmp/site && tar xzf .gpu/site_bundle.tgz -C /tmp/site
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/tmp/pip.log 2>&1 || { cat /tmp/pip.log; exit 1; }
python3 - <<'PY'
import sys; sys.path.insert(0, "bench")
from pathlib import Path
from train_throughput import make_data
from rigplan.calibration.replica import build_replica
from rigplan.profiles.catalog import resolve_model
build_replica(resolve_model("llama-3.1-8b"), Path("/dev/shm/llama8b"), device="cuda")
make_data(Path("/tmp/long.jsonl"), 300, (2000, 2000))
make_data(Path("/tmp/varied.jsonl"), 400, (256, 2000), seed=1)
PY
echo "== replica and data at ${SECONDS}s"
timeout 240 python3 -m rigplan run /dev/shm/llama8b --data /tmp/long.jsonl --batch 256 --grad-accum 1 --seq 2048 \
  --force --max-steps 1 --eval-fraction 0 --out /tmp/oom >"$OUT/oom.txt" 2>&1
echo "== oom run exit $? at ${SECONDS}s"; cat /tmp/oom/metrics.jsonl >"$OUT/oom-metrics.jsonl"
cp /tmp/oom/run_summary.json "$OUT/oom-summary.json"
timeout -s TERM 110 python3 -m rigplan run /dev/shm/llama8b --data /tmp/varied.jsonl --save-steps 2 --eval-fraction 0 \
  --out /tmp/term >"$OUT/term.txt" 2>&1
echo "== sigterm run exit $? at ${SECONDS}s"; ls /tmp/term /tmp/term/adapter 2>&1 | head -30
step=$(python3 -c "import json; print(json.load(open('/tmp/term/run_summary.json'))['global_step'])")
timeout 150 python3 -m rigplan run /dev/shm/llama8b --data /tmp/varied.jsonl --save-steps 2 --eval-fraction 0 \
  --out /tmp/term --resume --max-steps $((step + 2)) >"$OUT/resume.txt" 2>&1
echo "== resume run (from step $step) exit $? at ${SECONDS}s"
cp /tmp/term/run_summary.json "$OUT/resume-summary.json"; cat /tmp/term/metrics.jsonl >"$OUT/term-metrics.jsonl"
