#!/usr/bin/env bash
# Records real training-step measurements on the GPU machine (device tool): one process per job, because
# a job run after another in the same process starts with 0.1-0.7 GiB the earlier one left allocated.
#   bash bench/record_runs.sh GROUP...      (groups below; rows land in $OUT/runs_GROUP.jsonl)
#   MIN_TIMED_S=20 bash bench/record_runs.sh hostbound   (time each shape at least 20 s after warm-up)
# Unsloth compiles each decoder block; a new batch size costs 15-40 s in its warm-up step, batch 1 is its
# own specialisation, so shapes are ordered to recompile once.
set -uo pipefail
source bench/gpu_setup.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/nvidia-smi.txt"
declare -A JOBS
JOBS[small]="llama-3.2-1b:qlora:64:2x2048,8x2048,4x4096
llama-3.2-3b:qlora:32:2x2048,4x4096,8x2048
llama-3.2-3b:lora:8:2x4096,8x2048"
JOBS[big]="llama-3.1-8b:qlora:128:2x2048,4x4096,2x16384"
JOBS[validate]="qwen2.5-7b:lora:16:2x2048,4x4096
qwen2.5-7b:qlora:32:8x2048,2x8192
mistral-7b:lora:32:4x2048,2x8192
mistral-7b:qlora:16:2x4096,16x2048"
JOBS[short]="llama-3.2-1b:lora:16:1x2048,2x2048,4x2048,8x2048
llama-3.2-1b:qlora:64:2x2048,4x2048
llama-3.2-1b:lora:16:4x2048,2x4096:checkpointing=off:optimizer=adamw_torch
llama-3.2-3b:lora:8:1x4096,2x2048
llama-3.1-8b:lora:16:1x2048,2x2048"
JOBS[depthq]="llama-3.1-8b@2:qlora:16:2x2048,4x4096"
JOBS[mistralfix]="mistral-7b:lora:32:2x8192,4x2048"
JOBS[depth]="llama-3.1-8b@2:lora:16:2x2048,4x4096
llama-3.1-8b@2:qlora:16:2x2048,4x4096"
# Host-bound shapes re-timed over a longer window (MIN_TIMED_S=20): timed over 3 s their medians scattered by
# 16-19% against one floor (bench/accuracy.py), with p10-p90 of single runs 0.27-0.41 s.
JOBS[hostbound]="llama-3.2-1b:lora:16:1x2048,2x2048
llama-3.2-3b:lora:8:1x4096,2x2048
llama-3.1-8b:lora:16:1x2048
llama-3.1-8b:qlora:16:1x2048"
# QLoRA's extra floor against the width of a layer, LoRA beside it on one host: a 1B layer holds 0.06 billion
# 4-bit weights, an 8B one 0.22, a 70B one 0.86 (MIN_TIMED_S=15: the differences are a few ms a step).
JOBS[width]="llama-3.2-1b:lora:16:1x512,1x1024
llama-3.2-1b:qlora:16:1x512,1x1024
llama-3.1-70b@8:lora:16:1x512,1x1024
llama-3.1-70b@8:qlora:16:1x512,1x1024
llama-3.1-8b@8:lora:16:1x512,1x1024
llama-3.1-8b@8:qlora:16:1x512,1x1024"
# Where a small shape's memory peak comes from (first step or later ones; forward, backward or optimizer):
# the 'width' runs found ~0.2 GiB above the estimate at 1B 1x512, flat from 512 to 1024 tokens.
JOBS[memfloor]="llama-3.2-1b:lora:16:1x256,1x512,1x1024,1x2048
llama-3.2-1b:qlora:16:1x256,1x512,1x1024,1x2048
llama-3.1-8b@8:qlora:16:1x512,1x1024
llama-3.1-8b@8:lora:16:1x1024"
# Held-out check of the memory terms refitted on 2026-11-23 (loss tile, dequantized copy) on families and
# vocabularies the small shapes were not fitted on: Qwen2.5 (152k), Phi-3.5 (32k, Unsloth's generic path).
# The predictions were written before the run: bench/results/h100-heldout/predictions.json.
JOBS[heldout]="qwen2.5-7b@8:qlora:16:1x256,1x512,1x2048
qwen2.5-7b@8:lora:16:1x512,1x2048
phi-3.5-mini@8:lora:16:1x512,1x2048
qwen3-8b@8:qlora:16:1x512,1x2048"
for g in "$@"; do
  while read -r j; do
    [ -n "$j" ] || continue
    echo "== $g: $j"
    python3 -m rigplan.calibration.probe --job "$j" --out "$OUT/runs_$g.jsonl" ${MIN_TIMED_S:+--min-timed-s $MIN_TIMED_S} \
      >>"$OUT/log_$g.txt" 2>&1
    echo "   exit $? after ${SECONDS}s"
  done <<<"${JOBS[$g]}"
done
