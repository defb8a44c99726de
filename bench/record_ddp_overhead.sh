#!/usr/bin/env bash
# On the GPU machine with two H200s (device kind nvidia-h200-x2, carry .gpu): where a DDP step's extra time goes
# (issue 16; bench/ddp_overhead.py). One GPU alone, then both under torchrun, on a full-depth Llama-3.1-8B replica,
# LoRA 8 x 1280 (the per-GPU shape of the two-H200 plan). Hypotheses written before:
# bench/results/predictions/ddp-overhead-h200x2.json.   METHOD=qlora for QLoRA.
set -uo pipefail
source bench/gpu_setup.sh
DIR=/tmp/replica-llama-3.1-8b
replica_8b || exit 1
LOG=$OUT/ddp-overhead.log
M=${METHOD:-lora}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv >>$LOG
CUDA_VISIBLE_DEVICES=0 python3 bench/ddp_overhead.py --model-dir $DIR --method $M --out $OUT/one-$M.jsonl >>$LOG 2>&1
echo "== one exit $?" >>$LOG
torchrun --standalone --nproc-per-node=2 bench/ddp_overhead.py --model-dir $DIR --method $M --out $OUT/two-$M >>$LOG 2>&1
echo "== two exit $?" >>$LOG
grep '^{"variant\|^== ' $LOG
