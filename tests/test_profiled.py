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
