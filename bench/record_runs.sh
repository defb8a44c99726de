#!/usr/bin/env bash
# Records real training-step measurements on the GPU machine (device tool), one probe process per group.
#   bash bench/record_runs.sh GROUP...      (groups below; rows land in $OUT/runs_GROUP.jsonl)
# Needs .gpu/site_bundle.tgz carried (bash ../shared/gpu/make-bundle.sh builds it).
set -uo pipefail
mkdir -p /tmp/site && tar xzf .gpu/site_bundle.tgz -C /tmp/site
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/pip.log" 2>&1 || { cat "$OUT/pip.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/nvidia-smi.txt"
declare -A JOBS
JOBS[small]="llama-3.2-1b:lora:16:1x2048,4x2048,8x2048,2x8192
llama-3.2-1b:qlora:64:2x2048,8x2048,1x16384
llama-3.2-1b:lora:16:4x2048,2x4096:checkpointing=off:optimizer=adamw_torch
llama-3.2-3b:qlora:32:2x2048,4x4096,1x16384
llama-3.2-3b:lora:8:1x4096,8x2048,16x1024"
JOBS[big]="llama-3.1-8b:lora:64:2x4096,8x2048,1x16384
llama-3.1-8b:qlora:128:2x2048,4x4096,1x32768
llama-3.1-8b@4:lora:16:1x2048,4x2048,1x8192
llama-3.1-8b@8:qlora:16:1x2048,4x2048,1x8192"
JOBS[validate]="qwen2.5-7b:lora:16:2x2048,4x4096
qwen2.5-7b:qlora:32:8x2048,1x16384
mistral-7b:lora:32:4x2048,1x8192
mistral-7b:qlora:16:2x4096,16x2048"
for g in "$@"; do
  args=()
  while read -r j; do [ -n "$j" ] && args+=(--job "$j"); done <<<"${JOBS[$g]}"
  echo "== group $g: ${args[*]}"
  python3 -m rigplan.calibration.probe "${args[@]}" --out "$OUT/runs_$g.jsonl" 2>&1 | tee "$OUT/log_$g.txt" \
    | grep -vE 'Warning|warn\(|^\s*$' | tail -n 40
done
