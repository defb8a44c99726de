"""`rigplan report`: measured vs predicted plots (PNG) and the probes as CSV. The only pandas/matplotlib user.

Plots: predicted vs measured peak reserved memory for every run (the diagonal); memory vs tokens per
micro-batch for LoRA and QLoRA with the GPU's limit drawn; tokens/s vs tokens per micro-batch.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from rigplan import store
from rigplan.calibration import fit
from rigplan.errors import CalibrationError
from rigplan.estimator import planner
from rigplan.estimator.plan import Setup
from rigplan.profiles.catalog import PROFILES_DIR, resolve_gpu, resolve_model

REFERENCE_RUNS = PROFILES_DIR / "calibrations" / "h100-runs"
CURVE_MODEL = "llama-3.1-8b"  # the architecture the memory and speed curves are drawn for
CURVE_TOKENS = (512, 1024, 2048, 4096, 8192, 16384, 32768)


def _runs(calibration: Path | None) -> tuple[list[fit.Run], object, str]:
    coeffs, doc = store.read_calibration(calibration) if calibration else store.reference()
    if doc.get("probes"):
        runs = [fit.parse_run(r) for r in doc["probes"]
                if not r.get("err") and r.get("engine", "unsloth") == "unsloth" and not r.get("exclude")]
    else:
        runs = fit.load_runs(sorted(REFERENCE_RUNS.glob("*.jsonl")))
    if not runs:
        raise CalibrationError("the calibration has no measured probes to plot; run rigplan calibrate")
    return runs, coeffs, coeffs.gpu


def check_inputs(out_dir: Path, calibration: Path | None) -> None:
    """Before anything is read or drawn: --out must be a folder (or not exist yet), --calibration a file, and
    the [report] extra installed."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CalibrationError(f"--out {out_dir} is a file; pass a folder for the plots (created if missing)")
    if calibration is not None and not Path(calibration).is_file():
        raise CalibrationError(f"--calibration {calibration} is not a file; pass a calibration JSON (rigplan "
                               "calibrate writes them into rigplan's data directory), or leave it out")
    missing = [name for name in ("pandas", "matplotlib") if importlib.util.find_spec(name) is None]
    if missing:
        raise CalibrationError(f"rigplan report needs {' and '.join(missing)}, not installed here; install the "
                               "report extra: pip install -e \".[report]\"")


def write_report(out_dir: Path, calibration: Path | None = None) -> list[str]:
    """Write the PNGs and the CSV into out_dir; returns their paths."""
    check_inputs(out_dir, calibration)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    runs, coeffs, gpu_id = _runs(calibration)
    gpu = resolve_gpu(gpu_id)
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CalibrationError(f"--out {out_dir}: cannot create it ({e.strerror}); pass another folder") from e
    rows = []
    for r in runs:
        est = planner.estimate(r.model, r.setup, gpu, coeffs)
        rows.append({"run": r.label, "model": r.model.id, "method": r.setup.method, "rank": r.setup.rank,
                     "batch": r.setup.micro_batch, "seq": r.setup.seq_len, "tokens": r.setup.tokens,
                     "checkpointing": r.setup.checkpointing, "memory_counts": r.row.get("clean_load", True),
                     "speed_counts": fit.speed_valid(r), "measured_reserved_gib": r.row["peak_reserved_gib"],
                     "predicted_reserved_gib": est.peak_reserved_gib, "measured_tok_per_s": r.row["tok_per_s"],
                     "predicted_tok_per_s": est.tokens_per_s})
    df = pd.DataFrame(rows)
    files = [out_dir / "probes.csv"]
    df.to_csv(files[0], index=False)

    mem = df[df.memory_counts]
    fig, ax = plt.subplots(figsize=(6, 6))
    for method, part in mem.groupby("method"):
        ax.scatter(part.measured_reserved_gib, part.predicted_reserved_gib, label=method, s=18)
    top = max(mem.measured_reserved_gib.max(), mem.predicted_reserved_gib.max()) * 1.05
    ax.plot([0, top], [0, top], "k--", lw=1, label="predicted = measured")
    ax.plot([0, top], [0, top * 1.1], ":", c="grey", lw=1, label="±10%")
    ax.plot([0, top], [0, top * 0.9], ":", c="grey", lw=1)
    ax.set(xlabel="measured peak reserved (GiB)", ylabel="predicted peak reserved (GiB)",
           title=f"rigplan memory estimate vs {len(mem)} runs on {gpu.id}")
    ax.legend()
    files.append(out_dir / "memory_predicted_vs_measured.png")
    fig.savefig(files[-1], dpi=110, bbox_inches="tight")
    plt.close(fig)

    model = resolve_model(CURVE_MODEL)
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    for ax, method in zip(axes, ("lora", "qlora")):
        for ckpt, style in (("unsloth", "-"), ("off", "--")):
            pred = [planner.estimate(model, Setup(method, 16, max(1, t // 2048), min(t, 2048), checkpointing=ckpt),
                                     gpu, coeffs).peak_reserved_gib for t in CURVE_TOKENS]
            ax.plot(CURVE_TOKENS, pred, style, label=f"predicted {model.id} r16, checkpointing {ckpt}")
        part = mem[(mem.method == method) & (mem.model == model.id) & (mem["rank"] == 16)]
        ax.scatter(part.tokens, part.measured_reserved_gib, c="k", s=18, label=f"measured {model.id} r16",
                   zorder=3)
        ax.axhline(planner.usable_gib(gpu), c="r", lw=1, label=f"{gpu.id} memory")
        ax.set(xscale="log", xlabel="tokens per micro-batch", title=method)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("peak reserved (GiB)")
    files.append(out_dir / "memory_vs_tokens.png")
    fig.savefig(files[-1], dpi=110, bbox_inches="tight")
    plt.close(fig)

    spd = df[df.speed_counts]
    fig, ax = plt.subplots(figsize=(7, 5))
    for name, part in spd.groupby("model"):
        ax.scatter(part.tokens, part.measured_tok_per_s, s=16, label=f"measured {name}")
    curve = [planner.estimate(model, Setup("lora", 16, max(1, t // 2048), min(t, 2048)), gpu, coeffs).tokens_per_s
             for t in CURVE_TOKENS]
    ax.plot(CURVE_TOKENS, curve, "k-", label=f"predicted {model.id} LoRA r16")
    ax.set(xscale="log", yscale="log", xlabel="tokens per micro-batch", ylabel="tokens/s",
           title=f"training throughput on {gpu.id}")
    ax.legend(fontsize=7)
    files.append(out_dir / "tokens_per_s_vs_tokens.png")
    fig.savefig(files[-1], dpi=110, bbox_inches="tight")
    plt.close(fig)
    (out_dir / "report.json").write_text(json.dumps({"gpu": gpu.id, "runs": len(df), "files": [str(f) for f in files]},
                                                    indent=2))
    return [str(f) for f in files]
