"""rigplan's trainer vs plain transformers + PEFT (the HF baseline) vs a bare Unsloth loop, same data and plan.

    python bench/train_throughput.py --model llama-3.1-8b --method lora --examples 500 --out DIR

Builds a random-weight replica of the architecture (full depth) and a dataset of equal-length examples, plans
it for the local GPU, then runs each part in its own process (a process that ran another model keeps some
of its memory): `rigplan` (trainer/run.py, Unsloth engine), `hf` (same code, transformers + PEFT engine),
`bare` (Unsloth forward/backward/AdamW8bit steps on the plan's shapes, calibration/probe.py). Prints a table,
writes DIR/train_throughput.json. Goals (issue 4): rigplan >= 1.8x the HF baseline's tokens/s, <= 0.75x its
peak memory, and within 5% of the bare loop. Runs on CPU too (engine hf for every part), for a smoke test.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

# "w1000".."w3999": one token each with the code-made tokenizer, so every example has the same length and
# no padding differs between the parts. 2000 words: 2048-token sequences, where activations matter
# (at 120 words every part was host-overhead-bound and weights dominated memory: bench/results/).
DEFAULT_WORDS = 2000
SPEED_RATIO_GOAL, MEMORY_RATIO_GOAL, OVERHEAD_GOAL = 1.8, 0.75, 0.05


def make_data(path: Path, examples: int, words: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(examples):
            f.write(json.dumps({"text": " ".join(f"w{rng.randrange(1000, 4000)}" for _ in range(words))}) + "\n")


def part(args: argparse.Namespace) -> dict:
    """One measurement, in this process."""
    from rigplan.estimator.plan import Plan

    plan = Plan.from_json(Path(args.plan).read_text())
    if args.part == "bare":
        import torch

        from rigplan.calibration.probe import measure_shape
        from rigplan.trainer.data import validate
        from rigplan.trainer.engine import import_engine, load

        import_engine(args.engine)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(plan.model_path)
        _, good, _ = validate(Path(args.data))
        seq = len(tok(good[0][1]["text"])["input_ids"]) + 1
        model, _ = load(plan, args.engine)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        if torch.cuda.is_available():
            import bitsandbytes as bnb

            opt = bnb.optim.AdamW8bit(params, lr=plan.learning_rate)
        else:
            opt = torch.optim.AdamW(params, lr=plan.learning_rate)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        row = measure_shape(model, opt, model.config.vocab_size, plan.micro_batch, seq, device)
        return {"part": "bare", "tokens_per_s": row["tok_per_s"], "peak_reserved_gib": row.get("peak_reserved_gib"),
                "peak_allocated_gib": row.get("peak_alloc_gib"), "seq": seq, "micro_batch": plan.micro_batch}
    from rigplan.trainer.run import RunOptions, train

    s = train(plan, RunOptions(data=Path(args.data), out_dir=Path(args.run_dir), max_steps=args.steps,
                               save_steps=10_000, eval_fraction=0.0, engine=args.engine))
    return {"part": args.part, "status": s["status"], "steps": s["global_step"], **s["measured"],
            "first_loss": s["first_loss"], "final_loss": s["final_loss"], "predicted": s["predicted"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--method", choices=["lora", "qlora"], default="lora")
    p.add_argument("--examples", type=int, default=500)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--words", type=int, default=DEFAULT_WORDS, help="words (= tokens) per example")
    p.add_argument("--parts", default="rigplan,hf,bare")
    p.add_argument("--out", type=Path, default=Path("bench/throughput"))
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: a toy-sized replica")
    p.add_argument("--part", help=argparse.SUPPRESS)
    p.add_argument("--plan", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    p.add_argument("--engine", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.part:
        print("RESULT " + json.dumps(part(args)), flush=True)
        return 0

    import torch

    from rigplan import check
    from rigplan.calibration.replica import build_replica, toy
    from rigplan.profiles.catalog import resolve_model

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    spec = resolve_model(args.model)
    if args.tiny:
        spec = toy(spec)
    model_dir = out / "model"
    if not (model_dir / "config.json").exists():
        build_replica(spec, model_dir, device="cuda" if cuda else "cpu", dtype="bfloat16" if cuda else "float32")
    data = out / "data.jsonl"
    make_data(data, args.examples, args.words)
    plan = check.plan_for_run(str(model_dir), "auto", data, {"method": args.method if cuda else None})
    (out / "plan.json").write_text(plan.to_json())
    results = {}
    for name in args.parts.split(","):
        engine = "unsloth" if cuda and name in ("rigplan", "bare") else "hf"
        cmd = [sys.executable, __file__, "--part", name, "--plan", str(out / "plan.json"), "--data", str(data),
               "--run-dir", str(out / f"run-{name}"), "--engine", engine, "--steps", str(args.steps)]
        if (out / f"run-{name}").exists():
            subprocess.run(["rm", "-rf", str(out / f"run-{name}")], check=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        (out / f"log-{name}.txt").write_text(proc.stdout + proc.stderr)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        results[name] = json.loads(line[7:]) if line else {"part": name, "error": proc.stderr[-2000:]}
        print(name, json.dumps(results[name]), flush=True)
    r, h, b = (results.get(k, {}) for k in ("rigplan", "hf", "bare"))

    def ratio(x, y):
        return round(x / y, 3) if x and y else None

    summary = {"model": spec.id, "method": plan.method, "plan": json.loads(plan.to_json()),
               "speed_vs_hf": ratio(r.get("tokens_per_s"), h.get("tokens_per_s")),
               "memory_vs_hf": ratio(r.get("peak_reserved_gib"), h.get("peak_reserved_gib")),
               "speed_vs_bare": ratio(r.get("tokens_per_s"), b.get("tokens_per_s")), "results": results,
               "goals": {"speed_vs_hf": SPEED_RATIO_GOAL, "memory_vs_hf": MEMORY_RATIO_GOAL,
                         "speed_vs_bare": 1 - OVERHEAD_GOAL}}
    from rigplan.calibration.probe import provenance

    summary["provenance"] = provenance()
    (out / "train_throughput.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{'part':8} {'tok/s':>10} {'peak reserved GiB':>18}")
    for k, v in results.items():
        print(f"{k:8} {v.get('tokens_per_s') or 0:>10,.0f} {v.get('peak_reserved_gib') or 0:>18.2f}")
    print(f"rigplan / hf tokens/s {summary['speed_vs_hf']} (goal >= {SPEED_RATIO_GOAL}); peak memory "
          f"{summary['memory_vs_hf']} (goal <= {MEMORY_RATIO_GOAL}); rigplan / bare {summary['speed_vs_bare']} "
          f"(goal >= {1 - OVERHEAD_GOAL})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
