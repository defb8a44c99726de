# Sourced first by every bench/record_*.sh on the GPU machine (device tool, carry .gpu; ../shared/gpu/make-bundle.sh
# builds .gpu/site_bundle.tgz): Unsloth, bitsandbytes and TRL from the bundle, and rigplan installed editable,
# each once per machine; NCCL's NVLink multicast off for several GPUs (the device tool's KINDS.md).
[ -d /tmp/site/unsloth ] || { mkdir -p /tmp/site && tar xzf .gpu/site_bundle.tgz -C /tmp/site; }
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# pip's log stays in /tmp: $OUT brings back 8 files at most
[ -f /tmp/.rigplan-installed ] || { python3 -m pip install -q --no-deps --no-build-isolation -e . >/tmp/pip.log 2>&1 \
  && touch /tmp/.rigplan-installed; } || { cat /tmp/pip.log; exit 1; }
# The full-depth Llama-3.1-8B replica (random weights, calibration/replica.py) the DDP scripts train, written once
# per machine.
replica_8b() {
  [ -f /tmp/replica-llama-3.1-8b/config.json ] || python3 -c "
from rigplan.calibration.replica import build_replica
from rigplan.profiles.catalog import resolve_model
build_replica(resolve_model('llama-3.1-8b'), '/tmp/replica-llama-3.1-8b', device='cuda')"
}
# The DDP scripts' data (set LOG first): EXAMPLES (default 900) long-tailed examples of seed SEED (default 2) in
# /tmp/data.jsonl, with the replica above in $DIR; keep_ddp_run RUN_DIR NAME COMMAND keeps a run's summary, its
# command and the data's command as $OUT/NAME.json (bench/keep_run.py).
ddp_setup() {
  DIR=/tmp/replica-llama-3.1-8b
  replica_8b || return 1
  DATA="--examples ${EXAMPLES:-900} --seed ${SEED:-2}"
  python3 bench/validation_data.py --out /tmp/data.jsonl $DATA | tee -a $LOG
}
keep_ddp_run() {
  [ -f $1/run_summary.json ] || return 1
  python3 bench/keep_run.py $1 $OUT/$2.json "$3" "python3 bench/validation_data.py --out data.jsonl $DATA" | tee -a $LOG
}
