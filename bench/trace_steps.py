"""What each profiled optimizer step did, from bench/profiled.py's traces: its wall time, the time the GPU ran
kernels, the GPU's longest idle gap, and the host operators that ran during that gap (what the GPU waited for).

    python3 bench/trace_steps.py TRACE.json.gz [...]       (one JSON line per step and trace)

A step that strays (bench/ddp_jitter.py) shows here as a longer wall time with the same kernel time: the gap's host
operators say what held the launches back (collation, the optimizer, a synchronising read, Python).
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

GAP_OPS = 8  # host operators listed for a step's longest GPU gap


def steps(trace: Path) -> list[dict]:
    events = [e for e in json.loads(gzip.open(trace).read())["traceEvents"] if e.get("ph") == "X"]
    kernels = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") in ("kernel", "gpu_memcpy",
                                                                                     "gpu_memset"))
    host = [e for e in events if e.get("cat") in ("cpu_op", "python_function", "user_annotation")
            and not e["name"].startswith("ProfilerStep#")]
    out = []
    for step in sorted((e for e in events if e["name"].startswith("ProfilerStep#")), key=lambda e: e["ts"]):
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


if __name__ == "__main__":
    for f in sys.argv[1:]:
        for row in steps(Path(f)):
            print(json.dumps(row))
