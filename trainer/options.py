"""How `rigplan run` is asked to go (RunOptions), every problem with that checked before anything loads, and the
checkpoints a run resumes from. Standard library only: the CLI checks these before importing torch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rigplan.errors import require

# Hold out 5% for evaluation once a dataset has this many examples (fewer: every example trains).
EVAL_MIN_EXAMPLES = 200
DEFAULT_EVAL_FRACTION = 0.05
DEFAULT_PATIENCE = 3
DEFAULT_SAVE_STEPS = 50
# Written into a checkpoint once transformers has saved all of it; only such checkpoints are resumed from.
CHECKPOINT_COMPLETE = "rigplan_complete.json"


@dataclass(frozen=True)
class RunOptions:
    """How to run a plan: data, output, and what to do with bad or long examples."""

    data: Path
    """JSONL or JSON file of text, Alpaca, chat or ShareGPT records."""
    out_dir: Path
    """Where plan.json, reports, checkpoints, the adapter and the Modelfile go."""
    skip_bad: bool = False
    """Drop bad records (and say how many) instead of stopping."""
    overlong: Literal["truncate", "drop"] = "truncate"
    """What to do with examples longer than the plan's sequence length."""
    overwrite: bool = False
    """Allow writing into a non-empty output directory."""
    resume: bool = False
    """Continue from the last checkpoint in the output directory."""
    eval_fraction: float | None = None
    """Share of examples held out; None: 5% from 200 examples on, else none."""
    patience: int = DEFAULT_PATIENCE
    """Evaluations without improvement before early stopping."""
    save_steps: int = DEFAULT_SAVE_STEPS
    """Optimizer steps between checkpoints (and evaluations)."""
    max_steps: int = -1
    """Stop after this many optimizer steps (-1: run the plan's epochs)."""
    merge: bool = False
    """Also write merged 16-bit weights."""


def option_problems(opts: RunOptions) -> list[str]:
    """Every problem with how the run is asked to go, gathered: numbers out of range, and an output directory
    that is a file, holds another run, or has nothing to resume."""
    problems = []
    if not Path(opts.data).is_file():
        what = "is a directory" if Path(opts.data).is_dir() else "does not exist"
        problems.append(f"--data {opts.data} {what}; pass a JSONL or JSON file")
    f = opts.eval_fraction
    if f is not None and not (isinstance(f, (int, float)) and math.isfinite(f) and 0 <= f < 1):
        problems.append(f"--eval-fraction {f}: pass a share from 0 up to (not including) 1, such as 0.05")
    for flag, v in (("--patience", opts.patience), ("--save-steps", opts.save_steps)):
        if v < 1:
            problems.append(f"{flag} {v}: pass a whole number >= 1")
    if opts.max_steps == 0 or opts.max_steps < -1:
        problems.append(f"--max-steps {opts.max_steps}: pass a whole number >= 1, or -1 to run the plan's epochs")
    from rigplan.trainer.distributed import world

    # Under several processes rank 0 alone checks --out: the others would see what rank 0 has begun to write.
    return problems + (out_dir_problems(opts) if world().main else [])


def out_dir_problems(opts: RunOptions) -> list[str]:
    """Never overwrite a run: a non-empty output directory needs --overwrite or --resume."""
    out = Path(opts.out_dir)
    if out.exists() and not out.is_dir():
        return [f"--out {out} is a file; pass a directory (created if missing)"]
    if opts.resume and opts.overwrite:
        return ["pass --resume (continue the run in --out) or --overwrite (replace it), not both"]
    if opts.resume:
        last = resume_point(out)[0]
        if last is None:
            return [f"{out}: no checkpoint to resume from; drop --resume to start a new run"]
        done = checkpoint_step(Path(last))
        if 0 < opts.max_steps <= done:
            # transformers' Trainer would take one step past it before checking (step 21 of --max-steps 20 on two
            # H200s: bench/results/h200x2-fsdp/resume-prequantized-unstopped/)
            adapter = out / "adapter"
            kept = f"; its adapter is {adapter}" if (adapter / "adapter_config.json").exists() else ""
            return [f"{last} is already at step {done}, --max-steps {opts.max_steps}: nothing "
                    f"to train{kept}. Pass a larger --max-steps to train on"]
        return []
    if out.exists() and any(out.iterdir()) and not opts.overwrite:
        return [f"{out} is not empty; pass --resume to continue that run, --overwrite to replace it, "
                "or --out with a new directory"]
    return []


def check_options(opts: RunOptions, more: list[str] | None = None) -> None:
    """One ConfigError naming every problem with the run's options and (more) its plan overrides, before any
    tokenizer or model loads; --dry-run included."""
    require((more or []) + option_problems(opts))


def check_out_dir(opts: RunOptions) -> None:
    require(out_dir_problems(opts))


def resume_point(out_dir: Path) -> tuple[str | None, list[str]]:
    """The newest checkpoint transformers finished writing (marked by the guard's on_save), and the newer ones
    a crash cut short, which are skipped."""
    found = sorted(Path(out_dir).glob("checkpoints/checkpoint-*"), key=checkpoint_step)
    done = [p for p in found if (p / CHECKPOINT_COMPLETE).exists()]
    if not done:
        return None, [str(p) for p in found]
    return str(done[-1]), [str(p) for p in found if checkpoint_step(p) > checkpoint_step(done[-1])
                           and not (p / CHECKPOINT_COMPLETE).exists()]


# What a checkpoint holds and a resumed run must therefore keep: the weights it adapts, the adapters' shapes, and the
# processes whose states it saved (one optimizer shard per process under FSDP, one random state per process). The
# rest may change on resume (a shorter --seq or QLoRA after running out of memory, a lower learning rate after NaN).
RESUME_KEEPS = ("model_path", "rank", "target_modules", "num_gpus", "parallelism", "optimizer")


def resume_problems(plan: Any, out_dir: Path) -> list[str]:
    """A resumed run's plan (estimator.plan.Plan) against the plan its checkpoints were saved under (--out's
    plan.json). A release whose planner now chooses otherwise (DDP where it chose FSDP) would otherwise load a
    checkpoint the new layout cannot read; one that now chooses another optimizer (DDP LoRA: torch's AdamW where it
    chose 8-bit) would load optimizer state of another kind."""
    saved_file = Path(out_dir) / "plan.json"
    if not saved_file.is_file():
        return []
    saved = json.loads(saved_file.read_text())
    same = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731  (JSON lists, plan tuples)
    now = {k: getattr(plan, k) for k in RESUME_KEEPS}
    differ = [k for k in RESUME_KEEPS if k in saved and same(saved[k]) != same(now[k])]
    if not differ:
        return []
    said = lambda d: ", ".join(f"{k} {same(d[k])}" for k in differ)  # noqa: E731
    return [f"{saved_file} trained {said(saved)}; this plan has {said(now)}: a checkpoint continues only "
            f"under its own plan. Resume it with `rigplan run {saved_file} --data ... --resume`, or pass another "
            "--out"]


def checkpoint_step(path: Path) -> int:
    tail = path.name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def trim_metrics(out_dir: Path, step: int) -> None:
    """Drop metrics.jsonl rows logged after the checkpoint a run resumes from: the resumed run logs those steps
    again (after a kill -9 they were repeated)."""
    path = Path(out_dir) / "metrics.jsonl"
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept))
