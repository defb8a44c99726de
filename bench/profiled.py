"""`rigplan run` with torch's profiler over a window of optimizer steps: where a step's time goes (issue 16: DDP
loses to the slowest process's strays from its step time, bench/ddp_jitter.py, and what the strays are is not
known):

    python3 bench/profiled.py FIRST COUNT OUT_DIR run MODEL_OR_PLAN --data FILE ...          (one process)
    torchrun --nproc-per-node 2 bench/profiled.py FIRST COUNT OUT_DIR run PLAN.json ...      (each process)

Optimizer steps FIRST to FIRST + COUNT - 1 (the first step is 1, as the progress lines count) are recorded, host
and CUDA activity, in every process; each writes OUT_DIR/trace-rank{R}.json.gz (chrome://tracing or Perfetto: the
host thread's launches and waits beside the GPU's kernels, step by step: optimizer step N is ProfilerStep#N-1) and
OUT_DIR/ops-rank{R}.txt (the operators by host time). The profiler steps at each optimizer step's end
(transformers' CallbackHandler.on_step_end), so a window holds whole steps.
"""

from __future__ import annotations

import gzip
import os
import shutil
import sys
from pathlib import Path


def main() -> None:
    from rigplan.trainer.engine import configure_allocator

    configure_allocator()  # as rigplan run does, before torch touches CUDA
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    first, count, out = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    out.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", 0))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])

    def written(prof) -> None:  # noqa: ANN001
        raw = out / f"trace-rank{rank}.json"
        prof.export_chrome_trace(str(raw))
        with raw.open("rb") as f, gzip.open(f"{raw}.gz", "wb") as z:
            shutil.copyfileobj(f, z)
        raw.unlink()
        sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        (out / f"ops-rank{rank}.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=40) + "\n")

    # steps before FIRST - 1 waited, FIRST - 1 warms the profiler up, FIRST .. FIRST + COUNT - 1 recorded
    prof = profile(activities=activities, schedule=schedule(wait=max(0, first - 2), warmup=min(1, first - 1),
                                                            active=count, repeat=1), on_trace_ready=written)
    from transformers.trainer_callback import CallbackHandler

    step_end = CallbackHandler.on_step_end

    def on_step_end(self, args, state, control):  # noqa: ANN001, ANN202
        control = step_end(self, args, state, control)
        prof.step()
        return control

    CallbackHandler.on_step_end = on_step_end
    prof.start()
    try:
        from rigplan.cli import main as cli

        sys.argv = ["rigplan", *sys.argv[4:]]
        cli()
    finally:
        prof.stop()


if __name__ == "__main__":
    main()
