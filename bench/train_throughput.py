"""rigplan's trainer vs plain transformers + PEFT (the HF baseline) vs a bare Unsloth loop, same data and plan.

    python bench/train_throughput.py --model llama-3.1-8b --method lora --examples 320 --steps 0 --out DIR

Builds a random-weight replica of the architecture (full depth) and a dataset of examples of varied length
(--lengths, words = tokens; --words N for equal lengths), plans it for --plan-gpu (default auto: the local
GPU's own plan, as `rigplan run` trains it; rtx-4090: the plan a 24 GB card gets, run on the local GPU), then
runs each part in its own process (a process that ran another model keeps some of its memory): `rigplan`
(trainer/run.py, Unsloth engine), `bare` (forward/backward/AdamW8bit steps on the same Unsloth model with
nothing around them: the trainer's examples in the trainer's order and micro-batches, collated as it collates
them, padded or padding-free alike), `hf-plain` (the HF baseline: the same plan, data and batches through
transformers + PEFT, checkpointing included, the loss computed as transformers computes it, full logits) and
`hf` (the same, with TRL 1.15's chunked LM head). Every part counts only real (non-padding) tokens, after the
same warm-up steps. --steps 0: one epoch. Prints a table, writes DIR/train_throughput.json (after every part).
Goals (issue 4): rigplan >= 1.8x the HF baseline's tokens/s, <= 0.75x its peak memory, and
within 5% of the bare loop. Runs on CPU too (engine hf for every part), for a smoke test:

    python bench/train_throughput.py --tiny --steps 3 --out /tmp/tp
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import subprocess
import sys
import time
from pathlib import Path

# "w1000".."w3999": one token each with the code-made tokenizer (calibration/replica.py), so an example of n
# words has n tokens plus EOS. Up to 2000 words: the longest fit a 2048-token sequence. Varied lengths are
# where padding-free batching matters (at equal lengths it saves nothing).
DEFAULT_LENGTHS, TINY_LENGTHS = "256-2000", "8-96"
# The plan rigplan recommends for the GPU it runs on ("auto"), as `rigplan run` would train it; a catalogue id
# (rtx-4090: micro-batch 1, host-bound on an H100) runs another card's plan on the local one.
DEFAULT_PLAN_GPU = "auto"
SPEED_RATIO_GOAL, MEMORY_RATIO_GOAL, OVERHEAD_GOAL = 1.8, 0.75, 0.05


def _examples(examples: int, lengths: tuple[int, int], seed: int = 0):
    rng = random.Random(seed)
    for _ in range(examples):
        n = rng.randint(*lengths)
        yield [f"w{rng.randrange(1000, 4000)}" for _ in range(n)]


def make_data(path: Path, examples: int, lengths: tuple[int, int], seed: int = 0) -> None:
    """Text examples of uniformly drawn word counts in [lengths[0], lengths[1]]."""
    with path.open("w") as f:
        for words in _examples(examples, lengths, seed):
            f.write(json.dumps({"text": " ".join(words)}) + "\n")


def make_lengths(examples: int, lengths: tuple[int, int] | str, seed: int = 0) -> list[int]:
    """Tokens per example of make_data's file, without writing it: its words, one token each, plus EOS."""
    if isinstance(lengths, str):
        lengths = tuple(int(x) for x in lengths.split("-"))  # type: ignore[assignment]
    return [len(words) + 1 for words in _examples(examples, lengths, seed)]  # type: ignore[arg-type]


def bare(plan, args: argparse.Namespace) -> dict:
    """Forward, backward and optimizer steps with nothing else: the trainer's micro-batches (same examples in
    the same order, same collator, same padding-free choice), accumulation, loss normalisation, autocast and
    warm-up rule; the clock read after a sync. No clipping, scheduler, logging or callbacks."""
    import torch

    from rigplan.trainer.batching import PackedCollator
    from rigplan.trainer.engine import import_engine, load
    from rigplan.trainer.run import WARMUP_STEPS, RunOptions, prepare_data

    import_engine(plan.engine)
    from transformers import AutoTokenizer, set_seed
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    tok = AutoTokenizer.from_pretrained(plan.model_path)
    prepared = prepare_data(plan, tok, RunOptions(data=Path(args.data), out_dir=Path(args.run_dir), eval_fraction=0.0))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    collate = (PackedCollator(pad) if plan.batching == "packed"
               else DataCollatorForLanguageModeling(pad_token_id=pad))
    micro = 1 if plan.batching == "packed" else plan.micro_batch  # dataset rows per micro-batch
    set_seed(plan.seed)
    model, _ = load(plan)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    cuda = torch.cuda.is_available()
    if cuda:
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit(params, lr=plan.learning_rate)
    else:
        opt = torch.optim.AdamW(params, lr=plan.learning_rate)
    device = "cuda" if cuda else "cpu"

    def autocast():  # the trainer's forward runs under bf16 autocast (SFTConfig bf16=True on CUDA)
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    # The trainer's order: accelerate's SeedableRandomSampler, a torch.randperm seeded with data_seed (the
    # plan's seed) plus the epoch (accelerate/data_loader.py:91-103).
    rows, per_step = prepared.train, micro * plan.grad_accum
    n_steps = args.steps if args.steps > 0 else -(-len(rows) // per_step)
    steps: list[list[int]] = []  # example indices of each optimizer step
    for epoch in range(-(-n_steps * per_step // len(rows))):
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(plan.seed + epoch)).tolist()
        steps += [order[i:i + per_step] for i in range(0, len(rows), per_step)]
    steps = steps[:n_steps]
    warmup = min(WARMUP_STEPS, len(steps) // 4)  # trainer/run.py's rule
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    tokens, times, step_tokens = 0, [], []
    t_start = time.perf_counter()
    for i, step in enumerate(steps):
        batches = [collate([rows[j] for j in step[k:k + micro]]) for k in range(0, len(step), micro)]
        tokens += sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
                      for b in batches)
        # Pinned, non-blocking copies, as the trainer's on Unsloth (unsloth/models/_utils.py:414-434): a
        # blocking host-to-device copy waits for the GPU.
        batches = [{k: (v.pin_memory() if cuda else v).to(device, non_blocking=True) for k, v in b.items()}
                   for b in batches]
        n_items = sum((b["labels"][..., 1:] != -100).sum() for b in batches)  # as transformers counts them
        for b in batches:
            with autocast():
                loss = model(**b, use_cache=False, num_items_in_batch=n_items).loss
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda and i in (warmup, len(steps) - 1):
            torch.cuda.synchronize()
        times.append(time.perf_counter())
        step_tokens.append(tokens)
    out = {"part": "bare", "steps": len(steps), "batching": prepared.report["batching"], "tokens": tokens,
           "tokens_per_s": round((step_tokens[-1] - step_tokens[warmup]) / (times[-1] - times[warmup]), 1)
           if len(steps) - warmup >= 2 else None,
           "tokens_per_s_with_warmup": round(tokens / (times[-1] - t_start), 1), "final_loss": float(loss)}
    if cuda:
        gib = 2**30
        out.update(peak_allocated_gib=round(torch.cuda.max_memory_allocated() / gib, 3),
                   peak_reserved_gib=round(torch.cuda.max_memory_reserved() / gib, 3))
    return out


def part(args: argparse.Namespace) -> dict:
    """One measurement, in this process."""
    from rigplan.estimator.plan import Plan

    import dataclasses

    plan = Plan.from_json(Path(args.plan).read_text())
    if args.batching == "random":  # plain TRL: micro_batch examples in random order, padded to the longest
        import random

        from rigplan.trainer import batching

        def random_groups(lengths: list[int], micro_batch: int) -> list[list[int]]:
            order = list(range(len(lengths)))
            random.Random(plan.seed).shuffle(order)
            return [order[i:i + micro_batch] for i in range(0, len(order), micro_batch)]

        batching.group = random_groups
    plan = dataclasses.replace(plan, engine=args.engine,
                               batching="padded" if args.batching == "random" else args.batching)
    kind = args.part.split("@")[0]  # rigplan@2: a second run of the same part, to see run-to-run spread
    if kind == "bare":
        return bare(plan, args)
    if kind == "hf-plain":
        # transformers' own causal-LM loss (full logits), as a plain transformers + PEFT loop computes it
        # (the HF rows of profiles/calibrations/h100-runs/shared-h100-unsloth-runs.jsonl), instead of TRL 1.15's
        # chunked LM head (trl/trainer/utils.py:1545-1690),
        # which keeps the logits out of memory: rigplan's trainer falls back to the model's loss without it.
        import trl.trainer.utils

        trl.trainer.utils._ChunkedLogProbFunction = None
    from rigplan.trainer.run import RunOptions, train

    if kind.startswith("rigplan-"):
        trainer_variant(kind.split("-")[1:])
    s = train(plan, RunOptions(data=Path(args.data), out_dir=Path(args.run_dir), max_steps=args.steps or -1,
                               save_steps=10_000, eval_fraction=0.0))
    report = json.loads((Path(args.run_dir) / "data_report.json").read_text())
    return {"part": args.part, "status": s["status"], "steps": s["global_step"], "batching": report["batching"],
            **s["measured"], "first_loss": s["first_loss"], "final_loss": s["final_loss"], "predicted": s["predicted"]}


# rigplan's trainer with one of its costs taken away, to find where its host time goes on host-bound plans
# (h100-tp7-qlora-4090.json: 0.86x the bare loop): parts named rigplan-noclip, rigplan-inplace, rigplan-nolog or
# several joined (rigplan-noclip-inplace-nolog).
VARIANTS = {
    "noclip": "no gradient clipping (max_grad_norm 0: the bare loop clips nothing)",
    "inplace": "gradients accumulate in place, as in the bare loop, instead of the out-of-memory backoff's fresh "
             "gradients per micro-batch added back with torch._foreach_add_",
    "nolog": "no logging during the run (each log reads the loss back from the GPU)",
}


def trainer_variant(names: list[str]) -> None:
    """Patch trainer/run.py for this process only (a bench part), as VARIANTS describes."""
    from rigplan.trainer import run as runlib

    unknown = set(names) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown trainer variant(s) {sorted(unknown)}; known: {sorted(VARIANTS)}")
    config = runlib.sft_config_from_plan
    trainer_class = runlib._trainer_class

    def patched_config(*a, **kw):
        cfg = config(*a, **kw)
        if "noclip" in names:
            cfg.max_grad_norm = 0.0
        if "nolog" in names:
            cfg.logging_steps = 10**9
        return cfg

    def patched_class(guard, engine="hf"):
        cls = trainer_class(guard, engine)
        if "inplace" in names:
            parent = cls.__mro__[1]

            def training_step(self, model, inputs, num_items_in_batch=None):
                loss = parent.training_step(self, model, inputs, num_items_in_batch)
                guard.count(inputs)
                return loss

            cls.training_step = training_step
        return cls

    runlib.sft_config_from_plan = patched_config
    runlib._trainer_class = patched_class


def summarize(model: str, plan, args: argparse.Namespace, lengths: tuple[int, int], results: dict,
              prov: dict) -> dict:
    r, h, b, hp = (results.get(k, {}) for k in ("rigplan", "hf", "bare", "hf-plain"))

    def ratio(x, y):  # 4 places: at 3, 0.94972 printed and passed as 0.95
        return round(x / y, 4) if x and y else None

    # The HF baseline of the goals is plain transformers + PEFT, computing the loss as transformers does
    # (hf-plain); `hf` (the same trainer with TRL 1.15's chunked LM head on that engine) is a second reference.
    base_name = "hf-plain" if hp.get("tokens_per_s") else "hf"
    base = hp if base_name == "hf-plain" else h
    speed_vs_base = ratio(r.get("tokens_per_s"), base.get("tokens_per_s"))
    memory_vs_base = ratio(r.get("peak_reserved_gib"), base.get("peak_reserved_gib"))
    speed_vs_bare = ratio(r.get("tokens_per_s"), b.get("tokens_per_s"))
    met = {"speed_vs_baseline": speed_vs_base is not None and speed_vs_base >= SPEED_RATIO_GOAL,
           "memory_vs_baseline": memory_vs_base is not None and memory_vs_base <= MEMORY_RATIO_GOAL,
           "speed_vs_bare": speed_vs_bare is not None and speed_vs_bare >= 1 - OVERHEAD_GOAL}
    return {"model": model, "method": plan.method, "plan_gpu": args.plan_gpu,
            "baseline": base_name, "speed_vs_baseline": speed_vs_base, "memory_vs_baseline": memory_vs_base,
            "goals_met": met,
            "data": {"examples": args.examples, "words": list(lengths),
                     "batching": r.get("batching") or b.get("batching")},
            "plan": json.loads(plan.to_json()),
            "tokens_counted": "real (non-padding) tokens, after the same warm-up steps, in every part",
            "speed_vs_hf": ratio(r.get("tokens_per_s"), h.get("tokens_per_s")),
            "memory_vs_hf": ratio(r.get("peak_reserved_gib"), h.get("peak_reserved_gib")),
            "speed_vs_bare": speed_vs_bare,
            "speed_vs_hf_plain": ratio(r.get("tokens_per_s"), hp.get("tokens_per_s")),
            "memory_vs_hf_plain": ratio(r.get("peak_reserved_gib"), hp.get("peak_reserved_gib")), "results": results,
            "goals": {"speed_vs_baseline": SPEED_RATIO_GOAL, "memory_vs_baseline": MEMORY_RATIO_GOAL,
                      "speed_vs_bare": 1 - OVERHEAD_GOAL}, "provenance": prov}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--method", choices=["lora", "qlora"], default="lora")
    p.add_argument("--plan-gpu", default=DEFAULT_PLAN_GPU,
                   help="catalogue GPU to plan for (auto: the local one); the plan runs on the local GPU")
    p.add_argument("--examples", type=int, default=500)
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per part; 0: one epoch")
    p.add_argument("--lengths", help=f"MIN-MAX words (= tokens) per example (default {DEFAULT_LENGTHS}; "
                                     f"--tiny {TINY_LENGTHS})")
    p.add_argument("--words", type=int, help="every example this many words long (instead of --lengths)")
    p.add_argument("--micro-batch", type=int, help="override the plan's micro-batch (same effective batch), "
                                                    "as `rigplan run --batch` would")
    p.add_argument("--parts", default="rigplan,bare,hf-plain,hf",
                   help="in this order (the HF engine's parts, the slowest, last); hf-plain: the HF baseline, "
                        "transformers + PEFT with transformers' own loss (full logits); hf: the same with TRL "
                        "1.15's chunked LM head")
    p.add_argument("--batching", choices=["auto", "packed", "padded", "random"], default="auto",
                   help="as rigplan run --batching, in rigplan's and the bare loop's parts (auto: the plan's)")
    p.add_argument("--baseline-batching", choices=["random", "packed", "padded"], default="random",
                   help="the HF baseline's parts (hf-plain, hf): random: micro-batches of examples in random order "
                        "padded to the longest, as plain TRL trains; padded: rigplan's length-sorted groups")
    p.add_argument("--data-file", type=Path, help="train on this file instead of generating one")
    p.add_argument("--out", type=Path, default=Path("bench/throughput"))
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: a toy-sized replica")
    p.add_argument("--profile", action="store_true",
                   help="run each part under cProfile; its costliest functions (own and cumulative time) and the "
                        "callers of module walks, copies, collections and syncs go to DIR/profile-PART.txt: where "
                        "the trainer's host time goes that the bare loop's does not "
                        "(cProfile slows Python, so the part's tokens/s is not comparable then)")
    p.add_argument("--part", help=argparse.SUPPRESS)
    p.add_argument("--plan", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    p.add_argument("--engine", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.part and args.profile:  # the part, model loading included (in both the trainer and the bare loop)
        import cProfile
        import io
        import pstats

        profiler = cProfile.Profile()
        result = profiler.runcall(part, args)
        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text)
        stats.sort_stats("tottime").print_stats(40)
        stats.sort_stats("cumulative").print_stats(60)
        # Who calls what the trainer did more often than the bare loop on the H100 (h100-tp7 profile): module
        # walks (one per micro-batch), tensor copies, garbage collections.
        for name in (r"\(named_modules\)", r"\(modules\)", r"\(parameters\)", r"\(_named_members\)",
                     "method 'to'", "gc.collect", "synchronize", "item"):
            stats.print_callers(name)
        (Path(args.run_dir).parent / f"profile-{args.part}.txt").write_text(text.getvalue())
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    if args.part:
        print("RESULT " + json.dumps(part(args)), flush=True)
        return 0

    import torch

    from rigplan import planning as check
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
    if args.words:
        lengths = (args.words, args.words)
    else:
        lo, hi = (int(x) for x in (args.lengths or (TINY_LENGTHS if args.tiny else DEFAULT_LENGTHS)).split("-"))
        lengths = (lo, hi)
    data = out / "data.jsonl"
    if args.data_file:
        data = args.data_file
    else:
        make_data(data, args.examples, lengths)
    # QLoRA needs CUDA (bitsandbytes): a CPU smoke test plans LoRA.
    changes = {"method": args.method if cuda else "lora"}
    from rigplan.trainer.engine import count_tokens

    counted = count_tokens(str(model_dir), data)
    plan = check.plan_for_run(str(model_dir), args.plan_gpu, data, changes, counted=counted)
    if args.micro_batch:  # re-planned with the change, so the prediction is for the data's lengths too
        changes.update(micro_batch=args.micro_batch,
                       grad_accum=max(1, plan.micro_batch * plan.grad_accum // args.micro_batch))
        plan = check.plan_for_run(str(model_dir), args.plan_gpu, data, changes, counted=counted)
    (out / "plan.json").write_text(plan.to_json())
    from rigplan.calibration.probe import provenance

    results: dict[str, dict] = {}
    prov = provenance()
    # Every part gets the same batches: auto is settled once, as the plan made it for rigplan's engine (the
    # trainer's auto rule differs between engines: trainer/run.py).
    for name in args.parts.split(","):
        kind = name.split("@")[0]
        ours = kind in ("rigplan", "bare") or kind.startswith("rigplan-")
        engine = "unsloth" if cuda and ours else "transformers"
        batching = (plan.batching if args.batching == "auto" else args.batching) if ours else args.baseline_batching
        cmd = [sys.executable, __file__, *(["--profile"] if args.profile else []), "--part", name, "--plan", str(out / "plan.json"), "--data", str(data),
               "--run-dir", str(out / f"run-{name}"), "--engine", engine, "--steps", str(args.steps),
               "--batching", batching]
        if (out / f"run-{name}").exists():
            subprocess.run(["rm", "-rf", str(out / f"run-{name}")], check=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        (out / f"log-{name}.txt").write_text(proc.stdout + proc.stderr)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        results[name] = json.loads(line[7:]) if line else {"part": name, "error": proc.stderr[-2000:]}
        print(name, json.dumps(results[name]), flush=True)
        summary = summarize(spec.id, plan, args, lengths, results, prov)
        (out / "train_throughput.json").write_text(json.dumps(summary, indent=2) + "\n")  # after every part
    r, b = results.get("rigplan", {}), results.get("bare", {})
    print(f"plan ({args.plan_gpu}): {plan.method} r{plan.rank}, micro-batch {plan.micro_batch} x {plan.grad_accum}, "
          f"seq {plan.seq_len}, checkpointing {plan.checkpointing}; {args.examples} examples of "
          f"{lengths[0]}-{lengths[1]} words, {r.get('batching') or b.get('batching')} batches")
    print(f"{'part':8} {'tok/s':>10} {'peak reserved GiB':>18} {'tokens':>10}")
    for k, v in results.items():
        print(f"{k:8} {v.get('tokens_per_s') or 0:>10,.0f} {v.get('peak_reserved_gib') or 0:>18.2f} "
              f"{v.get('tokens') or 0:>10,}")
    print(f"rigplan / {summary['baseline']} (the HF baseline) tokens/s {summary['speed_vs_baseline']} (goal >= "
          f"{SPEED_RATIO_GOAL}); peak memory {summary['memory_vs_baseline']} (goal <= {MEMORY_RATIO_GOAL}); "
          f"rigplan / bare {summary['speed_vs_bare']} (goal >= {1 - OVERHEAD_GOAL}); goals met: {summary['goals_met']}")
    if "hf" in results and summary["baseline"] != "hf":
        print(f"rigplan / hf (TRL's chunked LM head) tokens/s {summary['speed_vs_hf']}, peak memory {summary['memory_vs_hf']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
