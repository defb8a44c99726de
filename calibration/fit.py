"""Fit the estimator's Coefficients to measured runs by least squares over its own term functions.

    python -m rigplan.calibration.fit profiles/calibrations/h100-runs/*.jsonl --gpu h100-sxm --out FILE

No second formula lives here: the known terms (weights, adapters, gradients, optimizer state) and the
FLOP count come from estimator/, and each fitted coefficient multiplies the shape that term uses.
Standard library only (a few unknowns: normal equations are enough).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rigplan.calibration.replica import reduced
from rigplan.estimator import memory, speed
from rigplan.estimator.plan import Coefficients, Setup
from rigplan.profiles import catalog
from rigplan.profiles.catalog import ModelSpec, resolve_gpu, resolve_model

GIB = 2**30
# On the H100 runs, micro-batches of >= 8192 tokens sat on the GPU line (FLOP-bound, within a few %); the
# host floor is fitted on the small ones (<= 4096 tokens) measured more than 10% above that line.
GPU_BOUND_TOKENS = 8192
HOST_BOUND_TOKENS = 4096
HOST_BOUND_MARGIN = 1.1
FLOOR_PROBE_TOKENS = 1024


@dataclass(frozen=True)
class Run:
    """One measured shape: the model as run (depth included), the setup, and what was measured."""

    model: ModelSpec
    setup: Setup
    row: dict[str, Any]

    @property
    def label(self) -> str:
        s = self.setup
        ck = "" if s.checkpointing == "unsloth" else " no-ckpt"
        return f"{self.model.id} {s.method} r{s.rank} {s.micro_batch}x{s.seq_len}{ck}"


# What a fresh process has allocated (and reserved) before its first job: the engine's import, on every
# one-job process recorded on the H100 (26 rows with start_* fields). It belongs to every run, as it did to
# the rows recorded before the probe wrote start_* (the fitted fixed_bytes, 32 MiB, is this); only what an
# earlier job in the same process left above it is a leftover.
FRESH_PROCESS_ALLOC_GIB = 0.03125
FRESH_PROCESS_RESERVED_GIB = 0.0390625


def net_of_leftover(row: dict[str, Any]) -> dict[str, Any]:
    """A probe row's memory net of what an earlier job in the same process left allocated (the probe
    records the allocation at the job's start as start_alloc_gib / start_reserved_gib; a fresh process
    starts at FRESH_PROCESS_*): allocations add, so the allocated figures are exact; a reserved figure is
    off by at most the free space inside the leftover's segments. Rows without those fields are returned as
    they are (older probes ran one job per process, or say `clean_load: false`)."""
    alloc0 = max(0.0, (row.get("start_alloc_gib") or 0.0) - FRESH_PROCESS_ALLOC_GIB)
    reserved0 = max(0.0, (row.get("start_reserved_gib") or 0.0) - FRESH_PROCESS_RESERVED_GIB)
    if not alloc0 and not reserved0:
        return row
    net = dict(row)
    for key, start in (("peak_alloc_gib", alloc0), ("after_load_gib", alloc0), ("base_gib", alloc0),
                       ("peak_reserved_gib", reserved0)):
        if net.get(key) is not None and start:
            net[key] = net[key] - start
    return net


def parse_run(row: dict[str, Any]) -> Run:
    """A Run from a probe row (calibration/probe.py) or a row of h100-runs/shared-h100-unsloth-runs.jsonl
    ("llama-3.1-8b-L32")."""
    row = net_of_leftover(row)
    arch, layers = row.get("arch"), row.get("layers")
    if arch is None:  # shared-h100-unsloth-runs.jsonl names the depth in the model: "<id>-L<layers>"
        arch, _, depth = row["model"].rpartition("-L")
        layers = int(depth)
    spec = reduced(resolve_model(arch), layers)
    setup = Setup(method=row["method"], rank=int(row["rank"]), micro_batch=int(row["batch"]),
                  seq_len=int(row["seq"]), optimizer=row.get("optimizer", "adamw_8bit"),
                  checkpointing=row.get("checkpointing", "unsloth"))
    return Run(spec, setup, row)


def runs_from_rows(rows: list[dict[str, Any]], engine: str = "unsloth") -> list[Run]:
    """Measured rows without errors, from the given engine, that are usable as facts."""
    return [parse_run(row) for row in rows
            if not row.get("err") and row.get("engine", "unsloth") == engine and not row.get("exclude")]


def load_runs(paths: list[Path], engine: str = "unsloth") -> list[Run]:
    """runs_from_rows over JSONL files."""
    return runs_from_rows([json.loads(line) for path in paths for line in path.read_text().splitlines()
                           if line.strip()], engine)


# With a prior (`rigplan calibrate` fits toward the shipped reference), the ridge weight, as a share of the
# mean diagonal of the scaled normal equations: the probes decide every direction they measure, and a
# direction they cannot see (one architecture cannot tell the logits' bytes per token from a layer's
# transient ones: both scale with tokens alone) keeps the reference's value.
PRIOR_WEIGHT = 1e-3


def _solve(rows: list[list[float]], y: list[float], prior: list[float] | None = None) -> list[float]:
    """Least squares by the normal equations, columns scaled; a coefficient that comes out negative is
    held at 0 and the rest refitted (every term here is a size, so none can be negative). With `prior`,
    ridge regression toward it (PRIOR_WEIGHT)."""
    n = len(rows[0])
    active = list(range(n))
    while True:
        scale = [max(abs(r[j]) for r in rows) or 1.0 for j in active]
        a = [[sum(r[p] / sp * r[q] / sq for r in rows) for q, sq in zip(active, scale)]
             for p, sp in zip(active, scale)]
        b = [sum(r[p] / sp * yi for r, yi in zip(rows, y)) for p, sp in zip(active, scale)]
        if prior is not None:
            lam = PRIOR_WEIGHT * max(sum(a[i][i] for i in range(len(a))) / len(a), 1e-30)
            for i, (j, sj) in enumerate(zip(active, scale)):
                a[i][i] += lam
                b[i] += lam * prior[j] * sj
        for i in range(len(a)):  # a tiny ridge keeps an unidentifiable column from blowing up
            a[i][i] += 1e-9 * (a[i][i] or 1.0)
        x = _gauss(a, b)
        coef = [0.0] * n
        for xi, j, sj in zip(x, active, scale):
            coef[j] = xi / sj
        negative = [j for j in active if coef[j] < 0]
        if not negative:
            return coef
        active.remove(min(negative, key=lambda j: coef[j]))
        if not active:
            return [0.0] * n


# The minimax floor: the smallest band t with measured / predicted time - 1 within +-t on every run, found by
# bisection on t over linear feasibility problems (measured / (1 + t) <= predicted <= measured / (1 - t),
# coefficients >= 0), solved by scipy's HiGHS; it stops when the band is known to this width.
MINIMAX_TOLERANCE = 1e-6


def _solve_minimax(rows: list[list[float]], y: list[float], caps: list[list[float]] = (),
                   cap_y: list[float] = ()) -> list[float]:
    """Non-negative coefficients whose worst speed error over the runs is smallest, never predicting more
    than measured / (1 - t) on the `caps` runs either (GPU-bound ones the floor must stay under). For a band
    that must hold on every run, measured on several hosts whose CPUs pace the same shape differently: least
    squares centres on whichever host has the most rows, minimax between them. Needs scipy ([dev] extra)."""
    import numpy as np
    from scipy.optimize import linprog

    a, meas = np.array(rows, dtype=float), np.array(y, dtype=float)
    scale = np.abs(a).max(axis=0)
    scale[scale == 0] = 1.0
    a = a / scale
    c, cy = np.array(caps, dtype=float).reshape(-1, a.shape[1]) / scale, np.array(cap_y, dtype=float)
    lo, hi, best = 0.0, 0.99, None
    while hi - lo > MINIMAX_TOLERANCE:
        t = (lo + hi) / 2
        res = linprog(np.zeros(a.shape[1]), A_ub=np.vstack([a, -a, c]),
                      b_ub=np.concatenate([meas / (1 - t), -meas / (1 + t), cy / (1 - t)]),
                      bounds=[(0, None)] * a.shape[1],
                      method="highs")
        if res.status == 0:
            hi, best = t, res.x
        else:
            lo = t
    if best is None:  # not even within 99%: nothing to centre, fall back to least squares
        return _solve(rows, y)
    return [float(v) for v in best / scale]


def _gauss(a: list[list[float]], b: list[float]) -> list[float]:
    n = len(b)
    m = [row[:] + [bi] for row, bi in zip(a, b)]
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(m[r][c]))
        m[c], m[p] = m[p], m[c]
        for r in range(n):
            if r != c and m[c][c]:
                f = m[r][c] / m[c][c]
                m[r] = [x - f * y for x, y in zip(m[r], m[c])]
    return [m[i][n] / m[i][i] if m[i][i] else 0.0 for i in range(n)]


def speed_valid(run: Run) -> bool:
    """Step times that show training speed (a row says `speed_invalid` with the reason when not)."""
    return not run.row.get("speed_invalid")


def loaded_bytes(run: Run) -> int:
    """What loading puts on the GPU, known from the shapes: weights and adapters (fixed_bytes aside)."""
    m, s = run.model, run.setup
    return memory.base_weights_bytes(m, s.method) + memory.lora_weights_bytes(m, s.rank)


def _phase_bytes(run: Run, coeffs: Coefficients, loss_phase: bool) -> int:
    parts = memory.components_bytes(run.model, run.setup, coeffs)
    if loss_phase:
        return memory.loss_phase_bytes(run.model, run.setup, parts, coeffs)
    return memory.backward_phase_bytes(parts)


def _unit(**overrides: float) -> Coefficients:
    """Coefficients with one memory coefficient at 1 and the rest 0: evaluates that term's shape."""
    base = dict(fixed_bytes=0.0, step_fixed_bytes=0.0, ckpt_per_hidden=0.0, transient_per_hidden=0.0,
                transient_per_intermediate=0.0, logits_per_vocab=0.0, loss_per_hidden=0.0, nockpt_per_hidden=0.0,
                nockpt_per_intermediate=0.0, slack_ratio=0.0, qlora_slack_ratio=0.0, nockpt_slack_ratio=0.0,
                context_bytes=0.0, mfu=1.0, elementwise_bytes=0.0,
                dequant_bytes=0.0, step_overhead_s=0.0, layer_overhead_s=0.0, nockpt_layer_overhead_s=0.0,
                qlora_layer_overhead_s=0.0, offload_s_per_gb=0.0)
    base.update(overrides)
    return Coefficients(**base)  # type: ignore[arg-type]


MEMORY_COEFFS_CKPT = ("step_fixed_bytes", "ckpt_per_hidden", "transient_per_hidden",
                      "transient_per_intermediate", "logits_per_vocab", "loss_per_hidden")
MEMORY_COEFFS_NOCKPT = ("step_fixed_bytes", "nockpt_per_hidden", "nockpt_per_intermediate", "logits_per_vocab",
                        "loss_per_hidden")


def _features(run: Run, names: tuple[str, ...], loss_phase: bool,
              held: dict[str, float]) -> tuple[list[float], float]:
    """Each coefficient's column in the phase that sets this run's peak (the step's bytes there with only that
    coefficient at 1, less the bytes known from the shapes and the `held` coefficients), and those known
    bytes: both phases are linear in the coefficients."""
    known = _phase_bytes(run, _unit(**held), loss_phase)
    return [float(_phase_bytes(run, _unit(**held, **{n: 1.0}), loss_phase) - known) for n in names], float(known)


def fit(runs: list[Run], gpu: str, source: str, prior: Coefficients | None = None,
        floor_fit: str = "least_squares") -> tuple[Coefficients, dict[str, Any]]:
    """Coefficients fitted to the runs, and the fit's residuals per run. With `prior` (the shipped
    reference, for `rigplan calibrate`'s few probes of one architecture), terms the runs cannot identify
    keep the prior's values, and terms they do not exercise at all (no probe without checkpointing) are
    taken from it. floor_fit: see _fit_speed (the shipped reference pools hosts: "minimax")."""
    pri = dataclasses.asdict(prior) if prior is not None else None
    # The terms describe Unsloth's fast paths; runs of a family it trains through its generic path are
    # compared (residuals) but not fitted.
    every, runs = runs, [r for r in runs if not catalog.unsloth_generic_path(r.model)] or runs
    load_rows = [r for r in runs if r.row.get("after_load_gib") is not None and r.row.get("clean_load", True)]
    fixed = statistics.median(
        r.row["after_load_gib"] * GIB - memory.base_weights_bytes(r.model, r.setup.method)
        - memory.lora_weights_bytes(r.model, r.setup.rank) for r in load_rows)
    mem_runs = [r for r in runs if r.row.get("peak_alloc_gib") is not None and r.row.get("clean_load", True)]
    values: dict[str, float] = {"fixed_bytes": fixed}
    # The fixed part of a step and the logits' bytes are shared by both fits: the checkpointed runs (most of
    # them) fit them, and the runs without checkpointing fit their own terms with those held.
    for ckpt, names in (("unsloth", MEMORY_COEFFS_CKPT), ("off", MEMORY_COEFFS_NOCKPT)):
        sel = [r for r in mem_runs if r.setup.checkpointing == ckpt]
        held = {n: values[n] for n in names if n in values}
        names = tuple(n for n in names if n not in held)
        if not sel:
            continue
        # Each run's peak is in the phase the coefficients put it in (memory.loss_sets_peak): fit with every
        # peak in the backward pass, find each run's phase under that fit, refit, until no run changes phase.
        phases = [False] * len(sel)
        for _ in range(10):
            cols = [_features(r, names, ph, held) for r, ph in zip(sel, phases)]
            y = [r.row["peak_alloc_gib"] * GIB - loaded_bytes(r) - fixed - known for r, (_, known) in zip(sel, cols)]
            fitted = dict(zip(names, _solve([c for c, _ in cols], y, [pri[n] for n in names] if pri else None)))
            trial = _unit(**{**values, **fitted})
            new = [memory.loss_sets_peak(memory.components_bytes(r.model, r.setup, trial)) for r in sel]
            if new == phases:
                break
            phases = new
        values.update(fitted)
    contexts = [r.row["context_gib"] * GIB for r in runs if r.row.get("context_gib") is not None]
    values["context_bytes"] = statistics.median(contexts)

    values.update(_fit_speed([r for r in runs if r.row.get("step_s") and speed_valid(r)], gpu, prior, floor_fit))
    if pri:
        if not any(r.setup.checkpointing == "off" for r in runs):  # never exercised: the prior's, as is
            values.update({n: pri[n] for n in ("nockpt_per_hidden", "nockpt_per_intermediate",
                                               "nockpt_layer_overhead_s")})
        values.update({n: pri[n] for n in MEMORY_COEFFS_CKPT + MEMORY_COEFFS_NOCKPT if n not in values})
    values.update(_fit_slack(mem_runs, values, pri))
    coeffs = Coefficients(**values, gpu=gpu, source=source)  # type: ignore[arg-type]
    return coeffs, residuals(every, coeffs, gpu)


SLACK_COEFFS = ("slack_ratio", "qlora_slack_ratio", "nockpt_slack_ratio")


def _fit_slack(runs: list[Run], values: dict[str, float], prior: dict[str, Any] | None) -> dict[str, float]:
    """Measured peak reserved - peak allocated against the step's bytes as the fitted terms give them:
    one ratio with checkpointing (plus QLoRA's extra), one without. A ratio no run exercises stays the
    prior's (0 without one)."""
    fitted = _unit(**{k: v for k, v in values.items() if k in MEMORY_COEFFS_CKPT + MEMORY_COEFFS_NOCKPT})

    def step(r: Run) -> float:
        return float(memory.step_bytes(memory.components_bytes(r.model, r.setup, fitted)))

    out = {n: (prior[n] if prior else 0.0) for n in SLACK_COEFFS}
    for ckpt in ("unsloth", "off"):
        sel = [r for r in runs if r.setup.checkpointing == ckpt]
        names = ("slack_ratio", "qlora_slack_ratio") if ckpt == "unsloth" else ("nockpt_slack_ratio",)
        if ckpt == "unsloth" and not any(r.setup.method == "qlora" for r in sel):
            names = ("slack_ratio",)
        if not sel:
            continue
        steps = [step(r) for r in sel]
        x = [[b, b * (r.setup.method == "qlora")][:len(names)] for r, b in zip(sel, steps)]
        y = [(r.row["peak_reserved_gib"] - r.row["peak_alloc_gib"]) * GIB for r in sel]
        out.update(zip(names, _solve(x, y, [prior[n] for n in names] if prior else None)))
    return out


def _fit_speed(runs: list[Run], gpu: str, prior: Coefficients | None = None,
               floor_fit: str = "least_squares") -> dict[str, float]:
    """micro-batch s = max(GPU line, host floor): the GPU line is FLOPs / (peak x mfu) + (elementwise +
    dequant bytes) / bandwidth, fitted on the large micro-batches that keep the GPU busy; the floor is
    fixed + layers x per-layer cost (+ QLoRA's per layer, + offloaded GB), fitted on the small micro-batches
    measured clearly above that line: by least squares (one host's probes), or minimax over runs pooled
    from several hosts (floor_fit="minimax", every term free)."""
    g = resolve_gpu(gpu)
    peak, bandwidth = g.tensor_tflops * 1e12, g.bandwidth_gb_s * 1e9

    def gpu_cols(r: Run) -> list[float]:
        return [speed.timed_flops_per_token(r.model, r.setup) * r.setup.tokens / peak,
                speed.elementwise_units(r.model, r.setup) / bandwidth,
                speed.quantized_weights(r.model, r.setup) / bandwidth]

    def floor_cols(r: Run) -> list[float]:
        layers, ckpt = float(r.model.num_hidden_layers), r.setup.checkpointing == "unsloth"
        return [1.0, layers if ckpt else 0.0, 0.0 if ckpt else layers, layers if r.setup.method == "qlora" else 0.0,
                speed.offload_gb(r.model, r.setup)]

    line_prior = floor_prior = None
    if prior is not None:
        # Both are in units that carry over between GPUs (a FLOP share, bytes, seconds), as the estimator uses them.
        line_prior = [1 / prior.mfu, prior.elementwise_bytes, prior.dequant_bytes]
        floor_prior = [prior.step_overhead_s, prior.layer_overhead_s, prior.nockpt_layer_overhead_s,
                       prior.qlora_layer_overhead_s, prior.offload_s_per_gb]
    big = [r for r in runs if r.setup.tokens >= GPU_BOUND_TOKENS] or runs
    gpu_coef = _solve([gpu_cols(r) for r in big], [r.row["step_s"] for r in big], line_prior)
    line = {id(r): sum(c * x for c, x in zip(gpu_cols(r), gpu_coef)) for r in runs}
    host_bound = [r for r in runs if r.setup.tokens <= HOST_BOUND_TOKENS
                  and r.row["step_s"] > HOST_BOUND_MARGIN * line[id(r)]] or runs
    # The floor's QLoRA and per-token (offload) parts need `rigplan calibrate`'s 1 x 512 probes beside its
    # 1 x 2048 ones on one host; without such probes they are held at the prior's values (0 without one),
    # since noise and the differences between hosts would otherwise pass for them.
    cols = [floor_cols(r) for r in host_bound]
    if floor_fit == "minimax":
        bound = {id(r) for r in host_bound}
        others = [r for r in runs if id(r) not in bound]
        overhead, per_layer, nockpt_per_layer, qlora_per_layer, offload = _solve_minimax(
            cols, [r.row["step_s"] for r in host_bound], [floor_cols(r) for r in others],
            [r.row["step_s"] for r in others])
    elif not any(r.setup.tokens <= FLOOR_PROBE_TOKENS for r in host_bound):
        held = [0.0, 0.0] if floor_prior is None else floor_prior[3:]
        y = [r.row["step_s"] - sum(h * c for h, c in zip(held, col[3:])) for r, col in zip(host_bound, cols)]
        overhead, per_layer, nockpt_per_layer = _solve([c[:3] for c in cols], y,
                                                       floor_prior[:3] if floor_prior else None)
        qlora_per_layer, offload = held
    else:
        overhead, per_layer, nockpt_per_layer, qlora_per_layer, offload = _solve(
            cols, [r.row["step_s"] for r in host_bound], floor_prior)
    inv_mfu, elem, deq = gpu_coef
    return {"mfu": 1 / inv_mfu if inv_mfu else 0.0, "elementwise_bytes": elem, "dequant_bytes": deq,
            "step_overhead_s": overhead, "layer_overhead_s": per_layer, "nockpt_layer_overhead_s": nockpt_per_layer,
            "qlora_layer_overhead_s": qlora_per_layer, "offload_s_per_gb": offload}


def predict(run: Run, coeffs: Coefficients, gpu: str) -> dict[str, float]:
    """The estimator's numbers for one measured run."""
    parts = memory.components_bytes(run.model, run.setup, coeffs)
    g = resolve_gpu(gpu)
    return {"peak_alloc_gib": memory.peak_allocated_bytes(parts) / GIB,
            "peak_reserved_gib": memory.peak_reserved_bytes(parts) / GIB,
            "tok_per_s": speed.tokens_per_s(run.model, run.setup, g, coeffs)}


def residuals(runs: list[Run], coeffs: Coefficients, gpu: str) -> dict[str, Any]:
    """Relative errors (predicted / measured - 1) per run, and their worst absolute values."""
    table = []
    for r in runs:
        p = predict(r, coeffs, gpu)
        # A run's memory counts only when its process started clean; its speed only when it was timed
        # on the training path (the same rules as bench/accuracy.py).
        table.append({"run": r.label,
                      "peak_reserved_err": p["peak_reserved_gib"] / r.row["peak_reserved_gib"] - 1
                      if r.row.get("clean_load", True) else None,
                      "tok_per_s_err": p["tok_per_s"] / r.row["tok_per_s"] - 1
                      if r.row.get("tok_per_s") and speed_valid(r) else None})
    mem = [abs(t["peak_reserved_err"]) for t in table if t["peak_reserved_err"] is not None]
    tps = [abs(t["tok_per_s_err"]) for t in table if t["tok_per_s_err"] is not None]
    return {"max_abs_peak_reserved_err": max(mem, default=0.0), "max_abs_tok_per_s_err": max(tps, default=0.0),
            "runs": table}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--gpu", required=True)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--floor-fit", choices=["least_squares", "minimax"], default="least_squares",
                        help="how the host floor is fitted: minimax for runs pooled from several hosts")
    args = parser.parse_args(argv)
    runs = load_runs(args.runs)
    coeffs, res = fit(runs, args.gpu, source=", ".join(p.name for p in args.runs), floor_fit=args.floor_fit)
    print(json.dumps(dataclasses.asdict(coeffs), indent=2))
    for t in res["runs"]:
        tps = f"{t['tok_per_s_err']:+7.1%}" if t["tok_per_s_err"] is not None else "      -"
        mem = f"{t['peak_reserved_err']:+7.1%}" if t["peak_reserved_err"] is not None else "      -"
        print(f"{t['run']:45} mem {mem}  tok/s {tps}")
    print(f"max |mem err| {res['max_abs_peak_reserved_err']:.1%}   max |tok/s err| {res['max_abs_tok_per_s_err']:.1%}")
    if args.out:
        from rigplan.store import write_calibration

        prov = next((r.row["provenance"] for r in runs if r.row.get("provenance")), {})
        write_calibration(args.out, coeffs, res, runs_files=[str(p) for p in args.runs],
                          provenance={k: prov.get(k) for k in ("gpu", "driver", "cuda", "packages")}
                          | {"date": (prov.get("date") or "")[:10], "command": "python -m rigplan.calibration.fit "
                             + " ".join(str(p) for p in args.runs) + f" --gpu {args.gpu} --floor-fit {args.floor_fit}"})


if __name__ == "__main__":
    main()
