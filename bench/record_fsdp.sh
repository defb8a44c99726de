#!/usr/bin/env bash
# On the GPU machine with two H200s (device kind nvidia-h200-x2, carry .gpu): issue 16's sharded run. The
# Llama-3.1-70B architecture at full width and LAYERS (default 8) layers, random weights, QLoRA sharded over the two
# GPUs with FSDP2 (transformers + PEFT + bitsandbytes, quant storage bf16), each process capped at 24 GiB
# (bench/capped.py, torch.cuda.set_per_process_memory_fraction) to stand for two RTX 4090s. The plan is the one
# rigplan makes for two RTX 4090s (`rigplan plan --gpu rtx-4090 --gpus 2`) with the sharding asked for
# (--parallelism fsdp: at reduced depth each GPU could hold the model whole), trained under torchrun; MAX_STEPS
# (default 10) optimizer steps. Two depths check the per-layer terms: LAYERS=8 and LAYERS=16.
# Predictions written before: bench/results/predictions/fsdp-70b-4090x2.json.
#   LAYERS=8 bash bench/record_fsdp.sh qlora lora; LAYERS=16 bash bench/record_fsdp.sh qlora lora
# GPU and CAP (GiB) plan for and stand for another card, e.g. GPU=rtx-a6000 CAP=48 (predictions/fsdp-lora-a6000x2.json).
# QLORA_CPU_LOAD=1: the 4-bit model loaded in CPU memory rather than whole onto each GPU (bench/capped.py); `rigplan
# run` itself now does so for a pre-quantized checkpoint (plan.load_on_cpu), which PREQUANTIZED=1 gives it.
# RESUME=1: 20 steps with a checkpoint every 10, stopped by SIGTERM once step 10's is complete, then `--resume` to
# step 20 (the stopped run's summary kept as NAME-resume-stopped.json).
# CPU_OFFLOAD=1: `rigplan run --cpu-offload`, the frozen weights kept in CPU memory (predictions/
# fsdp-qlora-offload-prequantized.json).
# PREQUANTIZED=1: the replica saved in bitsandbytes 4-bit first (NF4, storage bf16 so that FSDP shards it), so that
# loading it on the CPU (with QLORA_CPU_LOAD=1) reads 4-bit weights instead of quantizing on the CPU, which took
# 2.5-10 s a weight under torchrun (bench/results/README.md, the fifth session).
# DEPTH=80 (with PREQUANTIZED=1): the 4-bit LAYERS-layer replica deepened to DEPTH layers by repeating its layers
# (bench/deepen.py): the full-depth 70B in 4-bit (about 37 GiB) where the disk could not hold it in bf16 to quantize
# (predictions/fsdp-70b-full-depth-4090x2.json).
#   DEPTH=80 PREQUANTIZED=1 CPU_OFFLOAD=1 QLORA_CPU_LOAD=report bash bench/record_fsdp.sh qlora
# STORAGE=uint8 (with PREQUANTIZED=1): the 4-bit weights stored as bitsandbytes' default uint8, as Unsloth's
# `-bnb-4bit` copies are: FSDP2 shards them only through Unsloth's hook, which views them as bf16
# (trainer/engine.py require_float_storage; predictions/fsdp-uint8-prequantized.json).
# PREP_ONLY=1: build the replica (quantized, deepened as asked) and stop, so that a call can build it while the GPUs
# run other work and the next call trains on it.
set -uo pipefail
source bench/gpu_setup.sh
LAYERS=${LAYERS:-8}
GPU=${GPU:-rtx-4090}
CAP=${CAP:-24}
DIR=/tmp/replica-llama-3.1-70b-L$LAYERS
[ -f $DIR/config.json ] || python3 -c "
from rigplan.calibration.replica import build_replica, reduced
from rigplan.profiles.catalog import resolve_model
build_replica(reduced(resolve_model('llama-3.1-70b'), $LAYERS), '$DIR', device='cuda')" || exit 1
STORAGE=${STORAGE:-bfloat16}
if [ "${PREQUANTIZED:-0}" = 1 ]; then
  Q=$DIR-bnb-4bit; [ "$STORAGE" = bfloat16 ] || Q=$Q-$STORAGE
  [ -f $Q/config.json ] || python3 -c "
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', bnb_4bit_use_double_quant=True,
                       bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.$STORAGE)
model = AutoModelForCausalLM.from_pretrained('$DIR', quantization_config=q, dtype=torch.bfloat16, device_map={'': 0})
model.save_pretrained('$Q')
AutoTokenizer.from_pretrained('$DIR').save_pretrained('$Q')" || exit 1
  DIR=$Q
fi
if [ -n "${DEPTH:-}" ]; then
  [ -f $DIR-deep$DEPTH/config.json ] || python3 bench/deepen.py $DIR $DIR-deep$DEPTH $DEPTH || exit 1
  DIR=$DIR-deep$DEPTH
fi
[ "${PREP_ONLY:-0}" = 1 ] && { du -sh $DIR; exit 0; }
LOG=$OUT/fsdp.log
# As `rigplan run --gpus 2` gives its processes (trainer/distributed.py launch_env): the cores split between them,
# where torchrun alone would set one thread each.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / 2 ))}
DATA="--examples ${EXAMPLES:-300} --seed ${SEED:-5}"
python3 bench/validation_data.py --out /tmp/data-fsdp.jsonl $DATA | tee -a $LOG
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >>$LOG
for method in "${@:-qlora}"; do
  name=fsdp-L${DEPTH:-$LAYERS}-$method
  [ "$GPU" = rtx-4090 ] || name=$name-$GPU
  [ "${QLORA_CPU_LOAD:-0}" = 1 ] && name=$name-cpuload  # bench/capped.py: 4-bit weights loaded in CPU memory
  [ "${PREQUANTIZED:-0}" = 1 ] && name=$name-prequantized
  [ "$STORAGE" = bfloat16 ] || name=$name-$STORAGE
  offload=""; [ "${CPU_OFFLOAD:-0}" = 1 ] && { name=$name-offload; offload="--cpu-offload"; }
  out=/tmp/run-$name
  rm -rf $out
  # The plan for two of the card; at reduced depth each GPU could hold the model (DDP), so the sharding is asked for.
  python3 -m rigplan plan $DIR --data /tmp/data-fsdp.jsonl --gpu $GPU --gpus 2 --method $method \
    --out /tmp/plan-$name.json >>$LOG 2>&1 || { tail -5 $LOG; continue; }
  if [ "${RESUME:-0}" = 1 ]; then  # stopped by SIGTERM once step 10's checkpoint is complete, then --resume to 20
    name=$name-resume; out=/tmp/run-$name; rm -rf $out
    cmd="torchrun --standalone --nproc-per-node=2 bench/capped.py $CAP run /tmp/plan-$name.json --data /tmp/data-fsdp.jsonl --gpus 2 --parallelism fsdp --out $out --max-steps 20 --eval-fraction 0 --save-steps 10 $offload"
    cp /tmp/plan-${name%-resume}.json /tmp/plan-$name.json
    echo "== $name (to be stopped after step 10): $cmd" >>$LOG; t0=$SECONDS
    $cmd >>$LOG 2>&1 &
    launcher=$!
    until [ -f $out/checkpoints/checkpoint-10/rigplan_complete.json ] || ! kill -0 $launcher 2>/dev/null; do sleep 1; done
    kill -TERM $launcher 2>/dev/null; wait $launcher
    echo "== $name stopped: exit $? after $((SECONDS - t0)) s" | tee -a $LOG
    cp $out/run_summary.json $OUT/$name-stopped.json 2>/dev/null
    cmd="$cmd --resume"
  else
    cmd="torchrun --standalone --nproc-per-node=2 bench/capped.py $CAP run /tmp/plan-$name.json --data /tmp/data-fsdp.jsonl --gpus 2 --parallelism fsdp --out $out --max-steps ${MAX_STEPS:-10} --eval-fraction 0 --save-steps 10000 $offload"
  fi
  echo "== $name: $cmd" >>$LOG; t0=$SECONDS
  $cmd >>$LOG 2>&1
  echo "== $name exit $? after $((SECONDS - t0)) s" | tee -a $LOG
  [ -f $out/run_summary.json ] && python3 bench/keep_run.py $out $OUT/$name.json "$cmd" \
    "python3 bench/validation_data.py --out data.jsonl $DATA" | tee -a $LOG
done
tail -c 4000 $LOG
