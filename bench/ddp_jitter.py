"""Where a DDP run's time goes beyond one GPU's, from the step times two recorded runs of the same per-GPU plan
wrote (`rigplan run`'s `measured.step_seconds`; the DDP run and one GPU, one after the other, same call):

    python3 bench/ddp_jitter.py bench/results/h200-runs/ddp/tokencount-seed2 lora qlora
    python3 bench/ddp_jitter.py --fit     # estimator/speed.py STEP_JITTER_S from the one-GPU runs of JITTER_RUNS

Each step's micro-batch is rebuilt as the trainer lays it out (the data from the recorded data command, the plan's
padded groups, trainer/batching.py BlockSampler's order for one and for two processes). One GPU's steps give a law,
seconds = fixed + per-token x padded tokens, fitted on the steps that met no new shape, and the residuals around
it. A DDP step waits for the slower of its two micro-batches: the law on the longer of each pair says what the
lengths alone cost, the law plus residuals drawn from one GPU's (bootstrap, independent per process) what steps
that stray as one GPU's do, and x1.02 what DDP itself costs at a fixed shape (bench/ddp_overhead.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import validation_data  # noqa: E402

from rigplan.trainer.batching import BlockSampler, padded_length  # noqa: E402

DDP_ITSELF = 1.02  # bench/results/README.md, the fifth session: DDP at a fixed shape against one GPU alone


def layout(run: dict) -> list[int]:
    """Padded tokens of each micro-batch (dataset row), longest first, as the trainer groups the run's data."""
    p = run["plan"]
    words = run["data_command"].split()
    examples, seed = (int(words[words.index(f) + 1]) for f in ("--examples", "--seed"))
    counts = validation_data.word_counts(examples, seed=seed)
    extra = round(p["example_tokens"] - sum(min(w, p["seq_len"]) for w in counts) / len(counts))
    lengths = sorted((min(w + extra, p["seq_len"]) for w in counts), reverse=True)
    rows = [lengths[i:i + p["micro_batch"]] for i in range(0, len(lengths), p["micro_batch"])]
    return [padded_length(max(r), p["seq_len"], p["pad_multiple"]) * len(r) for r in rows]


def steps(rows: list[int], world: int, seed: int, epochs: int) -> tuple[np.ndarray, np.ndarray]:
    """Each optimizer step's padded tokens per process ([steps, world]) and whether every shape in it was met
    before (a step meeting a new shape compiles it, which the law leaves out)."""
    toks, settled, seen = [], [], set()
    for epoch in range(epochs):
        sampler = BlockSampler(len(rows), world, seed, longest_first=False)  # the runs predate the longest first
        sampler.set_epoch(epoch)
        order = sampler.order()
        order += order[:(-len(order)) % world]  # accelerate deals the last short block out evenly
        for j in range(0, len(order), world):
            step = [rows[i] for i in order[j:j + world]]
            settled.append(all(t in seen for t in step) and len(toks) >= 5)
            seen.update(step)
            toks.append(step)
    return np.array(toks, float), np.array(settled)


def analyse(folder: Path, method: str, draws: int = 2000) -> dict[str, float]:
    one, ddp = (json.loads((folder / f"{k}-{method}.json").read_text()) for k in ("one", "ddp"))
    rows, seed, epochs = layout(one), one["plan"]["seed"], round(one["plan"]["epochs"])
    t1 = np.array(one["measured"]["step_seconds"])
    x1, k1 = steps(rows, 1, seed, epochs)
    a = np.vstack([np.ones(k1.sum()), x1[k1, 0]]).T
    (fixed, per_token), *_ = np.linalg.lstsq(a, t1[k1], rcond=None)
    residuals = t1[k1] - a @ np.array([fixed, per_token])
    t2 = np.array(ddp["measured"]["step_seconds"])
    x2, k2 = steps(rows, 2, seed, epochs)
    own = fixed + per_token * x2[k2]  # each process's step time by the law, [steps, 2]
    rng = np.random.default_rng(0)
    jitter = np.mean([(own + rng.choice(residuals, size=own.shape)).max(1).sum() for _ in range(draws)])
    alone = own.sum() + residuals.mean() * own.size  # one GPU running the same micro-batches one after another
    return {"fixed_s": round(fixed, 4), "per_token_us": round(per_token * 1e6, 2),
            "sigma_s": round(float(residuals.std(ddof=2)), 4), "one_gpu_steps": int(k1.sum()),
            "residual_p90_s": round(float(np.percentile(residuals, 90)), 4),
            "residual_p99_s": round(float(np.percentile(residuals, 99)), 4),
            "ddp_measured_s": round(float(t2[k2].sum()), 2), "lengths_only_s": round(float(own.max(1).sum()), 2),
            "with_jitter_s": round(float(jitter), 2), "with_jitter_and_ddp_s": round(float(jitter * DDP_ITSELF), 2),
            "ratio_measured": round(float(alone / t2[k2].sum()), 3),
            "ratio_lengths_only": round(float(alone / own.max(1).sum()), 3),
            "ratio_with_jitter_and_ddp": round(float(alone / (jitter * DDP_ITSELF)), 3)}


def step_jitter_s(pairs: list[tuple[Path, str]]) -> float:
    """estimator/speed.py STEP_JITTER_S: one GPU's step strays around its length law, pooled over the runs given
    (root mean square, weighted by their steps)."""
    fits = [analyse(folder, method, draws=1) for folder, method in pairs]
    n = sum(f["one_gpu_steps"] for f in fits)
    return round(float(np.sqrt(sum(f["sigma_s"] ** 2 * f["one_gpu_steps"] for f in fits) / n)), 4)


JITTER_RUNS = [("nosync-seed2", "lora"), ("tokencount-seed2", "lora"), ("tokencount-seed2", "qlora")]


if __name__ == "__main__":
    if sys.argv[1:] == ["--fit"]:
        root = Path(__file__).parent / "results" / "h200-runs" / "ddp"
        print("STEP_JITTER_S =", step_jitter_s([(root / f, m) for f, m in JITTER_RUNS]))
        sys.exit(0)
    where = Path(sys.argv[1])
    for m in sys.argv[2:] or ["lora", "qlora"]:
        print(m, json.dumps(analyse(where, m)))
