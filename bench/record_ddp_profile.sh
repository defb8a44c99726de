#!/usr/bin/env bash
# On the GPU machine with two H200s (device kind nvidia-h200-x2, carry .gpu): where a step's time goes, one GPU and
# DDP, for issue 16's straggling (bench/ddp_jitter.py: one GPU's steps stray from their length's time by tens of
# milliseconds and each DDP step waits for the slower process; the garbage collector is ruled out). The full-depth
# 8B replica and record_ddp.sh's data and plan (LoRA, two epochs): one GPU with the DDP plan's per-GPU micro-batch,
# then DDP, each under torch's profiler for 8 steps of the second epoch (bench/profiled.py): $OUT/one/ and $OUT/ddp/
# hold each process's trace (Perfetto) and its operators by time. About 7 minutes.
#   bash bench/record_ddp_profile.sh             (METHOD=qlora: the QLoRA plan's)
set -uo pipefail
source bench/gpu_setup.sh
LOG=$OUT/profile.log
ddp_setup || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >>$LOG
METHOD=${METHOD:-lora}
python3 -m rigplan plan $DIR --data /tmp/data.jsonl --gpu h200 --gpus 2 --method $METHOD --epochs 2 \
  --out /tmp/plan-ddp-prof.json >>$LOG 2>&1 || { tail -5 $LOG; exit 1; }
read -r mbs ga ckpt optim <<< "$(python3 -c "import json; p = json.load(open('/tmp/plan-ddp-prof.json'))
print(p['micro_batch'], p['grad_accum'], p['checkpointing'], p['optimizer'])")"
common="--data /tmp/data.jsonl --eval-fraction 0 --save-steps 10000 --epochs 2"
echo "== one GPU (steps 150-157 profiled)" | tee -a $LOG; t0=$SECONDS
CUDA_VISIBLE_DEVICES=0 timeout 280 python3 bench/profiled.py 150 8 $OUT/one run $DIR --gpu h200 --gpus 1 --method $METHOD \
  --micro-batch $mbs --grad-accum $ga --checkpointing $ckpt --optimizer $optim --out /tmp/run-one-prof $common >>$LOG 2>&1
echo "== one GPU exit $? after $((SECONDS - t0)) s" | tee -a $LOG
echo "== DDP (steps 80-87 profiled)" | tee -a $LOG; t0=$SECONDS
timeout 280 torchrun --standalone --nproc-per-node=2 bench/profiled.py 80 8 $OUT/ddp run /tmp/plan-ddp-prof.json --gpus 2 \
  --out /tmp/run-ddp-prof $common >>$LOG 2>&1
echo "== DDP exit $? after $((SECONDS - t0)) s" | tee -a $LOG
ls -la $OUT/one $OUT/ddp | tee -a $LOG
