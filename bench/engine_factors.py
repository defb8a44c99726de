"""The transformers + PEFT engine against Unsloth on the same plan and data, from recorded H100 runs: the factors
estimator/memory.py (TRANSFORMERS_STEP_MEMORY) and estimator/speed.py (TRANSFORMERS_SPEED, TRANSFORMERS_BAND)
carry.

    python bench/engine_factors.py [--json]

Each bench/results/h100-tp*.json with both a 'rigplan' (Unsloth) and an 'hf' (the trainer on transformers + PEFT,
TRL's chunked LM head) part: the step's memory (peak reserved less what is loaded once: weights, adapters and
fixed buffers, as the estimate counts them) of hf over rigplan, and hf's tokens/s over rigplan's.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from rigplan import store
from rigplan.estimator import memory
from rigplan.estimator.plan import Setup
from rigplan.profiles.catalog import resolve_model

RESULTS = Path(__file__).parent / "results"
GIB = 2**30


def pairs() -> list[dict]:
    coeffs = store.reference()[0]
    out = []
    for f in sorted(RESULTS.glob("h100-tp*.json")):
        rec = json.loads(f.read_text())
        res = rec.get("results") or {}
        r, h = res.get("rigplan"), res.get("hf")
        if not (r and h and r.get("peak_reserved_gib") and h.get("peak_reserved_gib")):
            continue
        p = rec["plan"]
        setup = Setup(p["method"], p["rank"], p["micro_batch"], p["seq_len"], checkpointing=p["checkpointing"])
        parts = memory.components_bytes(resolve_model(rec["model"]), setup, coeffs)
        loaded = (parts["base_weights"] + parts["lora_weights"] + parts["loaded_overhead"]) / GIB
        out.append({"file": f.name, "method": p["method"], "micro_batch": p["micro_batch"],
                    "checkpointing": p["checkpointing"],
                    "step_memory_ratio": round((h["peak_reserved_gib"] - loaded) / (r["peak_reserved_gib"] - loaded), 3),
                    "speed_ratio": round(h["tokens_per_s"] / r["tokens_per_s"], 3)})
    return out


def factors(rows: list[dict]) -> dict:
    speeds = [r["speed_ratio"] for r in rows]
    mid = statistics.median(speeds)
    return {"runs": len(rows), "step_memory": statistics.median(r["step_memory_ratio"] for r in rows),
            "step_memory_range": (min(r["step_memory_ratio"] for r in rows), max(r["step_memory_ratio"] for r in rows)),
            "speed": mid,
            "speed_band": (round(min(speeds) / mid, 3), round(max(speeds) / mid, 3))}


if __name__ == "__main__":
    rows = pairs()
    if "--json" in sys.argv:
        print(json.dumps({"pairs": rows, "factors": factors(rows)}, indent=2))
    else:
        for r in rows:
            print(f"{r['file']:34} {r['method']:6} mb {r['micro_batch']:>2} {r['checkpointing']:8} "
                  f"step memory x{r['step_memory_ratio']:.3f}  speed x{r['speed_ratio']:.3f}")
        print(factors(rows))
