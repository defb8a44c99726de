"""Run a rigplan command in a process held to a smaller card's memory, to test that card's plan on a big GPU:

    python bench/capped.py 24 run MODEL --data FILE --gpu rtx-4090 ...
    python bench/capped.py 24 -m rigplan.calibration.probe --job ... --out F.jsonl   (any module, as python -m)
    torchrun --nproc-per-node 2 bench/capped.py 24 run PLAN.json ...   (each process caps its own GPU)

torch.cuda.set_per_process_memory_fraction(GiB / the GPU's total) before the first allocation: the caching
allocator then raises out-of-memory past it. torch first is fine for Unsloth, which warns
only when transformers, peft or trl came before it.
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
    torch.cuda.set_per_process_memory_fraction(cap_gib * 2**30 / total, device)
    print(f"GPU {device} capped at {cap_gib} GiB of {total / 2**30:.1f} GiB", flush=True)
    if sys.argv[2] == "-m":
        import runpy

        sys.argv = [sys.argv[3], *sys.argv[4:]]
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
        return
    from rigplan.cli import main as cli

    sys.argv = ["rigplan", *sys.argv[2:]]
    cli()


if __name__ == "__main__":
    main()
