#!/usr/bin/env bash
# On the GPU machine with two H200s (device kind nvidia-h200-x2, carry .gpu): issue 16's out-of-memory backoff under
# DDP. The full-depth Llama-3.1-8B replica, the plan `rigplan plan --gpu h200 --gpus 2` makes for the data of
# bench/record_ddp.sh, trained one epoch (54 steps; MAX_STEPS to cut it) under torchrun with process 1's GPU alone held
# to CAP (default 40) GiB, below the plan's per-GPU peak (bench/capped.py, CAP_RANK=1): process 1 runs out at the first
# micro-batch that pads past about 840 tokens and splits it, every process takes the split STOP_LAG_STEPS later
# (trainer/loop.py), and the run goes on.
# Predictions written before: bench/results/predictions/ddp-oom-backoff-h200x2.json.
#   bash bench/record_ddp_oom.sh lora
set -uo pipefail
source bench/gpu_setup.sh
LOG=$OUT/oom.log
ddp_setup || exit 1
for method in "${@:-lora}"; do
  name=ddp-oom-$method out=/tmp/run-ddp-oom-$method
  rm -rf $out
  python3 -m rigplan plan $DIR --data /tmp/data.jsonl --gpu h200 --gpus 2 --method $method \
    --out /tmp/plan-$name.json >>$LOG 2>&1 || { tail -5 $LOG; continue; }
  cmd="torchrun --standalone --nproc-per-node=2 bench/capped.py ${CAP:-40} run /tmp/plan-$name.json --data /tmp/data.jsonl --gpus 2 --out $out --max-steps ${MAX_STEPS:--1} --eval-fraction 0 --save-steps 10000"
  echo "== $name (CAP_RANK=1): $cmd" >>$LOG; t0=$SECONDS
  CAP_RANK=1 timeout 500 $cmd >>$LOG 2>&1
  echo "== $name exit $? after $((SECONDS - t0)) s" | tee -a $LOG
  keep_ddp_run $out $name "CAP_RANK=1 $cmd"
  grep -E "out of memory|capped at|destroy_process_group" $LOG | tail -6
  python3 -c "
import json; s = json.load(open('$out/run_summary.json'))
print('$name', s['status'], s['global_step'], 'backoffs', s['oom_backoffs'], 'ranks agree', s.get('ranks_agree'),
      'reserved (largest of the GPUs)', s['measured']['peak_reserved_gib'], 'planned', s['predicted']['peak_reserved_gib'])
" 2>&1 | tee -a $LOG
done
