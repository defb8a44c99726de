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
