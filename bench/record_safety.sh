#!/usr/bin/env bash
# On the GPU machine (device tool, carry .gpu): `rigplan run`'s safety paths with Unsloth on a full-depth
# Llama-3.1-8B replica, for real rather than simulated (tests/test_run.py simulates them on CPU):
#   1. CUDA out-of-memory backoff: micro-batch 256 x 2048 tokens (estimate: 147 GiB on an 80 GB card, forced)
#      must halve until it fits (64: estimate 48 GiB) and finish its optimizer step.
#   2. SIGTERM mid-run: exit 143 with a checkpoint and a loadable adapter.
#   3. --resume from that checkpoint to a later step.
# `bash bench/record_safety.sh earlystop` instead runs 4. alone: eval and early stopping with Unsloth on a
# full-depth Llama-3.2-1B replica (examples drawn from 60 words, so eval loss bottoms out and the adapter then
# memorises), and re-scores the adapter it left with plain transformers + PEFT on the held-out rows.
# Logs, metrics and summaries go to $OUT (8 files at most come back).
set -uo pipefail
source bench/gpu_setup.sh
if [ "${1:-all}" = earlystop ]; then
  python3 - <<'PY'
import json, random
from pathlib import Path
from rigplan.calibration.replica import build_replica
from rigplan.profiles.catalog import resolve_model
build_replica(resolve_model("llama-3.2-1b"), Path("/dev/shm/llama1b"), device="cuda")
rng = random.Random(1)
Path("/tmp/memorise.jsonl").write_text("\n".join(json.dumps({"text": " ".join(
    f"w{rng.randrange(1000, 1060)}" for _ in range(rng.randint(12, 40)))}) for _ in range(240)) + "\n")
PY
  echo "== replica and data at ${SECONDS}s"
  timeout 300 python3 -m rigplan run /dev/shm/llama1b --data /tmp/memorise.jsonl --epochs 40 --lr 1e-3 \
    --eval-fraction 0.1 --save-steps 4 --patience 2 --out /tmp/es >"$OUT/earlystop.txt" 2>&1
  echo "== early-stop run exit $? at ${SECONDS}s"
  cp /tmp/es/run_summary.json "$OUT/earlystop-summary.json"; cp /tmp/es/metrics.jsonl "$OUT/earlystop-metrics.jsonl"
  python3 - <<'PY' >"$OUT/earlystop-rescore.json"
import json, torch
from pathlib import Path
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from rigplan.estimator.plan import Plan
from rigplan.trainer.engine import provenance
from rigplan.trainer.run import RunOptions, prepare_data
plan = Plan.from_json(Path("/tmp/es/plan.json").read_text())
opts = RunOptions(data=Path("/tmp/memorise.jsonl"), out_dir=Path("/tmp/unused"), eval_fraction=0.1)
rows = prepare_data(plan, AutoTokenizer.from_pretrained("/tmp/es/adapter"), opts).eval
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("/dev/shm/llama1b", dtype=torch.bfloat16,
                                                                       device_map="cuda"), "/tmp/es/adapter").eval()
total = count = 0.0
with torch.no_grad():  # one example at a time: no padding; the mean over all label tokens, as eval_loss
    for r in rows:
        ids = torch.tensor([r["input_ids"]], device="cuda")
        n = sum(x != -100 for x in r["labels"][1:])
        total += model(input_ids=ids, labels=torch.tensor([r["labels"]], device="cuda")).loss.item() * n
        count += n
evals = [(m["step"], m["eval_loss"]) for m in map(json.loads, open("/tmp/es/metrics.jsonl")) if "eval_loss" in m]
summary = json.loads(Path("/tmp/es/run_summary.json").read_text())
print(json.dumps({"status": summary["status"], "global_step": summary["global_step"], "evals": evals,
                  "best": min(evals, key=lambda e: e[1]), "last": evals[-1], "adapter_rescored_loss": total / count,
                  "eval_examples": len(rows), "provenance": provenance()}, indent=2))
PY
  cat "$OUT/earlystop-rescore.json" | head -c 3000
  exit 0
fi
python3 - <<'PY'
import sys; sys.path.insert(0, "bench")
from pathlib import Path
from train_throughput import make_data
from rigplan.calibration.replica import build_replica
from rigplan.profiles.catalog import resolve_model
build_replica(resolve_model("llama-3.1-8b"), Path("/dev/shm/llama8b"), device="cuda")
make_data(Path("/tmp/long.jsonl"), 300, (2000, 2000))
make_data(Path("/tmp/varied.jsonl"), 400, (256, 2000), seed=1)
PY
echo "== replica and data at ${SECONDS}s"
timeout 240 python3 -m rigplan run /dev/shm/llama8b --data /tmp/long.jsonl --batch 256 --grad-accum 1 --seq 2048 \
  --force --max-steps 1 --eval-fraction 0 --out /tmp/oom >"$OUT/oom.txt" 2>&1
echo "== oom run exit $? at ${SECONDS}s"; cat /tmp/oom/metrics.jsonl >"$OUT/oom-metrics.jsonl"
cp /tmp/oom/run_summary.json "$OUT/oom-summary.json"
timeout -s TERM 110 python3 -m rigplan run /dev/shm/llama8b --data /tmp/varied.jsonl --save-steps 2 --eval-fraction 0 \
  --out /tmp/term >"$OUT/term.txt" 2>&1
echo "== sigterm run exit $? at ${SECONDS}s"; ls /tmp/term /tmp/term/adapter 2>&1 | head -30
step=$(python3 -c "import json; print(json.load(open('/tmp/term/run_summary.json'))['global_step'])")
timeout 150 python3 -m rigplan run /dev/shm/llama8b --data /tmp/varied.jsonl --save-steps 2 --eval-fraction 0 \
  --out /tmp/term --resume --max-steps $((step + 2)) >"$OUT/resume.txt" 2>&1
echo "== resume run (from step $step) exit $? at ${SECONDS}s"
cp /tmp/term/run_summary.json "$OUT/resume-summary.json"; cat /tmp/term/metrics.jsonl >"$OUT/term-metrics.jsonl"
