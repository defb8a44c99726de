#!/usr/bin/env bash
# On the GPU machine (device tool, carry .gpu): issue 17's longest context. For Llama-3.1-8B at rank 32, LoRA and
# QLoRA, `rigplan check --max-seq` gives the longest sequence a card trains at micro-batch 1; this trains that
# shape (full depth, calibration/probe.py through Unsloth, the plan's checkpointing) in a process capped to the
# card's memory (bench/capped.py: torch.cuda.set_per_process_memory_fraction), and prints measured against planned.
# Predictions written before: bench/results/predictions/max-seq-h200.json (the same check JSON, with commit and date).
#   bash bench/record_max_seq.sh [CARD ...]   (rtx-4090 = 24 GB, rtx-a6000 = 48 GB; default both; METHODS="qlora"
#   for one method)
set -uo pipefail
source bench/gpu_setup.sh
cards=("$@"); [ $# -gt 0 ] || cards=(rtx-4090 rtx-a6000)
for card in "${cards[@]}"; do
  python3 -m rigplan check llama-3.1-8b --gpu $card --max-seq --rank 32 --json > $OUT/check-$card.json || exit 1
  for method in ${METHODS:-lora qlora}; do
    read -r seq ckpt cap < <(python3 -c "
import json; d = json.load(open('$OUT/check-$card.json')); p = d['plans']['$method']
print(d['max_seq']['$method'], p['checkpointing'], d['gpu_memory_gib'])")
    t0=$SECONDS
    python3 bench/capped.py $cap -m rigplan.calibration.probe --job "llama-3.1-8b:$method:32:1x$seq:checkpointing=$ckpt" \
      --out $OUT/maxseq-$card-$method.jsonl > $OUT/maxseq-$card-$method.log 2>&1
    echo "== $card $method 1 x $seq ($ckpt, capped at $cap GiB) exit $? after $((SECONDS - t0)) s"
    python3 -c "
import json
p = json.load(open('$OUT/check-$card.json'))['plans']['$method']
r = [json.loads(l) for l in open('$OUT/maxseq-$card-$method.jsonl')][-1]
print('planned', p['peak_reserved_gib'], 'measured', r.get('peak_reserved_gib'), 'err', r.get('err'))" 2>&1
  done
done
