#!/usr/bin/env bash
# On the GPU machine (device tool, carry .gpu): bench/train_throughput.py for LoRA (rigplan, HF baseline, bare
# Unsloth) and QLoRA (rigplan), on a full-depth Llama-3.1-8B replica and 500 generated examples.
# Big files (replica, checkpoints, adapters) stay in /tmp; JSON and logs go to $OUT.
set -uo pipefail
mkdir -p /tmp/site && tar xzf .gpu/site_bundle.tgz -C /tmp/site
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
# pip's log stays in /tmp: $OUT brings back 8 files at most, and the runs below fill them
python3 -m pip install -q --no-deps --no-build-isolation -e . >/tmp/pip.log 2>&1 || { cat /tmp/pip.log; exit 1; }
run() {  # name, seconds, args...
  local name=$1 secs=$2; shift 2
  timeout "$secs" python3 bench/train_throughput.py --out /tmp/$name "$@" >"$OUT/$name.log" 2>&1
  echo "== $name exit $? after ${SECONDS}s"
  cp /tmp/$name/train_throughput.json "$OUT/$name.json" 2>/dev/null
  for p in rigplan hf bare; do [ -f /tmp/$name/log-$p.txt ] && tail -c 3000 /tmp/$name/log-$p.txt >"$OUT/$name-$p.tail.txt"; done
  tail -n 6 "$OUT/$name.log"
}
case "${1:-short}" in
  short)  # 121-token examples (bench/results/h100-tp-*-121tok.json)
    run tp-lora 330 --model llama-3.1-8b --method lora --examples 500 --steps 20 --words 120
    run tp-qlora 200 --model llama-3.1-8b --method qlora --examples 500 --steps 20 --words 120 --parts rigplan ;;
  long)   # 2001-token examples
    run tp2-lora 480 --model llama-3.1-8b --method lora --examples 500 --steps 8 --words 2000 ;;
esac
