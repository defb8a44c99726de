#!/usr/bin/env bash
# On the GPU machine with two H200s (device kind nvidia-h200-x2, carry .gpu): issue 16's DDP runs. For each method,
# `rigplan run --gpus 2` on a full-depth Llama-3.1-8B replica (the plan rigplan makes for two H200s), then the same
# per-GPU plan (micro-batch, accumulation, seq, optimizer) on one GPU through `rigplan run --gpus 1 --micro-batch`,
# one after the other, nothing else running. Data: bench/validation_data.py --examples ${EXAMPLES:-900} --seed
# ${SEED:-2} (data no earlier run saw). Predictions written before: bench/results/predictions/issue16-h200x2.json.
# EPOCHS (default 1): passes over the data in each run. e.g. EPOCHS=2 bash bench/record_ddp.sh lora qlora
# EXTRA: more `rigplan run` flags for both runs of a pair (e.g. EXTRA="--micro-batch 4 --grad-accum 2", or
# "--checkpointing unsloth"); TAG names the pair's files apart.
set -uo pipefail
source bench/gpu_setup.sh
LOG=$OUT/runs.log
ddp_setup || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >>$LOG
nvidia-smi topo -m >>$LOG 2>&1
for method in "$@"; do
  ddp=${TAG:-}ddp-$method one=${TAG:-}one-$method
  cmd="python3 -m rigplan run $DIR --data /tmp/data.jsonl --gpu h200 --gpus 2 --method $method --epochs ${EPOCHS:-1} --out /tmp/run-$ddp --eval-fraction 0 --save-steps 10000 ${EXTRA:-}"
  echo "== $ddp: $cmd" >>$LOG; t0=$SECONDS
  $cmd >>$LOG 2>&1
  echo "== $ddp exit $? after $((SECONDS - t0)) s" | tee -a $LOG
  [ -f /tmp/run-$ddp/run_summary.json ] || continue
  keep_ddp_run /tmp/run-$ddp $ddp "$cmd"
  mb=$(python3 -c "import json; p=json.load(open('/tmp/run-$ddp/plan.json')); print(p['micro_batch'], p['grad_accum'], p['checkpointing'], p['optimizer'])")
  read -r mbs ga ckpt optim <<< "$mb"
  cmd="python3 -m rigplan run $DIR --data /tmp/data.jsonl --gpu h200 --gpus 1 --method $method --micro-batch $mbs --grad-accum $ga --checkpointing $ckpt --optimizer $optim --epochs ${EPOCHS:-1} --out /tmp/run-$one --eval-fraction 0 --save-steps 10000 ${EXTRA:-}"
  echo "== $one: $cmd" >>$LOG; t0=$SECONDS
  CUDA_VISIBLE_DEVICES=0 $cmd >>$LOG 2>&1
  echo "== $one exit $? after $((SECONDS - t0)) s" | tee -a $LOG
  keep_ddp_run /tmp/run-$one $one "$cmd"
done
python3 - <<PY | tee -a $LOG
import json, os
for m in ("lora", "qlora"):
    try:
        runs = [json.load(open(f"{os.environ['OUT']}/${TAG:-}{k}-{m}.json")) for k in ("ddp", "one")]
        d, o = (r["measured"] for r in runs)
        print(m, "ddp / one GPU tokens/s:", round(d["tokens_per_s"] / o["tokens_per_s"], 3),
              "compiled:", round((d.get("tokens_per_s_compiled") or 0) / (o.get("tokens_per_s_compiled") or 1), 3),
              "first loss:", round(runs[0]["first_loss"] / runs[1]["first_loss"], 3), "(1: the same loss)",
              "ranks agree:", runs[0].get("ranks_agree"))
        print(m, "garbage collections while training (trainer/loop.py GcWatch): ddp", d.get("gc"), "one", o.get("gc"))
    except (OSError, KeyError) as e:
        print(m, "no pair:", e)
PY
# Where the DDP run's time went beyond one GPU's, from the step times (bench/ddp_jitter.py)
[ -z "${TAG:-}" ] && python3 bench/ddp_jitter.py $OUT "$@" 2>&1 | tee -a $LOG
