"""Run a rigplan command in a process held to a smaller card's memory, to test that card's plan on a big GPU:

    python bench/capped.py 24 run MODEL --data FILE --gpu rtx-4090 ...
    python bench/capped.py 24 -m rigplan.calibration.probe --job ... --out F.jsonl   (any module, as python -m)
    torchrun --nproc-per-node 2 bench/capped.py 24 run PLAN.json ...   (each process caps its own GPU)
    CAP_RANK=1 torchrun --nproc-per-node 2 bench/capped.py 40 run PLAN.json ...   (process 1's GPU alone)

torch.cuda.set_per_process_memory_fraction(GiB / the GPU's total) before the first allocation: the caching
allocator then raises out-of-memory past it. torch first is fine for Unsloth, which warns
only when transformers, peft or trl came before it.

QLORA_CPU_LOAD=1 (an experiment for sharded QLoRA, issue 16): a 4-bit model is loaded and quantized in CPU memory
(device_map {"": "cpu"}, which transformers 5.17's bitsandbytes quantizer accepts when every module is on the CPU)
instead of whole onto each process's GPU, so that FSDP moves only each process's shard to its GPU; the GPU memory
right after loading is printed. QLORA_CPU_LOAD=report prints the same without moving any load: where `rigplan run`
itself put the weights (a pre-quantized checkpoint sharded: CPU memory, plan.load_on_cpu).

MEM_HISTORY=DIR: process 0 records every CUDA allocation with its Python stack from the start (torch's memory
snapshot, https://pytorch.org/docs/stable/torch_cuda_memory.html) and writes DIR/snapshot.pickle at its first
training step: what loading and sharding allocated and what was still held (bench/snapshot_peak.py reads it).
MEM_HISTORY_AT=exit: the same, recorded to the process's exit instead (a probe job of one shape: its steps whole,
for `bench/snapshot_peak.py --reserved`, where the reserved memory beyond the allocated peak comes from).
"""

from __future__ import annotations

import sys


def main() -> None:
    from rigplan.trainer.engine import configure_allocator

    configure_allocator()  # as rigplan run does, before torch touches CUDA
    import torch

    import os

    cap_gib = float(sys.argv[1])
    device = int(os.environ.get("LOCAL_RANK", 0))  # under torchrun: this process's own GPU
    total = torch.cuda.get_device_properties(device).total_memory
    if os.environ.get("CAP_RANK", str(device)) == str(device):  # CAP_RANK=N: that process's GPU alone is capped
        torch.cuda.set_per_process_memory_fraction(cap_gib * 2**30 / total, device)
        print(f"GPU {device} capped at {cap_gib} GiB of {total / 2**30:.1f} GiB", flush=True)
    if os.environ.get("MEM_HISTORY") and os.environ.get("RANK", "0") == "0":
        if os.environ.get("MEM_HISTORY_AT") == "exit":
            record_until_exit(torch, os.environ["MEM_HISTORY"])
        else:
            record_until_first_step(torch, os.environ["MEM_HISTORY"])
    if os.environ.get("QLORA_CPU_LOAD") in ("1", "report"):
        load_4_bit_on_cpu(torch, force=os.environ["QLORA_CPU_LOAD"] == "1")
    if sys.argv[2] == "-m":
        import runpy

        sys.argv = [sys.argv[3], *sys.argv[4:]]
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
        return
    from rigplan.cli import main as cli

    sys.argv = ["rigplan", *sys.argv[2:]]
    cli()


def load_4_bit_on_cpu(torch, force: bool = True) -> None:  # noqa: ANN001
    """force: device_map cpu for every 4-bit load; else (QLORA_CPU_LOAD=report) where the loads went, as the
    trainer placed them (a pre-quantized checkpoint: plan.load_on_cpu), reported the same way."""
    try:
        import unsloth  # noqa: F401  (before transformers, as rigplan run imports them)
    except ImportError:
        pass
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained.__func__

    import resource
    import time

    def from_pretrained(cls, *args, **kwargs):  # noqa: ANN001, ANN202
        if force and kwargs.get("quantization_config") is not None:
            kwargs["device_map"] = {"": "cpu"}
        t0 = time.perf_counter()
        model = original(cls, *args, **kwargs)
        print(f"QLORA_CPU_LOAD: loaded on the CPU in {time.perf_counter() - t0:.0f} s; GPU allocated "
              f"{torch.cuda.memory_allocated() / 2**30:.2f} GiB; this process's CPU peak "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB; {quant_states(model)}", flush=True)
        return model

    AutoModelForCausalLM.from_pretrained = classmethod(from_pretrained)
    # After FSDP has sharded the model (accelerate prepares it inside train()): where the quant states went, and
    # the GPU's peak so far (loading and sharding), once, at the first training step.
    from transformers import Trainer

    step = Trainer.training_step

    def training_step(self, model, *args, **kwargs):  # noqa: ANN001, ANN202
        if not getattr(training_step, "said", False):
            training_step.said = True
            print(f"QLORA_CPU_LOAD: first step; GPU peak so far {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB; "
                  f"{quant_states(model)}", flush=True)
        return step(self, model, *args, **kwargs)

    Trainer.training_step = training_step


def record_until_exit(torch, out_dir: str) -> None:  # noqa: ANN001
    """CUDA allocations with stacks from here to the process's exit, written gzipped as a memory snapshot."""
    import atexit
    import gzip
    import pickle
    from pathlib import Path

    torch.cuda.memory._record_memory_history(max_entries=4_000_000)

    def dump() -> None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        with gzip.open(f"{out_dir}/snapshot.pickle.gz", "wb") as f:
            pickle.dump(torch.cuda.memory._snapshot(), f)
        print(f"MEM_HISTORY: {out_dir}/snapshot.pickle.gz written at exit", flush=True)

    atexit.register(dump)


def record_until_first_step(torch, out_dir: str) -> None:  # noqa: ANN001
    """CUDA allocations with stacks from here to the first training step, written as a memory snapshot."""
    from pathlib import Path

    from transformers import Trainer

    torch.cuda.memory._record_memory_history(max_entries=400_000)
    step = Trainer.training_step

    def training_step(self, model, *args, **kwargs):  # noqa: ANN001, ANN202
        if not getattr(training_step, "dumped", False):
            training_step.dumped = True
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            torch.cuda.memory._dump_snapshot(f"{out_dir}/snapshot.pickle")
            torch.cuda.memory._record_memory_history(enabled=None)
            print(f"MEM_HISTORY: {out_dir}/snapshot.pickle written at the first step", flush=True)
        return step(self, model, *args, **kwargs)

    Trainer.training_step = training_step


def quant_states(model) -> str:  # noqa: ANN001
    """How many bitsandbytes 4-bit weights carry a quant state, and on which devices their absmax lies."""
    devices: dict[str, int] = {}
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None) or getattr(module, "quant_state", None)
        if state is not None and getattr(state, "absmax", None) is not None:
            devices[str(state.absmax.device)] = devices.get(str(state.absmax.device), 0) + 1
    return f"quant states' absmax on {devices or 'no device (none found)'}"


if __name__ == "__main__":
    main()
