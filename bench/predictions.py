"""Write down the estimate for probe jobs before the run that checks them, then compare after:

    python bench/predictions.py predict --gpu h200 --out bench/results/predictions/issue17.json JOB [JOB ...]
    python bench/predictions.py compare bench/results/predictions/issue17.json RUNS.jsonl

    python bench/predictions.py runs --examples 900 --seed 2 --out F.json CASE [CASE ...]

`runs` writes down the plans `rigplan run` makes for bench/validation_data.py's data on a full-depth replica
(tokens counted with the replica's code-made tokenizer, as on the GPU machine), before the runs: a CASE is
NAME=GPU:METHOD:GPUS[:MICRO_BATCH:GRAD_ACCUM][:ddp|fsdp] (as `rigplan run --micro-batch --grad-accum
--parallelism`).
A JOB is calibration/probe.py's MODEL[@LAYERS]:METHOD:RANK:BxS,...[:checkpointing=off]. `predict` records, per
shape, the estimator's peak reserved memory and tokens/s for the GPU with the shipped calibration, the git
commit and the date; `compare` reads the probe's rows (python -m rigplan.calibration.probe --job ... --out
RUNS.jsonl on the GPU machine) and prints measured against predicted, with the errors.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from rigplan import store  # noqa: E402
from rigplan.calibration.probe import Job
from rigplan.calibration.replica import reduced
from rigplan.estimator import planner
from rigplan.estimator.plan import Setup
from rigplan.profiles.catalog import resolve_gpu, resolve_model


def predict(jobs: list[str], gpu_id: str) -> dict:
    gpu, coeffs = resolve_gpu(gpu_id), store.reference()[0]
    rows = []
    for text in jobs:
        job = Job.parse(text)
        spec = reduced(resolve_model(job.model), job.layers)
        for batch, seq in job.shapes:
            setup = Setup(job.method, job.rank, batch, seq, optimizer=job.optimizer,  # type: ignore[arg-type]
                          checkpointing=job.checkpointing)  # type: ignore[arg-type]
            est = planner.estimate(spec, setup, gpu, coeffs)
            rows.append({"model": spec.id, "method": job.method, "rank": job.rank, "batch": batch, "seq": seq,
                         "checkpointing": job.checkpointing, "peak_reserved_gib": round(est.peak_reserved_gib, 3),
                         "tokens_per_s": round(est.tokens_per_s, 1), "host_bound": est.host_bound})
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {"gpu": gpu.id, "calibration": coeffs.source[:80], "commit": commit, "jobs": jobs,
            "written": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "predictions": rows}


def predict_runs(cases: list[str], examples: int, seed: int, model: str = "llama-3.1-8b") -> dict:
    import tempfile

    import validation_data

    from rigplan import planning
    from rigplan.calibration.replica import hf_config, make_tokenizer

    folder = Path(tempfile.mkdtemp())
    data = folder / "data.jsonl"
    validation_data.write(data, examples, seed)
    name, _, layers = model.partition("@")  # MODEL@LAYERS: a reduced-depth replica, as bench/record_h200_runs.sh LAYERS
    hf_config(reduced(resolve_model(name), int(layers) if layers else None)).save_pretrained(folder / "model")  # config and tokenizer: no weights needed
    make_tokenizer().save_pretrained(folder / "model")
    plans = {}
    for case in cases:
        name, spec = case.split("=")
        gpu, method, gpus, *batch = spec.split(":")
        changes = {"method": method}
        if batch and batch[-1] in ("ddp", "fsdp"):  # :fsdp, as rigplan run --parallelism
            changes["parallelism"] = batch.pop()
        if batch:
            changes.update(micro_batch=int(batch[0]), grad_accum=int(batch[1]))
        p = planning.plan_for_run(str(folder / "model"), gpu, data, changes, num_gpus=int(gpus))
        plans[name] = {"gpu": gpu, "num_gpus": p.num_gpus, "parallelism": p.parallelism, "batching": p.batching,
                       "micro_batch": p.micro_batch, "seq_len": p.seq_len, "token_budget": p.budget,
                       "grad_accum": p.grad_accum, "checkpointing": p.checkpointing,
                       "peak_reserved_gib": round(p.peak_reserved_gib, 3), "tokens_per_s": round(p.tokens_per_s, 1),
                       "tokens_per_s_low": round(p.tokens_per_s_low, 1), "tokens_per_s_high": round(p.tokens_per_s_high, 1),
                       "host_bound": p.host_bound, "fill": p.fill, "engine": p.engine, "cpu_offload": p.cpu_offload,
                       "peak_allocated_gib": round(p.peak_allocated_gib, 3)}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {"written": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "commit": commit,
            "model": model, "data": f"python3 bench/validation_data.py --examples {examples} --seed {seed}",
            "cases": cases, "plans": plans}


def compare(predictions: dict, runs: list[dict]) -> list[dict]:
    measured = {(r["model"], r["method"], r["batch"], r["seq"], r.get("checkpointing", "unsloth")): r for r in runs}
    out = []
    for p in predictions["predictions"]:
        r = measured.get((p["model"], p["method"], p["batch"], p["seq"], p["checkpointing"]))
        if not r or r.get("err"):
            out.append({**p, "measured": None, "err": r and r.get("err")})
            continue
        out.append({**p, "measured_peak_reserved_gib": r["peak_reserved_gib"], "measured_tokens_per_s": r["tok_per_s"],
                    "memory_err": round(p["peak_reserved_gib"] / r["peak_reserved_gib"] - 1, 4),
                    "speed_err": round(p["tokens_per_s"] / r["tok_per_s"] - 1, 4)})
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("predict")
    a.add_argument("--gpu", default="h200")
    a.add_argument("--out", type=Path, required=True)
    a.add_argument("jobs", nargs="+")
    r = sub.add_parser("runs")
    r.add_argument("--examples", type=int, default=900)
    r.add_argument("--seed", type=int, default=2)
    r.add_argument("--model", default="llama-3.1-8b")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("cases", nargs="+")
    b = sub.add_parser("compare")
    b.add_argument("predictions", type=Path)
    b.add_argument("runs", type=Path)
    args = p.parse_args()
    if args.cmd == "runs":
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(predict_runs(args.cases, args.examples, args.seed, args.model), indent=1) + "\n")
        print(f"wrote {args.out}")
        return 0
    if args.cmd == "predict":
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(predict(args.jobs, args.gpu), indent=1) + "\n")
        print(f"wrote {args.out}")
        return 0
    rows = compare(json.loads(args.predictions.read_text()),
                   [json.loads(x) for x in args.runs.read_text().splitlines() if x.strip()])
    for r in rows:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
