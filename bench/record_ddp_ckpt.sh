#!/usr/bin/env bash
# On the GPU machine with two H200s (device kind nvidia-h200-x2, carry .gpu): DDP with Unsloth's gradient
# checkpointing, which the planner does not offer yet (estimator/planner.py SHARDINGS: DDP without checkpointing,
# from a bare DDP loop's memory). The user's case: Llama-3.1-8B 16-bit LoRA r16 on two RTX 4090s, where DDP without
# checkpointing does not fit and the plan falls back to FSDP on transformers + PEFT. The full-depth replica, the
# plan for two RTX 4090s overridden to DDP on Unsloth with its checkpointing, micro-batch 2 x 4 accumulation, each
# process capped at 24 GiB (bench/capped.py), one epoch (MAX_STEPS to cut it) so that the longest micro-batches come.
# Trainer: every micro-batch under DDP's no_sync, one gradient all-reduce per step (trainer/loop.py), so Unsloth's
# recomputing backward meets no DDP hook.
# Predictions written before: bench/results/predictions/ddp-checkpointing-4090x2.json.
set -uo pipefail
source bench/gpu_setup.sh
LOG=$OUT/ddp-ckpt.log
ddp_setup || exit 1
name=ddp-ckpt-4090x2-lora out=/tmp/run-$name
rm -rf $out
python3 -m rigplan plan $DIR --data /tmp/data.jsonl --gpu rtx-4090 --gpus 2 --method lora --rank 16 \
  --out /tmp/plan-$name.json >>$LOG 2>&1 || { tail -5 $LOG; exit 1; }
cmd="torchrun --standalone --nproc-per-node=2 bench/capped.py 24 run /tmp/plan-$name.json --data /tmp/data.jsonl --gpus 2 --parallelism ddp --engine unsloth --checkpointing unsloth --micro-batch 2 --grad-accum 4 --out $out --max-steps ${MAX_STEPS:--1} --eval-fraction 0 --save-steps 10000"
echo "== $name: $cmd" >>$LOG; t0=$SECONDS
timeout 500 $cmd >>$LOG 2>&1
echo "== $name exit $? after $((SECONDS - t0)) s" | tee -a $LOG
keep_ddp_run $out $name "$cmd"
grep -E "out of memory|capped at|Error|error" $LOG | tail -8
python3 -c "
import json; s = json.load(open('$out/run_summary.json'))
m = s['measured']
print('$name', s['status'], s['global_step'], 'ranks agree', s.get('ranks_agree'), 'reserved', m['peak_reserved_gib'],
      'planned', s['predicted']['peak_reserved_gib'], 'allocated', m['peak_allocated_gib'], 'planned',
      s['predicted']['peak_allocated_gib'], 'tok/s (capped H200, not a 4090)', m['tokens_per_s'])
" 2>&1 | tee -a $LOG
