"""`rigplan calibrate`: probe this GPU on reduced-depth replicas, fit the estimator's coefficients, store them.

Each probe job runs in its own process (calibration/probe.py): a process that ran another job keeps
0.1-0.7 GiB of it (profiles/calibrations/h100-runs/README.md). Depth is what the probes reduce; the fitted
terms carry it (per layer or not), and the H100 reference shows the extrapolation: the 2-layer 8B runs and the
32-layer ones are predicted by the same coefficients within a few per cent (bench/accuracy.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from rigplan.calibration import fit, store
from rigplan.errors import CalibrationError
from rigplan.profiles import catalog, nvml

DEFAULT_MODELS = ("llama-3.1-8b",)
DEFAULT_METHODS = ("lora", "qlora")
DEPTHS = (1, 2, 4)
QUICK_DEPTHS = (2,)
# Shapes: large micro-batches (>= 8192 tokens) fix the GPU line, small ones (<= 4096) the host floor;
# batch 1 and batch >= 2 both appear, since Unsloth compiles them apart (fit.py's GPU_BOUND_TOKENS).
SHAPES = ((1, 2048), (2, 2048), (4, 2048), (8, 2048), (2, 8192))
QUICK_SHAPES = ((1, 2048), (4, 2048), (2, 8192))
RANKS = (16, 64)
QUICK_RANKS = (16,)
JOB_TIMEOUT_S = 600


def jobs(models: tuple[str, ...], methods: tuple[str, ...], quick: bool) -> list[str]:
    """Probe jobs in calibration/probe.py's MODEL@LAYERS:METHOD:RANK:BxS,... form."""
    shapes = ",".join(f"{b}x{s}" for b, s in (QUICK_SHAPES if quick else SHAPES))
    return [f"{catalog.resolve_model(m).id}@{d}:{method}:{r}:{shapes}" for m in models for method in methods
            for d in (QUICK_DEPTHS if quick else DEPTHS) for r in (QUICK_RANKS if quick else RANKS)]


def local_gpu() -> catalog.GpuSpec:
    found, why = nvml.local_gpus()
    if not found:
        raise CalibrationError(f"rigplan calibrate needs an NVIDIA GPU ({why}); rigplan check uses the shipped "
                               "H100 reference elsewhere")
    spec = catalog.gpu_by_nvml_name(found[0].name)
    if spec is None:
        raise CalibrationError(f"GPU {found[0].name!r} is not in the catalogue; add its row to profiles/gpus.json")
    return spec


def calibrate(models: tuple[str, ...] = DEFAULT_MODELS, methods: tuple[str, ...] = DEFAULT_METHODS,
              quick: bool = False, out: Path | None = None,
              on_job: Callable[[int, int, str], None] | None = None) -> dict[str, Any]:
    """Probe, fit and store; returns the fit's summary (coefficients, residuals, where it was written)."""
    gpu = local_gpu()
    todo = jobs(models, methods, quick)
    with tempfile.TemporaryDirectory(prefix="rigplan-calibrate-") as tmp:
        rows_file = Path(tmp) / "probes.jsonl"
        failed = []
        for i, job in enumerate(todo):
            if on_job:
                on_job(i, len(todo), job)
            proc = subprocess.run([sys.executable, "-m", "rigplan.calibration.probe", "--job", job,
                                   "--out", str(rows_file)], capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
            if proc.returncode != 0:
                failed.append({"job": job, "stderr": proc.stderr[-1500:]})
        if not rows_file.exists():
            raise CalibrationError(f"every probe failed; the first said: {failed[0]['stderr'][-300:] if failed else '-'}")
        probes = [json.loads(line) for line in rows_file.read_text().splitlines() if line.strip()]
        runs = fit.load_runs([rows_file])
    if len(runs) < 6:
        raise CalibrationError(f"only {len(runs)} probes measured (of {len(probes)}); too few to fit")
    coeffs, residuals = fit.fit(runs, gpu.id, source=f"rigplan calibrate on {gpu.id}, {len(runs)} probes")
    prov = probes[0].get("provenance", {})
    path = out or store.user_dir() / f"{gpu.id}.json"
    store.write_calibration(path, coeffs, residuals, provenance={**prov, "date": (prov.get("date") or "")[:10]},
                            probes=probes)
    return {"gpu": gpu.id, "path": str(path), "probes": len(probes), "measured": len(runs), "failed": failed,
            "coefficients": coeffs.to_dict(), "residuals": residuals}
