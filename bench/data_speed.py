"""The estimator's speed for real data (examples of varied length, padded or padding-free as the trainer
lays them out) against the tokens/s that `rigplan run`'s trainer measured on the H100.

    python bench/data_speed.py [--json]

Reads bench/results/h100-tp*.json (bench/train_throughput.py's records: the plan, the data's shape, and each
part's measured tokens/s), rebuilds each dataset's token lengths from its recorded shape (the bench's
generator is seeded: an example of n words is n + 1 tokens with the code-made tokenizer), and estimates the
plan's speed as `rigplan run` predicts it, for the batching the run used. Runs before the trainer took the
model's own loss on Unsloth (2026-11-22, `trainer/run.py` `_trainer_class`) are shown but marked: that
trainer ran 0.87x the bare loop.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import DEFAULT_LENGTHS, make_lengths  # noqa: E402

from rigplan import store  # noqa: E402
from rigplan.estimator import speed  # noqa: E402
from rigplan.estimator.plan import ExampleLengths, Setup  # noqa: E402
from rigplan.profiles.catalog import resolve_gpu, resolve_model  # noqa: E402

RESULTS = Path(__file__).parent / "results"
# Records of the trainer as it is now (the model's own loss on Unsloth): the others predate it.
CURRENT_TRAINER = tuple(f"h100-tp{n}-" for n in range(4, 20))


def rows() -> list[dict]:
    out = []
    coeffs = store.for_gpu("h100-sxm")[0]
    gpu = resolve_gpu("h100-sxm")
    for f in sorted(RESULTS.glob("h100-tp*.json")):
        rec = json.loads(f.read_text())
        data = rec.get("data") or {}
        if "examples" not in data:  # the first runs: equal lengths, no data shape recorded
            continue
        parts = rec["results"] if isinstance(rec["results"], dict) else {r["part"]: r for r in rec["results"]}
        p = rec["plan"]
        model = resolve_model(rec["model"])
        lengths = ExampleLengths.of(make_lengths(data["examples"], tuple(data["words"]) if data.get("words") else DEFAULT_LENGTHS))
        setup = Setup(p["method"], p["rank"], p["micro_batch"], p["seq_len"], grad_accum=p["grad_accum"],
                      checkpointing=p["checkpointing"])
        for part, r in parts.items():  # rigplan, bare, and repeats of either (rigplan@2)
            if part.split("@")[0] not in ("rigplan", "bare") or not r.get("tokens_per_s"):
                continue
            # as the run laid them out: these runs padded micro-batches of examples in random order
            batching = {"padded": "random-padded"}.get(r.get("batching") or data.get("batching") or "padded",
                                                        r.get("batching") or data.get("batching"))
            timed, real, share = speed.data_micro_batch(setup, lengths, batching)
            mean = real / setup.micro_batch
            predicted = real / speed.data_micro_batch_s(model, setup, lengths, batching, gpu, coeffs)
            out.append({"file": f.name, "part": part, "method": p["method"], "micro_batch": p["micro_batch"],
                        "checkpointing": p["checkpointing"], "batching": batching, "mean_tokens": round(mean),
                        "padded_share": round(share, 3), "host_bound": speed.host_bound(model, timed, gpu, coeffs),
                        "current_trainer": f.name.startswith(CURRENT_TRAINER), "measured": r["tokens_per_s"],
                        "predicted": round(predicted, 1), "error": round(predicted / r["tokens_per_s"] - 1, 4)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    table = rows()
    if args.json:
        print(json.dumps(table, indent=2))
        return
    print(f"{'file':32} {'part':8} {'method':6} {'mb':>3} {'ckpt':8} {'batching':13} {'share':>6} "
          f"{'measured':>9} {'predicted':>9} {'error':>7}")
    for r in table:
        mark = "" if r["current_trainer"] or r["part"].startswith("bare") else "  (old trainer)"
        print(f"{r['file']:32} {r['part']:8} {r['method']:6} {r['micro_batch']:>3} {r['checkpointing']:8} "
              f"{r['batching']:13} {r['padded_share']:>6.3f} {r['measured']:>9,.0f} {r['predicted']:>9,.0f} "
              f"{r['error']:>+7.1%}{' host-bound' if r['host_bound'] else ''}{mark}")


if __name__ == "__main__":
    main()
