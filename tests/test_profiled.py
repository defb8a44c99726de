"""bench/profiled.py, which records where an optimizer step's time goes on the GPU machine (issue 16's straggling
DDP steps): on the CPU with a toy Llama, the window asked for is recorded whole, step by step, and the run itself
finishes as without the profiler."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("trl")

BENCH = Path(__file__).parents[1] / "bench"


def test_the_steps_asked_for_are_recorded(tmp_path, toy_llama_and_data) -> None:
    model, data = toy_llama_and_data(tmp_path, 64)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(BENCH / "profiled.py"), "3", "2", str(tmp_path / "prof"), "run",
                        str(model), "--data", str(data), "--out", str(tmp_path / "o"), "--max-steps", "6",
                        "--seq", "64"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert json.loads((tmp_path / "o" / "run_summary.json").read_text())["global_step"] == 6
    events = json.loads(gzip.open(tmp_path / "prof" / "trace-rank0.json.gz").read())["traceEvents"]
    steps = sorted({e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")})
    assert steps == ["ProfilerStep#2", "ProfilerStep#3"], steps  # optimizer steps 3 and 4 (torch counts from 0)
    assert "Self CPU" in (tmp_path / "prof" / "ops-rank0.txt").read_text()
    sys.path.insert(0, str(BENCH))
    from trace_steps import steps as trace_steps

    rows = trace_steps(tmp_path / "prof" / "trace-rank0.json.gz")
    assert [r["step"] for r in rows] == [3, 4] and all(r["wall_ms"] > 0 for r in rows)
    assert all(r["gpu_busy_ms"] == 0 for r in rows)  # no GPU here: no kernels


def test_a_steps_gpu_gap_and_the_host_work_in_it(tmp_path) -> None:
    """trace_steps' arithmetic on a trace written here: kernel time counted once where kernels overlap, the longest
    stretch without a kernel, and the host operator that ran then."""
    sys.path.insert(0, str(BENCH))
    from trace_steps import steps as trace_steps

    ms = 1000  # the trace's unit is the microsecond
    events = [{"ph": "X", "name": "ProfilerStep#4", "cat": "user_annotation", "ts": 0, "dur": 100 * ms},
              {"ph": "X", "name": "gemm", "cat": "kernel", "ts": 10 * ms, "dur": 20 * ms},
              {"ph": "X", "name": "gemm", "cat": "kernel", "ts": 20 * ms, "dur": 5 * ms},
              {"ph": "X", "name": "softmax", "cat": "kernel", "ts": 60 * ms, "dur": 30 * ms},
              {"ph": "X", "name": "collate", "cat": "python_function", "ts": 32 * ms, "dur": 20 * ms},
              {"ph": "X", "name": "aten::mm", "cat": "cpu_op", "ts": 1 * ms, "dur": 2 * ms}]
    f = tmp_path / "t.json.gz"
    with gzip.open(f, "wt") as z:
        json.dump({"traceEvents": events}, z)
    (row,) = trace_steps(f)
    assert (row["step"], row["wall_ms"], row["gpu_busy_ms"], row["longest_gpu_gap_ms"]) == (5, 100, 50, 30)
    assert row["host_ops_in_gap"] == ["collate"]
