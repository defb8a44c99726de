#!/usr/bin/env bash
# On the GPU machine (device tool, carry .gpu): issue 17's pre-quantized checkpoints. A full-depth Llama-3.1-8B
# replica is quantized to bitsandbytes NF4 (double quantization, bf16 compute, as Unsloth's `-bnb-4bit` copies) and
# saved, so that its config.json carries the quantization_config a downloaded copy has; then `rigplan run` trains
# QLoRA from that pre-quantized folder and from the 16-bit one with the same plan (micro-batch, accumulation, seq),
# one after the other, STEPS (default 20) optimizer steps each: peak memory and tokens/s against the plan's, which
# counts the two alike. Data: bench/validation_data.py --examples ${EXAMPLES:-300} --seed ${SEED:-7}.
# Predictions written before: bench/results/predictions/prequantized-h200.json.
#   bash bench/record_prequantized.sh
set -uo pipefail
source bench/gpu_setup.sh
DIR=/tmp/replica-llama-3.1-8b
Q=/tmp/replica-llama-3.1-8b-bnb-4bit
[ -f $DIR/config.json ] || python3 -c "
from rigplan.calibration.replica import build_replica
from rigplan.profiles.catalog import resolve_model
build_replica(resolve_model('llama-3.1-8b'), '$DIR', device='cuda')" || exit 1
[ -f $Q/config.json ] || python3 -c "
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', bnb_4bit_use_double_quant=True,
                       bnb_4bit_compute_dtype=torch.bfloat16)
model = AutoModelForCausalLM.from_pretrained('$DIR', quantization_config=q, dtype=torch.bfloat16, device_map={'': 0})
model.save_pretrained('$Q')
AutoTokenizer.from_pretrained('$DIR').save_pretrained('$Q')" || exit 1
LOG=$OUT/runs.log
DATA="--examples ${EXAMPLES:-300} --seed ${SEED:-7}"
python3 bench/validation_data.py --out /tmp/data-q.jsonl $DATA | tee -a $LOG
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >>$LOG
du -sh $DIR $Q >>$LOG
keep() {  # the run's summary with its plan, command and data command, as $OUT/$1.json
  python3 bench/keep_run.py /tmp/run-$1 $OUT/$1.json "$2" "python3 bench/validation_data.py --out data.jsonl $DATA" | tee -a $LOG
}
cmd="python3 -m rigplan run $Q --data /tmp/data-q.jsonl --gpu h200 --method qlora --out /tmp/run-prequantized --max-steps ${STEPS:-20} --eval-fraction 0 --save-steps 10000"
echo "== prequantized: $cmd" >>$LOG; t0=$SECONDS
$cmd >>$LOG 2>&1
echo "== prequantized exit $? after $((SECONDS - t0)) s" | tee -a $LOG
[ -f /tmp/run-prequantized/run_summary.json ] || { tail -c 3000 $LOG; exit 1; }
keep prequantized "$cmd"
read -r mb ga < <(python3 -c "import json; p=json.load(open('/tmp/run-prequantized/plan.json')); print(p['micro_batch'], p['grad_accum'])")
cmd="python3 -m rigplan run $DIR --data /tmp/data-q.jsonl --gpu h200 --method qlora --micro-batch $mb --grad-accum $ga --out /tmp/run-quantized-on-load --max-steps ${STEPS:-20} --eval-fraction 0 --save-steps 10000"
echo "== quantized-on-load: $cmd" >>$LOG; t0=$SECONDS
$cmd >>$LOG 2>&1
echo "== quantized-on-load exit $? after $((SECONDS - t0)) s" | tee -a $LOG
[ -f /tmp/run-quantized-on-load/run_summary.json ] && keep quantized-on-load "$cmd"
