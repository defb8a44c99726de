"""What a user typed, checked before anything is planned or loaded: every problem named by its flag, gathered
into one error (as litgpt's validate_args). Standard library only.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


# The flag each planning argument comes from, for messages that name what the user typed.
FLAGS = {"seq_len": "--seq", "effective_batch": "--effective-batch", "micro_batch": "--micro-batch",
         "grad_accum": "--grad-accum", "rank": "--rank", "num_gpus": "--gpus", "examples": "--examples",
         "epochs": "--epochs", "avg_tokens": "--avg-tokens", "learning_rate": "--lr"}
WHOLE = ("seq_len", "effective_batch", "micro_batch", "grad_accum", "rank", "num_gpus", "examples")
POSITIVE = ("epochs", "avg_tokens", "learning_rate")


def input_problems(values: dict[str, Any]) -> list[str]:
    """Every out-of-range number among a command's inputs (None: not given), named by its flag, gathered
    before anything is planned or loaded (as litgpt's validate_args): counts are whole numbers >= 1;
    epochs, --avg-tokens and --lr finite numbers > 0 (NaN and inf once printed nan hours)."""
    problems = []
    for key, v in values.items():
        if v is None:
            continue
        if key in WHOLE and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            problems.append(f"{FLAGS[key]} {v}: pass a whole number >= 1")
        elif key in POSITIVE and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            problems.append(f"{FLAGS[key]} {v}: pass a finite number > 0")
    return problems


def workload_problems(data_file: Path | None, examples: int | None, avg_tokens: float | None) -> list[str]:
    """What the workload options say together: a data file, or --examples with --avg-tokens, never half of it
    (--examples alone once gave a time for examples of half --seq without a word)."""
    if data_file is not None and (examples is not None or avg_tokens is not None):
        return ["pass --data or --examples with --avg-tokens, not both"]
    if (examples is None) != (avg_tokens is None):
        given, missing = ("--examples", "--avg-tokens") if avg_tokens is None else ("--avg-tokens", "--examples")
        return [f"{given} needs {missing} too (tokens per example x examples is the workload), or pass --data FILE"]
    return []


def run_problems(changes: dict[str, Any]) -> list[str]:
    """Every out-of-range override `rigplan run` was given (--rank 0 once trained "lora r-8" on CPU after the
    model had loaded); its caller checks them before any tokenizer or model loads."""
    return input_problems({k: v for k, v in changes.items() if k in FLAGS})


def plan_out_problems(out: Path | None) -> list[str]:
    """Where `rigplan plan --out` cannot write, said before planning."""
    if out is None:
        return []
    out = Path(out)
    if out.is_dir():
        return [f"--out {out} is a directory; pass a file name such as {out / 'plan.json'}"]
    if not out.parent.is_dir():
        return [f"--out {out}: folder {out.parent} does not exist; create it or pass another path"]
    return []
