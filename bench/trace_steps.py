"""What each profiled optimizer step did, from bench/profiled.py's traces: its wall time, the time the GPU ran
kernels, the GPU's longest idle gap, and the host operators that ran during that gap (what the GPU waited for).

    python3 bench/trace_steps.py TRACE.json.gz [...]       (one JSON line per step and trace)
    python3 bench/trace_steps.py --collectives TRACE.json.gz [...]  (one JSON line per NCCL kernel)

A step that strays (bench/ddp_jitter.py) shows here as a longer wall time with the same kernel time: the gap's host
operators say what held the launches back (collation, the optimizer, a synchronising read, Python).
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

GAP_OPS = 8  # host operators listed for a step's longest GPU gap


def complete_events(trace: Path) -> list[dict]:
    """The trace's complete events (phase X: a start and a duration), host and GPU."""
    return [e for e in json.loads(gzip.open(trace).read())["traceEvents"] if e.get("ph") == "X"]


def steps(trace: Path) -> list[dict]:
    events = complete_events(trace)
    kernels = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") in ("kernel", "gpu_memcpy",
                                                                                     "gpu_memset"))
    host = [e for e in events if e.get("cat") in ("cpu_op", "python_function", "user_annotation")
            and not e["name"].startswith("ProfilerStep#")]
    out = []
    # the host's annotation of each step (the GPU's copy of it, gpu_user_annotation, would list every step twice)
    marks = (e for e in events if e["name"].startswith("ProfilerStep#") and e.get("cat") == "user_annotation")
    for step in sorted(marks, key=lambda e: e["ts"]):
        t0, t1 = step["ts"], step["ts"] + step["dur"]
        busy, gap, last = 0.0, (0.0, t0, t0), t0
        for a, b in kernels:
            if b <= t0 or a >= t1:
                continue
            a, b = max(a, t0), min(b, t1)
            if a > last and a - last > gap[0]:
                gap = (a - last, last, a)
            busy += max(0.0, b - max(a, last))
            last = max(last, b)
        if kernels and t1 - last > gap[0]:
            gap = (t1 - last, last, t1)
        during = sorted((e for e in host if e["ts"] < gap[2] and e["ts"] + e["dur"] > gap[1]),
                        key=lambda e: -min(e["ts"] + e["dur"], gap[2]) + max(e["ts"], gap[1]))
        out.append({"trace": trace.name, "step": int(step["name"].split("#")[1]) + 1,  # counted from 1
                    "wall_ms": round(step["dur"] / 1e3, 2), "gpu_busy_ms": round(busy / 1e3, 2),
                    "longest_gpu_gap_ms": round(gap[0] / 1e3, 2),
                    "host_ops_in_gap": [e["name"] for e in during[:GAP_OPS]]})
    return out


def collectives(trace: Path) -> list[dict]:
    """Each NCCL kernel of a DDP process in order: its kind, how long it ran (a process that reaches a collective
    first waits inside its kernel for the others, so a long one is this process waiting), and since the previous
    one ended, the wall time and the time the GPU ran other kernels. Between the gradients' all-reduce (f32) and
    the next collective lies the optimizer step: a span far above its GPU time is host-bound."""
    events = complete_events(trace)
    kernels = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    out, end, busy = [], None, 0.0
    for e in kernels:
        if "nccl" not in e["name"].lower():
            busy += e["dur"] if end is not None else 0.0
            continue
        out.append({"trace": trace.name, "kind": e["name"].split("(")[0].removeprefix("ncclDevKernel_"),
                    "ms": round(e["dur"] / 1e3, 2),
                    "since_previous_ms": round((e["ts"] - end) / 1e3, 1) if end is not None else None,
                    "gpu_busy_since_ms": round(busy / 1e3, 1) if end is not None else None})
        end, busy = e["ts"] + e["dur"], 0.0
    return out


if __name__ == "__main__":
    rows = collectives if sys.argv[1] == "--collectives" else steps
    for f in sys.argv[2 if rows is collectives else 1:]:
        for row in rows(Path(f)):
            print(json.dumps(row))
