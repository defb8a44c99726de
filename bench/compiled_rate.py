"""`rigplan run` on real data against the bare Unsloth loop on fixed shapes (issue 14), both once every shape
is compiled. The bare loop (calibration/probe.py) leaves its first, compiling step out of its rate; a run's
`tokens_per_s` leaves out only its warm-up steps, so shapes met for the first time later (each compiles, about a
second on the H200) count against it. This gives each recorded run's rate without them:

- runs that report `tokens_per_s_compiled` (the trainer leaves out every step that met a new shape), that;
- earlier runs of two or more whole epochs over the same data: the last epoch, whose shapes were all met before
  (its tokens are the run's divided by its epochs; its seconds the sum of its optimizer steps').

    python3 bench/compiled_rate.py RUN.json [BARE.jsonl]      e.g.
    python3 bench/compiled_rate.py bench/results/h200-runs/heldout-seed4-e2/h200-lora.json \
        bench/results/h200-runs/heldout-seed4-e2/bare-lora.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def compiled_rate(run: dict) -> float | None:
    """Real tokens/s of a recorded run once its shapes were compiled, or None where the record cannot tell."""
    m = run["measured"]
    if m.get("tokens_per_s_compiled"):
        return float(m["tokens_per_s_compiled"])
    epochs, steps = run["plan"]["epochs"], m.get("step_seconds") or []
    if epochs < 2 or epochs != int(epochs) or not steps or len(steps) % int(epochs):
        return None
    last = steps[-len(steps) // int(epochs):]
    return m["tokens"] / epochs / sum(last)


def bare_rate(path: Path) -> float:
    """The bare loop's steady tokens/s (its last record in the file)."""
    return float(json.loads(path.read_text().splitlines()[-1])["tok_per_s"])


def main() -> None:
    run = json.loads(Path(sys.argv[1]).read_text())
    rate = compiled_rate(run)
    line = {"run": sys.argv[1], "tokens_per_s": run["measured"]["tokens_per_s"], "compiled_tokens_per_s": rate}
    if len(sys.argv) > 2 and rate is not None:
        bare = bare_rate(Path(sys.argv[2]))
        line.update(bare_tokens_per_s=bare, run_over_bare=round(rate / bare, 3))
    print(json.dumps(line))


if __name__ == "__main__":
    main()
