#!/usr/bin/env bash
# On the GPU machine (device tool, carry .gpu), after bench/record_h200_runs.sh: the references issue 14 compares
# `rigplan run` with, for the H200's own LoRA and QLoRA plans on the same 600 long-tailed examples:
#   hf-<method>    the plain transformers + PEFT baseline (bench/train_throughput.py --parts hf-plain: micro-batches
#                  of examples in random order padded to the longest, as plain TRL trains, transformers' own loss
#                  over full logits), on the same data and plan settings. The 2026-11-30 records used rigplan's
#                  length-sorted groups instead (--baseline-batching padded), a faster baseline.
#   bare-<method>  the bare Unsloth loop on fixed shapes with the plan's tokens per micro-batch and checkpointing
#                  (calibration/probe.py: micro_batch x seq_len random ids, forward + backward + AdamW 8-bit)
# Env: EXAMPLES, SEED (the data, default 600 and 0), HF_STEPS (default 15), BARE=0 leaves the bare loop out, REPLICA=DIR
# reuses a full-depth replica already built (bench/record_h200_runs.sh's /tmp/replica-llama-3.1-8b).
# e.g. bash bench/record_h200_compare.sh lora qlora
set -uo pipefail
source bench/gpu_setup.sh
python3 bench/validation_data.py --out /tmp/data-compare.jsonl --examples ${EXAMPLES:-600} --seed ${SEED:-0} >/dev/null
LOG=$OUT/compare.log
for method in "$@"; do
  out=/tmp/tp-$method
  mkdir -p $out
  [ -n "${REPLICA:-}" ] && [ ! -e $out/model ] && ln -s $REPLICA $out/model
  [ -d /tmp/tp-lora/model ] && [ ! -e $out/model ] && ln -s /tmp/tp-lora/model $out/model
  t0=$SECONDS
  python3 bench/train_throughput.py --model llama-3.1-8b --method $method --plan-gpu h200 --data-file /tmp/data-compare.jsonl \
    --steps ${HF_STEPS:-15} --parts hf-plain --out $out >>$LOG 2>&1
  echo "== hf-$method exit $? after $((SECONDS - t0)) s" | tee -a $LOG
  cp $out/train_throughput.json $OUT/hf-$method.json 2>/dev/null
  tail -c 3000 $out/log-hf-plain.txt >>$LOG 2>/dev/null
  [ "${BARE:-1}" = 0 ] && continue
  shape=$(python3 -c "import json; p=json.load(open('$out/plan.json')); print(f\"{p['micro_batch']}x{p['seq_len']}:checkpointing={p['checkpointing']}\")")
  t0=$SECONDS
  python3 -m rigplan.calibration.probe --job "llama-3.1-8b:$method:16:$shape" --out $OUT/bare-$method.jsonl >>$LOG 2>&1
  echo "== bare-$method ($shape) exit $? after $((SECONDS - t0)) s" | tee -a $LOG
  python3 -c "
import json
r = [json.loads(l) for l in open('$OUT/bare-$method.jsonl')][-1]
print('bare-$method', r.get('batch'), r.get('seq'), 'tok/s', r.get('tok_per_s'), 'reserved', r.get('peak_reserved_gib'), 'err', r.get('err'))
h = json.load(open('$OUT/hf-$method.json'))['results']['hf-plain']
print('hf-$method', 'tok/s', h.get('tokens_per_s'), 'reserved', h.get('peak_reserved_gib'), h.get('error', '')[-300:])
" 2>&1 | tee -a $LOG
done
