"""`rigplan calibrate`: probe this GPU on reduced-depth replicas, fit the estimator's coefficients, store them.

All probe jobs run in one process (calibration/probe.py): importing Unsloth costs ~25 s a process on the
H100. What one job leaves on the GPU for the next (0.1-0.7 GiB: profiles/calibrations/h100-runs/README.md)
is recorded at each job's start and subtracted by the fit (fit.net_of_leftover). Depth is what the probes
reduce; the fitted terms carry it (per layer or not), and the fit is checked against full-depth runs the
probes never saw (bench/accuracy.py --calibration FILE).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from rigplan import planning, store
from rigplan.calibration import fit
from rigplan.estimator import planner
from rigplan.estimator.plan import PLAN_SCHEMA_VERSION, Coefficients, ExampleLengths, Plan
from rigplan.errors import CalibrationError, RigplanError
from rigplan.profiles import catalog, nvml

DEFAULT_MODELS = ("llama-3.1-8b",)
DEFAULT_METHODS = ("lora", "qlora")
# Two depths four times apart: per-layer terms come from their difference. At 8 layers an 8B replica is
# ~2.8B parameters, built and loaded in seconds.
DEPTHS = (2, 8)
# Shapes: 1 x 512 sits on the host's floor at any depth, micro-batches of >= 8192 tokens on the GPU line
# (fit.py's GPU_BOUND_TOKENS); batch 1 and batch >= 2 both appear, since Unsloth compiles them apart.
# The floor's per-token part (Unsloth's checkpoint offload) is 1 x 2048 less 1 x 512 at the same depth.
SHAPES = ((1, 512), (1, 2048), (4, 2048), (2, 8192))
QUICK_SHAPES = ((1, 512), (1, 2048), (4, 2048))
# One rank: the adapters' memory and FLOPs are exact formulas (estimator/memory.py, speed.py), nothing to fit.
RANK = 16
TIMEOUT_S = 1800


def jobs(models: tuple[str, ...], methods: tuple[str, ...], quick: bool) -> list[str]:
    """Probe jobs in calibration/probe.py's MODEL@LAYERS:METHOD:RANK:BxS,... form. Only the families the reference
    was fitted on (catalog.measured_status "fitted"): the fit is of the reference's coefficients, and another
    family's own terms (profiles/known_issues.json) are fitted on recorded runs over them, so its probes would move
    them. A generic-path family's Unsloth patches would also stay for the rest of the probe process, where the next
    model would run under them (unsloth_zoo compiler.py patch_lora_forwards)."""
    specs = {m: catalog.resolve_model(m) for m in models}
    own = [m for m, spec in specs.items() if catalog.measured_status(spec) != "fitted"]
    if own:
        raise CalibrationError(f"--model {', '.join(own)}: its family's terms come from its own recorded runs "
                               "(profiles/known_issues.json), not from calibrate; calibrate with a family the "
                               f"reference was fitted on ({', '.join(DEFAULT_MODELS)}, the default), and rigplan "
                               "applies them on top")
    shapes = ",".join(f"{b}x{s}" for b, s in (QUICK_SHAPES if quick else SHAPES))
    return [f"{specs[m].id}@{d}:{method}:{RANK}:{shapes}" for m in models for method in methods for d in DEPTHS]


def local_gpu() -> catalog.GpuSpec:
    found, why = nvml.local_gpus()
    if not found:
        raise CalibrationError(f"rigplan calibrate needs an NVIDIA GPU ({why}); rigplan check uses the shipped "
                               "H100 reference elsewhere")
    spec = catalog.gpu_by_nvml_name(found[0].name, found[0].total_gib)
    if spec is None:
        raise CalibrationError(f"GPU {found[0].name!r} is not in the catalogue; add its row to profiles/gpus.json")
    return spec


def calibrate(models: tuple[str, ...] = DEFAULT_MODELS, methods: tuple[str, ...] = DEFAULT_METHODS,
              quick: bool = False, out: Path | None = None,
              on_probe: Callable[[int, int, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Probe, fit toward the shipped reference (fit.fit's prior: what one architecture's probes cannot
    separate keeps the reference's split) and store; returns the fit's summary."""
    bad = [m for m in methods if m not in DEFAULT_METHODS]
    if bad or not methods:
        raise CalibrationError(f"--methods {','.join(methods)}: pass lora, qlora or lora,qlora")
    todo = jobs(models, methods, quick)  # unknown models are refused here, before any GPU work
    store.user_dir()  # and a RIGPLAN_HOME that is a file, before an hour of probes
    gpu = local_gpu()
    from rigplan.trainer.engine import require_training_packages

    require_training_packages("rigplan calibrate")  # the probes train
    n_shapes = len(todo) * len(QUICK_SHAPES if quick else SHAPES)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rigplan-calibrate-") as tmp:
        rows_file = Path(tmp) / "probes.jsonl"
        cmd = [sys.executable, "-m", "rigplan.calibration.probe", "--out", str(rows_file)]
        for job in todo:
            cmd += ["--job", job]
        err_file = (Path(tmp) / "probe.err").open("w+")  # a file, not a pipe: a full stderr pipe would block the probe
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err_file, text=True)
        done = 0
        if on_probe:
            on_probe(0, n_shapes, {})
        assert proc.stdout is not None
        for line in proc.stdout:  # the probe prints one JSON line per measured shape
            if line.startswith("{"):
                done += 1
                if on_probe:
                    on_probe(done, n_shapes, json.loads(line))
        proc.stdout.close()
        rc = proc.wait(timeout=TIMEOUT_S)
        err_file.seek(0)
        stderr = err_file.read()
        err_file.close()
        if not rows_file.exists():
            raise CalibrationError(f"the probe process measured nothing (exit {rc}): {stderr.strip()[-300:]}")
        probes = [json.loads(line) for line in rows_file.read_text().splitlines() if line.strip()]
    runs = fit.runs_from_rows(probes)
    if len(runs) < 6:
        raise CalibrationError(f"only {len(runs)} probes measured (of {n_shapes}); too few to fit"
                               + (f"; the probe said: {stderr.strip()[-300:]}" if rc else ""))
    coeffs, residuals = fit.fit(runs, gpu.id, source=f"rigplan calibrate on {gpu.id}, {len(runs)} probes",
                                prior=store.reference()[0])
    learned, n_runs = real_data_speed(_recorded_runs(), gpu, coeffs)
    if n_runs:
        coeffs = dataclasses.replace(coeffs, real_data_speed=learned)
    prov = probes[0].get("provenance", {})
    path = out or store.user_dir() / f"{gpu.id}.json"
    store.write_calibration(path, coeffs, residuals, provenance={**prov, "date": (prov.get("date") or "")[:10]},
                            probes=probes)
    failed = [f"{p['model']} {p['method']} {p['batch']}x{p['seq']}: {p['err']}" for p in probes if p.get("err")]
    return {"gpu": gpu.id, "path": str(path), "probes": len(probes), "measured": len(runs), "failed": failed,
            "probe_exit_code": rc, "wall_s": round(time.perf_counter() - t0, 1),
            "coefficients": coeffs.to_dict(), "residuals": residuals,
            "real_data": {"runs": n_runs, "speed_over_plan": learned}}


def _estimated_again(row: dict[str, Any], gpu: catalog.GpuSpec, coeffs: Coefficients) -> float | None:
    """A recorded run's tokens/s (all its GPUs) as this estimator plans it for its data's lengths, without any
    learned real-data rate; None where the record lacks the lengths or its model is not known here."""
    lengths = row.get("lengths")
    if not lengths or not lengths.get("quantiles"):
        return None
    try:
        p = Plan.from_json(json.dumps(row["plan"]))
        model = planning.plan_model(p)
    except (RigplanError, ValueError, KeyError, TypeError):  # a plan of another rigplan, or a model not here
        return None
    est = planner.estimate(model, p.setup, gpu, dataclasses.replace(coeffs, real_data_speed=1.0),
                           lengths=ExampleLengths(tuple(lengths["quantiles"]), int(lengths.get("count") or 0)),
                           batching=p.batching, engine=p.engine)
    return est.tokens_per_s * p.num_gpus


def _recorded_runs() -> list[dict[str, Any]]:
    """The user's `rigplan run` records (rigplan run appends them to runs.jsonl); unreadable lines skipped."""
    path = store.user_dir() / store.RUNS_LOG
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def real_data_speed(rows: list[dict[str, Any]], gpu: catalog.GpuSpec,
                    coeffs: Coefficients | None = None) -> tuple[float, int]:
    """The median of measured / planned tokens/s over finished runs planned for this GPU and run on it (a plan
    for another card run here, capped, is left out), and how many: the real-data rate of this machine that the
    probes' fixed shapes do not see; (1.0, 0) when there are none. With coeffs (the calibration being made), a
    run that kept its data's lengths is estimated again by this estimator with them, so that an estimate
    changed since the run (a rigplan upgrade, a new calibration) is not learned twice; others keep the
    prediction they printed."""
    ratios = []
    for r in rows:
        plan, measured, predicted = r.get("plan") or {}, r.get("measured") or {}, r.get("predicted") or {}
        ran_on = (r.get("provenance") or {}).get("gpu")
        if (r.get("status") == "done" and plan.get("gpu") == gpu.id and ran_on == gpu.nvml_name
                and plan.get("schema_version") == PLAN_SCHEMA_VERSION  # planned by this estimator
                and measured.get("tokens_per_s") and predicted.get("tokens_per_s")):
            planned = _estimated_again(r, gpu, coeffs) if coeffs is not None else None
            ratios.append(measured["tokens_per_s"] / (planned or predicted["tokens_per_s"]))
    if not ratios:
        return 1.0, 0
    return round(statistics.median(ratios), 4), len(ratios)
