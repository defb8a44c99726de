#!/usr/bin/env bash
# On the GPU machine (device tool, carry .gpu): `rigplan run` against its own plan on a full-depth Llama-3.1-8B
# replica (issue 14). Data: bench/validation_data.py, 600 Alpaca examples of 60-1500 words (lognormal, seed 0).
# Each case is a fresh `rigplan run` process; the plan it prints and writes (run_summary.json's "predicted") is
# made before training starts. Cases (several per call):
#   h200-lora, h200-qlora      the plan rigplan makes for the local H200
#   4090-lora, 4090-qlora      the plan it makes for an RTX 4090, run with the process capped at 24 GiB
#                              (bench/capped.py: torch.cuda.set_per_process_memory_fraction)
#   h200-lora+packed           a case with a layout override (rigplan run --batching packed)
# Env: EXAMPLES, SEED (the data), STEPS_4090, EXTRA (more rigplan run flags, e.g. "--epochs 2"), BARE=1 (below)
# e.g. bash bench/record_h200_runs.sh h200-lora h200-qlora 4090-lora 4090-qlora
set -uo pipefail
source bench/gpu_setup.sh
MODEL=${MODEL:-llama-3.1-8b}
DIR=/tmp/replica-$MODEL
if [ ! -f $DIR/config.json ]; then
  python3 -c "
from rigplan.calibration.replica import build_replica, reduced
from rigplan.profiles.catalog import resolve_model
import os
layers = os.environ.get('LAYERS')
build_replica(reduced(resolve_model('$MODEL'), int(layers) if layers else None), '$DIR', device='cuda')" || exit 1
fi
LOG=$OUT/runs.log
python3 bench/validation_data.py --out /tmp/data.jsonl --examples ${EXAMPLES:-600} --seed ${SEED:-0} | tee -a $LOG
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >>$LOG
for case in "$@"; do
  gpu=${case%%-*}; method=${case#*-}; layout=
  case "$method" in *+*) layout="--batching ${method#*+}"; method=${method%%+*} ;; esac
  case "$gpu" in
    h200) cmd=(python3 -m rigplan run $DIR --data /tmp/data.jsonl --gpu h200 --method $method) ;;
    4090) cmd=(python3 bench/capped.py 24 run $DIR --data /tmp/data.jsonl --gpu rtx-4090 --method $method
               --max-steps ${STEPS_4090:-10}) ;;
    *) cmd=(python3 -m rigplan run $DIR --data /tmp/data.jsonl --gpu $gpu --method $method) ;;
  esac
  name=${TAG:-}${case/+/_}
  cmd+=(--out /tmp/run-$name --eval-fraction 0 --save-steps 10000 $layout ${EXTRA:-})
  echo "== $case: ${cmd[*]}" >>$LOG
  t0=$SECONDS
  "${cmd[@]}" >>$LOG 2>&1
  echo "== $case exit $? after $((SECONDS - t0)) s" | tee -a $LOG
  if [ -f /tmp/run-$name/run_summary.json ]; then
    python3 bench/keep_run.py /tmp/run-$name $OUT/$name.json "${cmd[*]}" \
      "python3 bench/validation_data.py --out data.jsonl --examples ${EXAMPLES:-600} --seed ${SEED:-0}" | tee -a $LOG
  fi
done
# BARE=1: then the bare Unsloth loop (calibration/probe.py) at the H200 LoRA plan's shape, in the same call, as the
# reference issue 14 compares the run with (the same tokens per micro-batch and checkpointing).
if [ "${BARE:-0}" = 1 ] && [ -f /tmp/run-${TAG:-}h200-lora/plan.json ]; then
  shape=$(python3 -c "import json; p=json.load(open('/tmp/run-${TAG:-}h200-lora/plan.json')); print(f\"{p['micro_batch']}x{p['seq_len']}:checkpointing={p['checkpointing']}\")")
  t0=$SECONDS
  python3 -m rigplan.calibration.probe --job "$MODEL:lora:16:$shape" --out $OUT/bare-lora.jsonl >$OUT/bare.log 2>&1
  echo "== bare-lora ($shape) exit $? after $((SECONDS - t0)) s" | tee -a $LOG
fi
